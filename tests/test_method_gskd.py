"""GSKD (spec section 10, paper 000): sampling, similarity map, descriptors, gradient, edge cases."""
import math

import pytest
import torch
import torch.nn.functional as F

import harness.methods
from harness.methods import Batch, MethodContext, Progress
from harness.methods.gskd import (GSKD, class_balanced_sample, descriptor_kl, gssm, row_shuffle_index,
                                  teacher_correct_labels)
from harness.models import SegOutput
from harness.engine.teacher import teacher_for

IGNORE = 255
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


# ------------------------------------------------------------------------------ loop references
def reference_image_loss(m_s, m_t, shuffle, group_size, tau, reduction="sum"):
    """Straight from Eqs. 5-7 in float64 loops: normalise, V = M M^T, V~[r, c] = V[r, shuffle[r, c]],
    column groups of S (the last one narrower), one softmax per group, mean of tau^2 KL(t || s)."""
    def normed(m):
        return [[float(x) / max(math.sqrt(sum(float(y) ** 2 for y in row)), 1e-12) for x in row] for row in m]

    def sim(rows):
        return [[sum(a * b for a, b in zip(ri, rj)) for rj in rows] for ri in rows]

    vs, vt = sim(normed(m_s.tolist())), sim(normed(m_t.tolist()))
    b = len(vs)
    s = min(group_size, b)
    losses = []
    for start in range(0, b, s):
        cols = range(start, min(start + s, b))
        ds = [vs[r][int(shuffle[r, c])] / tau for r in range(b) for c in cols]
        dt = [vt[r][int(shuffle[r, c])] / tau for r in range(b) for c in cols]
        zs, zt = math.log(sum(math.exp(x) for x in ds)), math.log(sum(math.exp(x) for x in dt))
        kl = sum(math.exp(t - zt) * ((t - zt) - (x - zs)) for x, t in zip(ds, dt))
        losses.append(kl / len(ds) if reduction == "entries" else kl)
    return tau ** 2 * sum(losses) / len(losses)


# ------------------------------------------------------------------------------------- helpers
def context(c_s=6, c_t=10, k=4, seed=0):
    return MethodContext(num_classes=k, ignore_index=IGNORE, student_channels={"head": c_s, "stage4": 8},
                         student_strides={"head": 8}, teacher_channels={"head": c_t, "stage4": 12},
                         teacher_strides={"head": 8}, generator=torch.Generator().manual_seed(seed))


def perfect_teacher_logits(mask, k, size):
    """Logits whose argmax is the nearest-downsampled label (ignore pixels -> class 0)."""
    lab = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].long()
    lab = torch.where(lab == IGNORE, torch.zeros_like(lab), lab)
    return F.one_hot(lab, k).permute(0, 3, 1, 2).double() * 5.0


def striped_mask(b, classes, h=16, w=16):
    """B x h x w labels: vertical stripes of the given classes, one ignore row."""
    mask = torch.zeros(b, h, w, dtype=torch.long)
    for i, c in enumerate(classes):
        mask[:, :, i * w // len(classes):(i + 1) * w // len(classes)] = c
    mask[:, 0] = IGNORE
    return mask


def outputs(mask, k=4, c_s=6, c_t=10, seed=1, teacher_logits=None, grid=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    b = mask.shape[0]
    s_feat = torch.randn(b, c_s, *grid, generator=g, dtype=torch.float64, requires_grad=True)
    t_feat = torch.randn(b, c_t, *grid, generator=g, dtype=torch.float64, requires_grad=True)
    s_logits = torch.randn(b, k, *grid, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = perfect_teacher_logits(mask, k, grid) if teacher_logits is None else teacher_logits
    t_logits = t_logits.clone().requires_grad_(True)
    student = SegOutput(s_logits, None, {"head": s_feat})
    teacher = SegOutput(t_logits, None, {"head": t_feat})
    return student, teacher, Batch(None, mask)


def method(ctx=None, **cfg):
    m = GSKD(cfg, ctx or context())
    return m.double()


# ------------------------------------------------------------------------- teacher-correct map
def test_teacher_correct_labels_nearest_downsampling_and_ignore():
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 3, (2, 8, 12), generator=g)
    mask[0, 0, :] = IGNORE
    logits = torch.randn(2, 3, 4, 6, generator=g)
    got = teacher_correct_labels(logits, mask, IGNORE)
    pred = logits.argmax(1)
    for b in range(2):
        for i in range(4):
            for j in range(6):
                label = int(mask[b, 2 * i, 2 * j])  # nearest: index floor(i * H_in / H_out)
                want = label if label != IGNORE and int(pred[b, i, j]) == label else IGNORE
                assert int(got[b, i, j]) == want
    assert (got[0, 0] == IGNORE).all()  # the ignore row never counts, whatever the teacher says


def test_teacher_correct_labels_brought_to_another_grid():
    mask = striped_mask(1, [0, 1])
    logits = perfect_teacher_logits(mask, 2, (4, 4))
    got = teacher_correct_labels(logits, mask, IGNORE, size=(8, 8))
    assert got.shape == (1, 8, 8)
    assert torch.equal(got, F.interpolate(teacher_correct_labels(logits, mask, IGNORE)[:, None].float(),
                                          size=(8, 8), mode="nearest")[:, 0].long())


# ------------------------------------------------------------------------ class-balanced sampling
def labels_with_counts(counts, total=60):
    labels = torch.full((total,), IGNORE, dtype=torch.long)
    pos = torch.randperm(total, generator=torch.Generator().manual_seed(7))
    start = 0
    for c, n in counts.items():
        labels[pos[start:start + n]] = c
        start += n
    return labels


def test_cbs_draws_n_distinct_pixels_per_class_in_class_blocks():
    labels = labels_with_counts({0: 20, 3: 10, 2: 1})
    idx, classes = class_balanced_sample(labels, IGNORE, 8, torch.Generator().manual_seed(0), "others", 2, 1)
    assert classes == [0, 3]  # the one-pixel class is skipped (min_class_pixels=2), ascending ids
    assert idx.numel() == 16
    for block, c in zip(idx.split(8), classes):
        assert (labels[block] == c).all() and block.unique().numel() == 8


def test_cbs_underfull_class_is_padded_with_other_classes_or_repeated():
    labels = labels_with_counts({0: 20, 3: 10, 2: 1})
    own3 = set(torch.nonzero(labels == 3).flatten().tolist())
    idx, _ = class_balanced_sample(labels, IGNORE, 16, torch.Generator().manual_seed(0), fill="others", min_class_pixels=2, min_classes=1)
    block = idx[16:]
    assert own3 <= set(block.tolist()) and block.unique().numel() == 16  # all 10 own + 6 distinct others
    others = labels[block[10:]]
    assert ((others != 3) & (others != IGNORE)).all()

    idx, _ = class_balanced_sample(labels, IGNORE, 16, torch.Generator().manual_seed(0), fill="repeat", min_class_pixels=2, min_classes=1)
    block = idx[16:]
    assert (labels[block] == 3).all() and set(block.tolist()) == own3


def test_cbs_single_class_and_no_correct_pixel():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    nothing = torch.full((30,), IGNORE, dtype=torch.long)
    idx, classes = class_balanced_sample(nothing, IGNORE, 8, g, "others", 2, 1)
    assert idx.numel() == 0 and classes == [] and torch.equal(g.get_state(), state)  # draws nothing

    single = labels_with_counts({5: 3})
    idx, classes = class_balanced_sample(single, IGNORE, 8, g, fill="others", min_class_pixels=2, min_classes=2)
    assert classes == [] and torch.equal(g.get_state(), state)
    idx, classes = class_balanced_sample(single, IGNORE, 8, g, fill="others", min_class_pixels=2, min_classes=1)
    assert classes == [5] and idx.numel() == 8 and (single[idx] == 5).all()  # nothing else to pad with


def test_cbs_and_shuffle_replay_from_the_generator():
    labels = labels_with_counts({0: 20, 1: 12, 2: 9})
    a = class_balanced_sample(labels, IGNORE, 8, torch.Generator().manual_seed(3), "others", 2, 1)[0]
    b = class_balanced_sample(labels, IGNORE, 8, torch.Generator().manual_seed(3), "others", 2, 1)[0]
    c = class_balanced_sample(labels, IGNORE, 8, torch.Generator().manual_seed(4), "others", 2, 1)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    s = row_shuffle_index(7, torch.Generator().manual_seed(0))
    assert torch.equal(s, row_shuffle_index(7, torch.Generator().manual_seed(0)))
    assert torch.equal(s.sort(dim=1).values, torch.arange(7).expand(7, 7))  # each row a permutation
    assert not all(torch.equal(s[0], s[r]) for r in range(1, 7))  # rows permuted independently


# ------------------------------------------------------------------------------- descriptor loss
@pytest.mark.parametrize("b,s", [(12, 4), (12, 5), (12, 12), (6, 20), (8, 1)])
@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("reduction", ["sum", "entries"])
def test_descriptor_loss_matches_the_formula(b, s, tau, reduction):
    g = torch.Generator().manual_seed(b * 100 + s)
    m_s = torch.randn(b, 5, generator=g, dtype=torch.float64)
    m_t = torch.randn(b, 7, generator=g, dtype=torch.float64)
    shuffle = row_shuffle_index(b, g)
    got = descriptor_kl(gssm(m_s), gssm(m_t), shuffle, s, tau, reduction)
    assert float(got) == pytest.approx(reference_image_loss(m_s, m_t, shuffle, s, tau, reduction), rel=1e-10)


def test_descriptor_loss_properties():
    g = torch.Generator().manual_seed(0)
    b = 10
    m_s, m_t = torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randn(b, 6, generator=g, dtype=torch.float64)
    v_s, v_t = gssm(m_s), gssm(m_t)
    sh = row_shuffle_index(b, g)
    # identical maps -> 0; otherwise > 0
    assert float(descriptor_kl(v_t, v_t.clone(), sh, 4, 1.0, "sum")) == pytest.approx(0.0, abs=1e-12)
    assert float(descriptor_kl(v_s, v_t, sh, 4, 1.0, "sum")) > 0
    # S = B: one descriptor holding the whole map, so the shuffle cannot matter
    other = row_shuffle_index(b, g)
    assert float(descriptor_kl(v_s, v_t, sh, b, 1.0, "sum")) == pytest.approx(
        float(descriptor_kl(v_s, v_t, other, b, 1.0, "sum")), rel=1e-12)
    # relabelling the samples (same permutation for S and T, shuffle carried along) changes nothing
    pi = torch.randperm(b, generator=g)
    inv = pi.argsort()
    sh_pi = inv[sh[pi]]  # sh'[i, c] = pi^-1(sh[pi(i), c])
    assert float(descriptor_kl(gssm(m_s[pi]), gssm(m_t[pi]), sh_pi, 4, 1.0, "sum")) == pytest.approx(
        float(descriptor_kl(v_s, v_t, sh, 4, 1.0, "sum")), rel=1e-12)


def test_descriptor_loss_gradcheck():
    g = torch.Generator().manual_seed(0)
    m_s = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    m_t = torch.randn(6, 4, generator=g, dtype=torch.float64)
    sh = row_shuffle_index(6, g)
    assert torch.autograd.gradcheck(lambda m: descriptor_kl(gssm(m), gssm(m_t), sh, 4, 2.0, "sum"), (m_s,))


# ---------------------------------------------------------------------------------- the method
def test_presets_and_overrides():
    m = method()
    assert (m.n_per_class, m.group_size_for(3)) == (16, 8)
    assert m.weights() == {"gskd": 10.0} and m.cfg["tau"] == 1.0
    p = method(mode="plugin")
    assert p.n_per_class == 8 and p.group_size_for(3) == 3 and p.group_size_for(5) == 5
    o = method(mode="plugin", n_per_class=4, group_size=-2)
    assert o.n_per_class == 4 and o.group_size_for(3) == 6
    assert method(group_size=5).group_size_for(3) == 5


@pytest.mark.parametrize("cfg,match", [({"mode": "plug-in"}, "mode"), ({"projector": "yes"}, "projector"),
                                       ({"fill": "zeros"}, "fill"), ({"reduction": "mean"}, "reduction"),
                                       ({"n_per_class": 0}, "n_per_class"), ({"group_size": 0}, "group_size"),
                                       ({"min_classes": 0}, "min_classes"), ({"feature": "neck"}, "feature")])
def test_invalid_settings_are_refused_with_the_key_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        GSKD(cfg, context())


def test_projector_only_where_channels_differ_unless_asked():
    assert method(ctx=context(6, 10)).projector is not None
    assert method(ctx=context(8, 8)).projector is None
    assert method(ctx=context(8, 8), projector="always").projector is not None
    assert method(ctx=context(6, 10), projector="none").projector is None
    assert method(ctx=context(6, 10), feature="logits").projector is None  # K channels on both sides


def test_method_equals_the_reference_replayed_from_the_generator():
    mask = striped_mask(2, [0, 1, 3])
    mask[1, 8:, :] = 2  # the second image has four classes
    student, teacher, batch = outputs(mask)
    ctx = context(seed=5)
    m = method(ctx=ctx, projector="none", n_per_class=4, group_size=5)
    got = float(m.terms(student, teacher, batch, Progress(0, 1))["gskd"].detach())

    g = torch.Generator().manual_seed(5)
    labels = teacher_correct_labels(teacher.logits, mask, IGNORE, (8, 8))
    per_image = []
    for i in range(2):
        idx, classes = class_balanced_sample(labels[i], IGNORE, 4, g, "others", 2, 2)
        sh = row_shuffle_index(idx.numel(), g)
        f_s = student.features["head"][i].flatten(1).t()[idx].detach()
        f_t = teacher.features["head"][i].flatten(1).t()[idx].detach()
        per_image.append(reference_image_loss(f_s, f_t, sh, 5, 1.0))
    assert got == pytest.approx(sum(per_image) / 2, rel=1e-10)


def test_gradient_reaches_the_student_and_the_projector_never_the_teacher():
    """The released code's loss has no gradient at all (spec 10.3); this one must."""
    student, teacher, batch = outputs(striped_mask(2, [0, 1, 2]))
    m = method()
    loss = m.terms(student, teacher, batch, Progress(0, 1))["gskd"]
    assert float(loss) > 0
    loss.backward()
    s_grad = student.features["head"].grad
    assert s_grad is not None and s_grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projector.parameters())
    assert teacher.features["head"].grad is None and teacher.logits.grad is None


def test_teacher_wrong_everywhere_gives_zero_and_no_nan():
    mask = striped_mask(2, [0, 1, 2])
    wrong = perfect_teacher_logits(torch.full_like(mask, 3), 4, (8, 8))  # predicts class 3, never present
    student, teacher, batch = outputs(mask, teacher_logits=wrong)
    loss = method().terms(student, teacher, batch, Progress(0, 1))["gskd"]
    assert float(loss) == 0.0
    loss.backward()
    assert torch.isfinite(student.features["head"].grad).all() and student.features["head"].grad.abs().sum() == 0


def test_single_class_image_is_skipped_by_default_and_finite_when_allowed():
    mask = torch.full((1, 16, 16), 2, dtype=torch.long)
    student, teacher, batch = outputs(mask)
    assert float(method().terms(student, teacher, batch, Progress(0, 1))["gskd"]) == 0.0
    for fill, n in (("others", 16), ("others", 100), ("repeat", 100)):  # 64 correct pixels; n > 64 pads
        student, teacher, batch = outputs(mask)
        loss = method(min_classes=1, fill=fill, n_per_class=n).terms(student, teacher, batch, Progress(0, 1))["gskd"]
        assert math.isfinite(float(loss)) and float(loss) > 0
        loss.backward()
        assert student.features["head"].grad.abs().sum() > 0


def test_loss_is_the_mean_over_the_images_that_take_part():
    good = striped_mask(1, [0, 1, 2])
    bad = torch.full((1, 16, 16), IGNORE, dtype=torch.long)  # nothing labelled: no correct pixel
    s1, t1, b1 = outputs(good, seed=3)
    s2, t2, b2 = outputs(torch.cat([bad, good]), seed=3)
    s2.features["head"].data[1], t2.features["head"].data[1] = s1.features["head"].data[0], t1.features["head"].data[0]
    m1, m2 = method(ctx=context(seed=9)), method(ctx=context(seed=9))
    m2.load_state_dict(m1.state_dict())
    one = float(m1.terms(s1, t1, b1, Progress(0, 1))["gskd"])
    two = float(m2.terms(s2, t2, b2, Progress(0, 1))["gskd"])
    assert one > 0 and two == pytest.approx(one, rel=1e-12)


def test_randomness_comes_only_from_the_injected_generator():
    mask = striped_mask(2, [0, 1, 2, 3])

    def loss(method_seed, global_seed):
        torch.manual_seed(global_seed)
        student, teacher, batch = outputs(mask)
        m = method(ctx=context(seed=method_seed), projector="none", mode="plugin")
        return float(m.terms(student, teacher, batch, Progress(0, 1))["gskd"])

    assert loss(0, 0) == loss(0, 123)
    assert loss(0, 0) != loss(1, 0)


def test_logits_stage_features_and_teacher_maps_of_another_size():
    mask = striped_mask(2, [0, 1, 2])
    student, teacher, batch = outputs(mask)
    loss = method(feature="logits").terms(student, teacher, batch, Progress(0, 1))["gskd"]
    loss.backward()
    assert float(loss) > 0 and student.logits.grad.abs().sum() > 0

    # a teacher at output stride 16: its feature and logits are half the student's size
    student, teacher, batch = outputs(mask, teacher_logits=perfect_teacher_logits(mask, 4, (4, 4)))
    teacher.features["head"] = torch.randn(2, 10, 4, 4, dtype=torch.float64)
    loss = method().terms(student, teacher, batch, Progress(0, 1))["gskd"]
    assert math.isfinite(float(loss)) and float(loss) > 0


# ------------------------------------------------------------------------- config and a real run
@pytest.fixture
def registered(monkeypatch):
    """GSKD in the method registry (the registration line lives in harness/methods/__init__.py)."""
    monkeypatch.setitem(harness.methods.METHODS, "gskd", GSKD)


def test_yaml_defaults_validate_and_compose_with_kd(registered):
    from harness.config import load_config
    from harness.errors import ConfigError

    cfg = load_config(["+method=[kd,gskd]"])
    assert set(cfg["method"]) == {"kd", "gskd"}
    assert cfg["method"]["gskd"] == vars(GSKD.Config())  # the yaml states the schema's defaults
    cfg = load_config(["+method=[kd,gskd]", "method.gskd.mode=plugin", "method.gskd.n_per_class=4",
                       "method.gskd.weight=5"])
    assert cfg["method"]["gskd"]["n_per_class"] == 4 and cfg["method"]["gskd"]["mode"] == "plugin"
    with pytest.raises(ConfigError, match="n_per_class"):
        load_config(["+method=gskd", "method.gskd.n_per_class=many"])


def test_distilled_run_with_kd_and_gskd(tiny, registered):
    from harness.config import load_config
    from harness.engine.train import run

    cfg = load_config(tiny("+method=[kd,gskd]", "method.gskd.min_classes=1", "method.gskd.n_per_class=4"))
    record = run(cfg, teacher=teacher_for(cfg)).record
    assert record["status"] == "completed"
    terms = record["extra_json"]["last_loss_terms"]
    assert "gskd.gskd" in terms and "kd.kd" in terms and math.isfinite(terms["gskd.gskd"])
