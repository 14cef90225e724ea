"""IFVD (spec section 6): value against a loop-based float64 reference, properties, the method."""
import math

import pytest
import torch

import harness.methods
from harness.methods.base import Batch, MethodContext, Progress
from harness.methods.ifvd import IFVD, class_similarity_map, intra_class_variation_loss, labels_at
from harness.models import SegOutput
from harness.engine.teacher import teacher_for

torch.set_num_threads(1)
IGNORE = 255
K = 5


def reference_ifv(s, t, mask, num_classes):
    """Spec 6.1 with plain loops in float64: nearest labels (index floor(i H / h)), per-image class
    prototypes sum / (n + 1e-6), ignore pixels are their own centre, cosine with each norm clamped at
    1e-8, squared difference averaged over ALL B h w pixels."""
    b_, _, h, w = s.shape
    big_h, big_w = mask.shape[1:]
    mask = mask.tolist()
    labels = [[[mask[b][i * big_h // h][j * big_w // w] for j in range(w)] for i in range(h)] for b in range(b_)]

    def cos_map(f):
        f = f.double().tolist()
        c_ = len(f[0])
        out = []
        for b in range(b_):
            protos = {}
            for k in range(num_classes):
                pix = [(i, j) for i in range(h) for j in range(w) if labels[b][i][j] == k]
                protos[k] = [sum(f[b][c][i][j] for i, j in pix) / (len(pix) + 1e-6) for c in range(c_)]
            rows = []
            for i in range(h):
                row = []
                for j in range(w):
                    x = [f[b][c][i][j] for c in range(c_)]
                    y = labels[b][i][j]
                    centre = protos[y] if 0 <= y < num_classes else x
                    dot = sum(a * z for a, z in zip(x, centre))
                    nx = math.sqrt(sum(a * a for a in x))
                    nc = math.sqrt(sum(a * a for a in centre))
                    row.append(dot / (max(nx, 1e-8) * max(nc, 1e-8)))
                rows.append(row)
            out.append(rows)
        return out

    ms, mt = cos_map(s), cos_map(t)
    total = sum((ms[b][i][j] - mt[b][i][j]) ** 2 for b in range(b_) for i in range(h) for j in range(w))
    return total / (b_ * h * w)


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def feature_labels(b=2, h=5, w=7, seed=0, ignore=IGNORE):
    """Labels at feature size: classes 0..3 at random, ~20 % ignore, class 4 on exactly one pixel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (b, h, w), generator=g)
    y[torch.rand(b, h, w, generator=g) < 0.2] = ignore
    y[0, 2, 3] = 4
    return y


def full_res(small, factor=8, seed=1, ignore=IGNORE):
    """Full-resolution labels whose nearest sample (every `factor`-th pixel from 0) is `small`; all
    other pixels are random (classes and ignore), so a wrong sampling grid changes the result."""
    b, h, w = small.shape
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, K, (b, h * factor, w * factor), generator=g)
    full[torch.rand(full.shape, generator=g) < 0.2] = ignore
    full[:, ::factor, ::factor] = small
    return full


def test_labels_are_sampled_nearest_at_floor_index():
    small = feature_labels()
    assert torch.equal(labels_at(full_res(small), (5, 7)), small)
    assert torch.equal(labels_at(small, (5, 7)), small)


@pytest.mark.parametrize("cs,ct", [(3, 6), (6, 3), (4, 4)])
def test_value_matches_the_loop_reference_on_odd_sizes(cs, ct):
    small = feature_labels()
    assert int((small == 4).sum()) == 1 and bool((small == IGNORE).any())
    mask = full_res(small)
    s, t = randn(2, cs, 5, 7, seed=2), randn(2, ct, 5, 7, seed=3)
    got = float(intra_class_variation_loss(s, t, mask, K))
    expected = reference_ifv(s, t, mask, K)
    assert expected > 0 and got == pytest.approx(expected, rel=1e-6)
    # float32 agrees within float precision
    assert float(intra_class_variation_loss(s.float(), t.float(), mask, K)) == pytest.approx(got, rel=1e-4)


def test_ignore_value_minus_one_behaves_like_255():
    s, t = randn(2, 3, 5, 7, seed=4), randn(2, 6, 5, 7, seed=5)
    a = feature_labels(ignore=IGNORE)
    b = torch.where(a == IGNORE, torch.full_like(a, -1), a)
    assert float(intra_class_variation_loss(s, t, a, K)) == pytest.approx(
        float(intra_class_variation_loss(s, t, b, K)), rel=1e-12)


def test_ignore_pixels_count_in_the_denominator():
    """Spec 6.1 step 5: ignore pixels add 0 error but stay in the mean over B h w."""
    s, t = randn(2, 3, 5, 7, seed=6), randn(2, 6, 5, 7, seed=7)
    y = feature_labels()
    valid = (y != IGNORE)
    m_s = class_similarity_map(s, y, K)
    m_t = class_similarity_map(t, y, K)
    assert torch.allclose(m_s[~valid], torch.ones(()).double()) and torch.allclose(m_t[~valid], torch.ones(()).double())
    per_valid = (m_s - m_t)[valid].pow(2).mean()
    got = intra_class_variation_loss(s, t, y, K)
    assert float(got) == pytest.approx(float(per_valid) * float(valid.sum()) / valid.numel(), rel=1e-12)


def test_zero_for_identical_rotated_or_zero_padded_features():
    t = randn(2, 4, 5, 7, seed=8)
    y = feature_labels()
    assert float(intra_class_variation_loss(t.clone(), t, y, K)) == pytest.approx(0.0, abs=1e-20)
    q, _ = torch.linalg.qr(randn(4, 4, seed=9))  # orthogonal map over channels keeps every cosine
    rotated = torch.einsum("dc,bchw->bdhw", q, t)
    assert float(intra_class_variation_loss(rotated, t, y, K)) == pytest.approx(0.0, abs=1e-20)
    padded = torch.cat([t, torch.zeros(2, 3, 5, 7, dtype=torch.float64)], dim=1)  # C_s = 7 != C_t = 4
    assert float(intra_class_variation_loss(padded, t, y, K)) == pytest.approx(0.0, abs=1e-20)
    assert float(intra_class_variation_loss(randn(2, 4, 5, 7, seed=10), t, y, K)) > 0


def test_invariances_stated_by_the_formula():
    """Invariant to a positive scale per (image, class region) and per ignore pixel (the prototype
    scales along); NOT to an arbitrary positive per-pixel scale (the prototype moves)."""
    s, t = randn(2, 3, 5, 7, seed=11), randn(2, 6, 5, 7, seed=12)
    y = feature_labels()
    base = float(intra_class_variation_loss(s, t, y, K))
    g = torch.Generator().manual_seed(13)
    region_scale = torch.rand(2, K, generator=g, dtype=torch.float64) * 5 + 0.1
    pixel_scale = torch.rand(2, 5, 7, generator=g, dtype=torch.float64) * 5 + 0.1
    per_region = torch.where(y == IGNORE, pixel_scale,
                             region_scale.gather(1, y.clamp(max=K - 1).flatten(1)).reshape(2, 5, 7))
    assert float(intra_class_variation_loss(s * per_region[:, None], t, y, K)) == pytest.approx(base, rel=1e-10)
    assert float(intra_class_variation_loss(s, t * per_region[:, None], y, K)) == pytest.approx(base, rel=1e-10)
    assert float(intra_class_variation_loss(s * pixel_scale[:, None], t, y, K)) != pytest.approx(base, rel=1e-3)


def test_all_ignore_gives_zero_and_single_class_compares_to_the_image_mean():
    s, t = randn(2, 3, 5, 7, seed=14), randn(2, 6, 5, 7, seed=15)
    nothing = torch.full((2, 5, 7), IGNORE)
    assert float(intra_class_variation_loss(s, t, nothing, K)) == 0.0

    one = torch.full((2, 5, 7), 2)
    expected = 0.0
    for f_s, f_t in zip(s, t):
        cos_s = torch.cosine_similarity(f_s, f_s.mean((1, 2), keepdim=True), dim=0)
        cos_t = torch.cosine_similarity(f_t, f_t.mean((1, 2), keepdim=True), dim=0)
        expected += float((cos_s - cos_t).pow(2).sum())
    assert float(intra_class_variation_loss(s, t, one, K)) == pytest.approx(expected / (2 * 35), rel=1e-10)


def test_gradcheck_through_the_prototypes():
    y = feature_labels(b=2, h=3, w=5)
    y[1, 0, 0] = 4  # a single-pixel class in the second image too
    s = randn(2, 3, 3, 5, seed=16).requires_grad_(True)
    t = randn(2, 4, 3, 5, seed=17).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: intra_class_variation_loss(a, b, y, K), (s, t))


def test_zero_feature_vectors_stay_finite():
    s = randn(1, 3, 3, 5, seed=18)
    s[0, :, 1, 1] = 0.0
    s.requires_grad_(True)
    y = torch.zeros(1, 3, 5, dtype=torch.long)
    y[0, 0] = IGNORE
    loss = intra_class_variation_loss(s, randn(1, 4, 3, 5, seed=19), y, K)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------------- the method
def context(cs=3, ct=6, seed=0):
    chans_s, chans_t = {"head": cs, "stage4": 8}, {"head": ct, "stage4": 16}
    return MethodContext(K, IGNORE, chans_s, {n: 8 for n in chans_s}, chans_t, {n: 8 for n in chans_t},
                         torch.Generator().manual_seed(seed))


def outputs(small, cs=3, ct=6, teacher_size=None, seed=20):
    b, h, w = small.shape
    th, tw = teacher_size or (h, w)
    s = SegOutput(randn(b, K, h, w, seed=seed).requires_grad_(True), None,
                  {"head": randn(b, cs, h, w, seed=seed + 1).requires_grad_(True)})
    t = SegOutput(randn(b, K, th, tw, seed=seed + 2).requires_grad_(True), None,
                  {"head": randn(b, ct, th, tw, seed=seed + 3).requires_grad_(True)})
    mask = full_res(small)
    return s, t, Batch(torch.zeros(b, 3, *mask.shape[1:]), mask)


def test_method_term_weight_and_gradients():
    small = feature_labels()
    student, teacher, batch = outputs(small)
    m = IFVD({}, context())
    assert m.weights() == {"ifvd": 20.0} and list(m.parameters()) == []
    terms = m.terms(student, teacher, batch, Progress(0, 1))
    assert set(terms) == {"ifvd"}
    assert float(terms["ifvd"].detach()) == pytest.approx(
        reference_ifv(student.features["head"].detach(), teacher.features["head"].detach(), batch.mask, K), rel=1e-6)
    terms["ifvd"].backward()
    assert student.features["head"].grad.abs().sum() > 0
    assert teacher.features["head"].grad is None


def test_teacher_of_another_spatial_size_is_resized_bilinearly():
    small = feature_labels()
    student, teacher, batch = outputs(small, teacher_size=(10, 14))
    got = float(IFVD({}, context()).terms(student, teacher, batch, Progress(0, 1))["ifvd"].detach())
    t_small = torch.nn.functional.interpolate(teacher.features["head"].detach(), size=(5, 7), mode="bilinear",
                                              align_corners=False)
    assert got == pytest.approx(reference_ifv(student.features["head"].detach(), t_small, batch.mask, K), rel=1e-6)


@pytest.mark.parametrize("cfg,match", [({"feature": "neck"}, "feature"), ({"weight": -1.0}, "weight")])
def test_bad_settings_are_refused_with_the_key_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        IFVD(cfg, context())


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(harness.methods.METHODS, "ifvd", IFVD)


def test_yaml_states_the_schema_defaults_and_the_validator_checks(registered):
    from harness.config import load_config
    from harness.errors import ConfigError

    assert load_config(["+method=ifvd"])["method"]["ifvd"] == vars(IFVD.Config())
    with pytest.raises(ConfigError, match="method.ifvd.weight' must be >= 0"):
        load_config(["+method=ifvd", "method.ifvd.weight=-1"])
    with pytest.raises(ConfigError, match="method.ifvd.weight"):
        load_config(["+method=ifvd", "method.ifvd.weight=lots"])


def test_distilled_run_through_the_train_loop(tiny, registered):
    from harness.config import load_config
    from harness.engine.train import run

    cfg = load_config(tiny("+method=[kd,ifvd]", "method.ifvd.weight=200"))
    result = run(cfg, teacher=teacher_for(cfg))
    assert result.record["status"] == "completed"
    terms = result.record["extra_json"]["last_loss_terms"]
    assert "ifvd.ifvd" in terms and math.isfinite(terms["ifvd.ifvd"]) and terms["ifvd.ifvd"] > 0
    head_grads = [p.grad for p in result.model.head.parameters() if p.grad is not None]
    assert head_grads and all(torch.isfinite(g).all() for g in head_grads)
    assert any(g.abs().sum() > 0 for g in head_grads)
