"""HeteroAKD (spec section 12, paper 004): KMM, KEM, L_hkd, projectors, warm-up, method, real run."""
import math

import pytest
import torch
import torch.nn.functional as F

import harness.methods
from harness.methods.base import Batch, MethodContext, Progress
from harness.methods.cwd import channel_wise_kd
from harness.methods.heteroakd import (HeteroAKD, hetero_kd, knowledge_targets, mean_bce, one_hot_labels,
                                       sigmoid_bce)
from harness.models import SegOutput
from harness.engine.teacher import teacher_for

torch.set_num_threads(1)
IGNORE = 255


# ------------------------------------------------------------------------------ loop references
def bce(z, y):
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def softmax_list(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def reference_targets(z_s, z_t, labels, mixing=True, evaluation=True):
    """Eqs. 5-9 element by element: {(n, c, i, j): (zhat, W)} for the labelled pixels."""
    n_, k, h, w = z_s.shape
    out = {}
    for n in range(n_):
        for i in range(h):
            for j in range(w):
                lab = int(labels[n, i, j])
                if lab == IGNORE:
                    continue
                zhat, score = [], []
                for c in range(k):
                    y = 1.0 if lab == c else 0.0
                    zs, zt = float(z_s[n, c, i, j]), float(z_t[n, c, i, j])
                    hs, ht = bce(zs, y), bce(zt, y)
                    s_t = 1 - ht / (ht + hs)
                    zh = s_t * zt + (1 - s_t) * zs if mixing else zt
                    hh = bce(zh, y)
                    delta = (hs - hh) if hs > hh else 0.0
                    zhat.append(zh)
                    score.append(hs + delta)
                weights = softmax_list(score) if evaluation else [1.0] * k
                for c in range(k):
                    out[n, c, i, j] = (zhat[c], weights[c])
    return out


def reference_hkd(z_s, z_t, labels, tau, axis="spatial", mixing=True, evaluation=True):
    n_, k, h, w = z_s.shape
    t = reference_targets(z_s, z_t, labels, mixing, evaluation)
    pixels = [[(i, j) for i in range(h) for j in range(w) if int(labels[n, i, j]) != IGNORE] for n in range(n_)]
    if axis == "spatial":
        total = 0.0
        for n in range(n_):
            if not pixels[n]:
                continue
            for c in range(k):
                p_t = softmax_list([t[n, c, i, j][0] / tau for i, j in pixels[n]])
                p_s = softmax_list([float(z_s[n, c, i, j]) / tau for i, j in pixels[n]])
                total -= sum(a * math.log(b) * t[n, c, i, j][1] for a, b, (i, j) in zip(p_t, p_s, pixels[n]))
        return total / (n_ * k)
    total, count = 0.0, 0
    for n in range(n_):
        for i, j in pixels[n]:
            p_t = softmax_list([t[n, c, i, j][0] / tau for c in range(k)])
            p_s = softmax_list([float(z_s[n, c, i, j]) / tau for c in range(k)])
            total -= sum(p_t[c] * math.log(p_s[c]) * t[n, c, i, j][1] for c in range(k)) / k
            count += 1
    return total / count


def reference_mean_bce(z, labels):
    n_, k, h, w = z.shape
    total, count = 0.0, 0
    for n in range(n_):
        for i in range(h):
            for j in range(w):
                lab = int(labels[n, i, j])
                if lab != IGNORE:
                    total += sum(bce(float(z[n, c, i, j]), 1.0 if c == lab else 0.0) for c in range(k))
                    count += k
    return total / count


def reference_projector(x, weight, relu=True, eps=1e-5):
    """Conv1x1 (no bias) by loops, then BN in training mode (batch mean, biased variance; gamma 1,
    beta 0 as initialised), then ReLU."""
    n_, c_in, h, w = x.shape
    weight = weight.reshape(weight.shape[0], c_in)
    k = weight.shape[0]
    out = torch.zeros(n_, k, h, w, dtype=torch.float64)
    for o in range(k):
        vals = {}
        for n in range(n_):
            for i in range(h):
                for j in range(w):
                    vals[n, i, j] = sum(float(weight[o, c]) * float(x[n, c, i, j]) for c in range(c_in))
        mean = sum(vals.values()) / len(vals)
        var = sum((v - mean) ** 2 for v in vals.values()) / len(vals)
        for (n, i, j), v in vals.items():
            y = (v - mean) / math.sqrt(var + eps)
            out[n, o, i, j] = max(y, 0.0) if relu else y
    return out


# ------------------------------------------------------------------------------------- helpers
def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def odd_labels(n=2, h=5, w=7, k=4, seed=3):
    """Classes 0..2 at random, ~20 % ignore, class 3 at exactly one pixel (image 0), image 1 without 3."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < 0.2] = IGNORE
    labels[0, 2, 3] = 3
    return labels


def context(k=4, c_s=3, c_t=6, seed=0):
    return MethodContext(num_classes=k, ignore_index=IGNORE, student_channels={"stage4": c_s, "head": 5},
                         student_strides={"stage4": 8, "head": 8}, teacher_channels={"stage4": c_t, "head": 7},
                         teacher_strides={"stage4": 16, "head": 16}, generator=torch.Generator().manual_seed(seed))


def method(**cfg):
    return HeteroAKD({"warmup_fraction": 0.0, **cfg}, context()).double()


def outputs(n=2, k=4, seed=1, grad=True):
    """Student stage4 3 x 4 with 3 channels, teacher stage4 2 x 3 with 6 channels (heterogeneous)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(grad)  # noqa: E731
    student = SegOutput(mk(n, k, 3, 4), None, {"stage4": mk(n, 3, 3, 4)})
    teacher = SegOutput(mk(n, k, 2, 3), None, {"stage4": mk(n, 6, 2, 3)})
    return student, teacher


def targets_of(z_s, z_t, labels, mixing=True, evaluation=True):
    y, valid = one_hot_labels(labels, z_s.shape[1], IGNORE, z_s.dtype)
    return knowledge_targets(z_s, z_t, y, mixing, evaluation) + (valid,)


# --------------------------------------------------------------------------------- the pieces
def test_sigmoid_bce_is_eq5_and_one_hot_zero_at_ignore():
    z = randn(50, seed=1, scale=4)
    for y in (0.0, 1.0):
        got = sigmoid_bce(z, torch.full_like(z, y))
        assert torch.allclose(got, torch.tensor([bce(float(v), y) for v in z], dtype=torch.float64), rtol=1e-12)
    labels = odd_labels()
    y, valid = one_hot_labels(labels, 4, IGNORE, torch.float64)
    assert torch.equal(y.sum(1), valid.double()) and not valid[labels == IGNORE].any()
    assert y[0, 3].sum() == 1 and y[1, 3].sum() == 0  # the single-pixel class
    with pytest.raises(ValueError, match="num_classes"):
        one_hot_labels(torch.full((1, 2, 2), 4), 4, IGNORE, torch.float64)


@pytest.mark.parametrize("axis", ["spatial", "class"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_loss_matches_the_loop_reference_with_ignore_and_a_single_pixel_class(axis, tau):
    z_s, z_t, labels = randn(2, 4, 5, 7, seed=4, scale=2), randn(2, 4, 5, 7, seed=5, scale=2), odd_labels()
    z_hat, w, valid = targets_of(z_s, z_t, labels)
    got = float(hetero_kd(z_s, z_hat, w, valid, tau, axis))
    assert got == pytest.approx(reference_hkd(z_s, z_t, labels, tau, axis), rel=1e-6)


@pytest.mark.parametrize("mixing,evaluation", [(False, True), (True, False), (False, False)])
def test_ablations_match_the_reference(mixing, evaluation):
    z_s, z_t, labels = randn(2, 4, 5, 7, seed=6, scale=2), randn(2, 4, 5, 7, seed=7, scale=2), odd_labels()
    z_hat, w, valid = targets_of(z_s, z_t, labels, mixing=mixing, evaluation=evaluation)
    if not mixing:
        assert torch.equal(z_hat, z_t)
    if not evaluation:
        assert torch.equal(w, torch.ones_like(w))
    assert float(hetero_kd(z_s, z_hat, w, valid, 1.5, "spatial")) == pytest.approx(
        reference_hkd(z_s, z_t, labels, 1.5, mixing=mixing, evaluation=evaluation), rel=1e-6)


def test_kmm_kem_properties():
    z_s, z_t, labels = randn(2, 4, 5, 7, seed=8, scale=3), randn(2, 4, 5, 7, seed=9, scale=3), odd_labels()
    y, valid = one_hot_labels(labels, 4, IGNORE, torch.float64)
    h_s, h_t = sigmoid_bce(z_s, y), sigmoid_bce(z_t, y)
    s_t = h_s / (h_s + h_t)
    assert ((s_t >= 0) & (s_t <= 1)).all()
    z_hat, w = knowledge_targets(z_s, z_t, y, True, True)
    assert torch.allclose(z_hat, s_t * z_t + (1 - s_t) * z_s, rtol=1e-12)
    assert torch.allclose(w.sum(1), torch.ones(2, 5, 7, dtype=torch.float64), rtol=1e-12)  # W sums to 1
    # BCE is convex in Z and Zhat a convex combination: the mix is never less reliable than the worse
    h_hat = sigmoid_bce(z_hat, y)
    assert (h_hat <= torch.maximum(h_s, h_t) + 1e-12).all()
    # dH >= 0: W equals softmax(H_s + max(0, H_s - H_hat))
    assert torch.allclose(w, torch.softmax(h_s + (h_s - h_hat).clamp_min(0), 1), rtol=1e-12)


def test_identical_projections_need_no_mixing_and_have_zero_delta():
    z, labels = randn(2, 4, 5, 7, seed=10, scale=2), odd_labels()
    y, valid = one_hot_labels(labels, 4, IGNORE, torch.float64)
    z_hat, w = knowledge_targets(z, z.clone(), y, True, True)
    assert torch.allclose(z_hat, z, rtol=1e-14, atol=1e-14)            # Z^t = Z^s => Zhat^t = Z^t
    assert torch.allclose(w, torch.softmax(sigmoid_bce(z, y), 1), rtol=1e-12)  # dH = 0
    # the spatial CE then equals the W-weighted entropy of the softened map (the KL part is zero)
    p = torch.softmax((z / 2.0).masked_fill(~valid[:, None], -math.inf).flatten(2), -1).reshape_as(z)
    entropy = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p)) * w).sum() / (2 * 4)
    assert float(hetero_kd(z, z_hat, w, valid, 2.0, "spatial")) == pytest.approx(float(entropy), rel=1e-10)


def test_uniform_weights_without_ignore_reduce_to_cwd_cross_entropy():
    """W = 1, Zhat = Z^t, nothing ignored: L_hkd - L_hkd(Z^t, Z^t) = CWD(Z^s, Z^t) / tau^2 (spec 12.3)."""
    z_s, z_t = randn(2, 4, 5, 7, seed=11, scale=2), randn(2, 4, 5, 7, seed=12, scale=2)
    ones, valid = torch.ones_like(z_s), torch.ones(2, 5, 7, dtype=torch.bool)
    tau = 3.0
    ce = (float(hetero_kd(z_s, z_t, ones, valid, tau, "spatial"))
          - float(hetero_kd(z_t, z_t, ones, valid, tau, "spatial")))
    assert ce == pytest.approx(float(channel_wise_kd(z_s, z_t, tau)) / tau ** 2, rel=1e-10)


@pytest.mark.parametrize("axis", ["spatial", "class"])
def test_gradcheck_with_ignore_pixels(axis):
    labels = odd_labels(h=3, w=4)
    z_s = randn(2, 4, 3, 4, seed=13).requires_grad_(True)
    z_hat, w, valid = targets_of(z_s, randn(2, 4, 3, 4, seed=14), labels)
    assert torch.autograd.gradcheck(lambda z: hetero_kd(z, z_hat, w, valid, 1.7, axis), (z_s,))
    y, _ = one_hot_labels(labels, 4, IGNORE, torch.float64)
    assert torch.autograd.gradcheck(lambda z: mean_bce(z, y, valid), (z_s,))


def test_ignore_pixels_get_no_gradient_and_an_unlabelled_image_counts_zero():
    labels = odd_labels()
    labels[1] = IGNORE
    z_s = randn(2, 4, 5, 7, seed=15).requires_grad_(True)
    z_hat, w, valid = targets_of(z_s, randn(2, 4, 5, 7, seed=16), labels)
    loss = hetero_kd(z_s, z_hat, w, valid, 1.0, "spatial")
    loss.backward()
    assert math.isfinite(float(loss)) and (z_s.grad[:, :, ~valid[0]][0] == 0).all() and (z_s.grad[1] == 0).all()
    assert float(loss) == pytest.approx(reference_hkd(z_s.detach(), randn(2, 4, 5, 7, seed=16), labels, 1.0), rel=1e-6)
    nothing = torch.full_like(labels, IGNORE)
    z_hat, w, valid = targets_of(z_s, z_s, nothing)
    for axis in ("spatial", "class"):
        assert float(hetero_kd(z_s, z_hat, w, valid, 1.0, axis)) == 0.0


def test_mean_bce_matches_the_reference():
    z, labels = randn(2, 4, 5, 7, seed=17, scale=3), odd_labels()
    y, valid = one_hot_labels(labels, 4, IGNORE, torch.float64)
    assert float(mean_bce(z, y, valid)) == pytest.approx(reference_mean_bce(z, labels), rel=1e-6)


# ------------------------------------------------------------------------------------- method
def test_method_terms_equal_the_reference_for_heterogeneous_maps():
    """C_s = 3 at 3 x 4, C_t = 6 at 2 x 3, labels 9 x 11 (odd): projections by hand, then the loops."""
    m = method(tau=2.0)
    student, teacher = outputs()
    labels = odd_labels(h=9, w=11)
    terms = m.terms(student, teacher, Batch(None, labels), Progress(0, 10))
    assert set(terms) == {"hkd", "teacher_projector_bce", "student_projector_bce"}
    assert m.weights() == {"hkd": 1.0, "teacher_projector_bce": 1.0, "student_projector_bce": 1.0}
    up = lambda z: F.interpolate(z, size=(9, 11), mode="bilinear", align_corners=True)  # noqa: E731
    z_s = up(reference_projector(student.features["stage4"].detach(), m.student_projector[0].weight.detach()))
    z_t = up(reference_projector(teacher.features["stage4"].detach(), m.teacher_projector[0].weight.detach()))
    assert float(terms["hkd"].detach()) == pytest.approx(reference_hkd(z_s, z_t, labels, 2.0), rel=1e-6)
    assert float(terms["teacher_projector_bce"].detach()) == pytest.approx(reference_mean_bce(z_t, labels), rel=1e-6)
    assert float(terms["student_projector_bce"].detach()) == pytest.approx(reference_mean_bce(z_s, labels), rel=1e-6)


def test_method_at_the_logit_grid_class_axis_no_relu():
    m = method(size="logits", softmax_axis="class", projector="conv_bn", tau=1.5)
    student, teacher = outputs(grad=False)
    labels = odd_labels(h=9, w=11)
    terms = m.terms(student, teacher, Batch(None, labels), Progress(0, 10))
    to_grid = lambda z: F.interpolate(z, size=(3, 4), mode="bilinear", align_corners=True)  # noqa: E731
    z_s = reference_projector(student.features["stage4"], m.student_projector[0].weight.detach(), relu=False)
    z_t = to_grid(reference_projector(teacher.features["stage4"], m.teacher_projector[0].weight.detach(), relu=False))
    small = torch.tensor([[[int(labels[n, (i * 9) // 3, (j * 11) // 4]) for j in range(4)] for i in range(3)]
                          for n in range(2)])  # nearest: index floor(i * H_in / H_out)
    assert float(terms["hkd"]) == pytest.approx(reference_hkd(z_s, z_t, small, 1.5, "class"), rel=1e-6)
    assert len(m.student_projector) == 2  # conv, BN: no ReLU


def test_gradients_go_where_they_should():
    m = method()
    student, teacher = outputs()
    terms = m.terms(student, teacher, Batch(None, odd_labels(h=9, w=11)), Progress(0, 1))
    terms["hkd"].backward(retain_graph=True)
    assert student.features["stage4"].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.student_projector.parameters())
    assert all(p.grad is None for p in m.teacher_projector.parameters())  # Zhat^t, W detached
    student.features["stage4"].grad = None
    for p in m.parameters():
        p.grad = None
    terms["student_projector_bce"].backward(retain_graph=True)  # the probe: projector only
    assert student.features["stage4"].grad is None
    assert all(p.grad.abs().sum() > 0 for p in m.student_projector.parameters())
    terms["teacher_projector_bce"].backward()
    assert all(p.grad.abs().sum() > 0 for p in m.teacher_projector.parameters())
    assert teacher.features["stage4"].grad is None and student.logits.grad is None and teacher.logits.grad is None


def test_warmup_gives_a_connected_zero_then_distils():
    m = HeteroAKD({"warmup_fraction": 0.25}, context()).double()
    student, teacher = outputs()
    labels = odd_labels(h=9, w=11)
    # progress.fraction = iteration / total: 0.0, 0.2 -> warm-up; 0.25, 0.9 -> distillation
    for k, total, on in ((0, 10, False), (2, 10, False), (2, 8, True), (9, 10, True)):
        assert m.active(Progress(k, total)) is on
        hkd = m.terms(student, teacher, Batch(None, labels), Progress(k, total))["hkd"]
        assert (float(hkd) > 0) is on
        if not on:
            assert float(hkd) == 0.0 and hkd.requires_grad
            hkd.backward()
            assert student.features["stage4"].grad.abs().sum() == 0
    # the projector BCEs run during the warm-up
    assert set(m.terms(student, teacher, Batch(None, labels), Progress(0, 10))) == {
        "hkd", "teacher_projector_bce", "student_projector_bce"}


def test_supervision_choices():
    student, teacher = outputs(grad=False)
    batch = Batch(None, odd_labels(h=9, w=11))
    assert set(method(supervise="teacher").terms(student, teacher, batch, Progress(0, 1))) == {
        "hkd", "teacher_projector_bce"}
    assert set(method(supervise="none").weights()) == {"hkd"}
    assert set(method(projector_bce_weight=0.0).weights()) == {"hkd"}


def test_projector_init_replays_from_the_injected_generator_only():
    before = torch.get_rng_state()
    a = HeteroAKD({}, context(seed=3)).student_projector[0].weight.detach().clone()
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, HeteroAKD({}, context(seed=3)).student_projector[0].weight)
    assert not torch.equal(a, HeteroAKD({}, context(seed=4)).student_projector[0].weight)
    m = HeteroAKD({}, context())
    assert m.student_projector[0].weight.shape == (4, 3, 1, 1) and m.teacher_projector[0].weight.shape == (4, 6, 1, 1)


@pytest.mark.parametrize("cfg,match", [
    ({"softmax_axis": "pixel"}, "'method.heteroakd.softmax_axis' must be one of spatial, class"),
    ({"size": "image"}, "size"),
    ({"projector": "mlp"}, "projector"),
    ({"supervise": "student"}, "supervise"),
    ({"tau": 0.0}, "'method.heteroakd.tau' must be positive"),
    ({"warmup_fraction": 1.0}, r"warmup_fraction' must be in \[0, 1\)"),
    ({"warmup_fraction": -0.1}, "warmup_fraction"),
    ({"feature": "stage9"}, "'method.heteroakd.feature' must be one of stage1, .*, got 'stage9'"),
    ({"weight": -1.0}, "weight' must be >= 0"),
])
def test_bad_settings_are_refused_with_the_key_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        HeteroAKD(cfg, context())


# ------------------------------------------------------------------------- config and a real run
@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(harness.methods.METHODS, "heteroakd", HeteroAKD)


def test_yaml_defaults_validate(registered):
    from harness.config import load_config
    from harness.errors import ConfigError
    from harness.sweep.protocol import method_paths

    cfg = load_config(["+method=[kd,heteroakd]"])
    assert cfg["method"]["heteroakd"] == vars(HeteroAKD.Config())
    assert method_paths(cfg, "$temperatures") == {"method.heteroakd.tau": 1.0, "method.kd.tau": cfg["method"]["kd"]["tau"]}
    # the projector BCE trains the projectors (kind aux_weight): not tuned
    assert {"method.heteroakd.weight", "method.kd.weight"} == set(method_paths(cfg, "$weights"))
    with pytest.raises(ConfigError, match="warmup_fraction"):
        load_config(["+method=heteroakd", "method.heteroakd.warmup_fraction=soon"])


def test_distilled_run_reaches_every_module(tiny, registered, monkeypatch):
    """Student at output stride 16 (stage4 2 x 2 at 32 px crops), teacher at 8 (4 x 4), different
    channels; warm-up over after the first of 4 iterations."""
    from harness.config import load_config
    from harness.engine import train

    built = []

    def capture(cfg, ctx):
        methods = harness.methods.build_methods(cfg, ctx)
        built.extend(methods)
        return methods

    monkeypatch.setattr(train, "build_methods", capture)
    cfg = load_config(tiny("+method=heteroakd", "method.heteroakd.warmup_fraction=0.25", "student.output_stride=16"))
    record = train.run(cfg, teacher=teacher_for(cfg)).record
    assert record["status"] == "completed"
    terms = record["extra_json"]["last_loss_terms"]
    assert {"heteroakd.hkd", "heteroakd.teacher_projector_bce", "heteroakd.student_projector_bce"} <= set(terms)
    assert all(math.isfinite(v) for v in terms.values()) and terms["heteroakd.hkd"] > 0
    (m,) = built
    assert m.ctx.student_channels["stage4"] != m.ctx.teacher_channels["stage4"]
    for name, p in m.named_parameters():  # the last step's gradients are left in place
        assert p.grad is not None and p.grad.abs().sum() > 0, name
