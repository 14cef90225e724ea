"""Channel-wise distillation (spec section 3): value, closed-form gradient, projector, method."""
import math

import pytest
import torch
import torch.nn.functional as F

from harness.methods.base import Batch, MethodContext, Progress
from harness.methods.cwd import ChannelWiseKD, channel_wise_kd
from harness.models import SegOutput

torch.set_num_threads(1)


def reference_cwd(s, t, tau, divisor_channels=None):
    """Straight from spec 3.1, in float64 with plain loops:
    tau^2 / (N C) * sum_{n,c} sum_i pT_i (log pT_i - log pS_i), softmax over the h*w positions."""
    n_, c_, h, w = s.shape
    s, t = s.double().tolist(), t.double().tolist()
    total = 0.0
    for n in range(n_):
        for c in range(c_):
            xs = [s[n][c][i][j] / tau for i in range(h) for j in range(w)]
            xt = [t[n][c][i][j] / tau for i in range(h) for j in range(w)]
            ms, mt = max(xs), max(xt)
            zs = sum(math.exp(x - ms) for x in xs)
            zt = sum(math.exp(x - mt) for x in xt)
            for a, b in zip(xs, xt):
                log_ps = a - ms - math.log(zs)
                log_pt = b - mt - math.log(zt)
                total += math.exp(log_pt) * (log_pt - log_ps)
    return tau ** 2 * total / (n_ * (divisor_channels or c_))


def reference_project(s, weight):
    """1x1 conv without bias, by loops: out[n, o, i, j] = sum_c W[o, c] * s[n, c, i, j]."""
    n_, c_in, h, w = s.shape
    weight = weight.double().reshape(weight.shape[0], c_in)
    out = torch.zeros(n_, weight.shape[0], h, w, dtype=torch.float64)
    for n in range(n_):
        for o in range(weight.shape[0]):
            for i in range(h):
                for j in range(w):
                    out[n, o, i, j] = sum(float(weight[o, c]) * float(s[n, c, i, j]) for c in range(c_in))
    return out


def ctx(s_ch=None, t_ch=None, seed=0, k=5):
    s_ch = s_ch or {"head": 3, "stage4": 4}
    t_ch = t_ch or {"head": 6, "stage4": 4}
    return MethodContext(k, 255, s_ch, {n: 8 for n in s_ch}, t_ch, {n: 8 for n in t_ch},
                         torch.Generator().manual_seed(seed))


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_value_matches_the_formula_on_odd_sizes(tau):
    s, t = randn(2, 5, 7, 9, seed=1, scale=3), randn(2, 5, 7, 9, seed=2, scale=3)
    got = float(channel_wise_kd(s, t, tau))
    assert got == pytest.approx(reference_cwd(s, t, tau), rel=1e-6)
    # float32 input agrees within float precision
    assert float(channel_wise_kd(s.float(), t.float(), tau)) == pytest.approx(got, rel=1e-4)


def test_divisor_override_scales_by_channel_ratio():
    s, t = randn(2, 6, 3, 5, seed=3), randn(2, 6, 3, 5, seed=4)
    assert float(channel_wise_kd(s, t, 2.0, num_channels=3)) == pytest.approx(
        reference_cwd(s, t, 2.0, divisor_channels=3), rel=1e-6)
    assert float(channel_wise_kd(s, t, 2.0, num_channels=3)) == pytest.approx(
        2 * float(channel_wise_kd(s, t, 2.0)), rel=1e-12)


def test_zero_for_identical_maps_nonnegative_otherwise():
    s = randn(2, 4, 3, 5, seed=5, scale=2)
    assert float(channel_wise_kd(s, s.clone(), 4.0)) == pytest.approx(0.0, abs=1e-12)
    assert float(channel_wise_kd(s, randn(2, 4, 3, 5, seed=6), 4.0)) > 0


def test_invariant_to_a_constant_per_image_and_channel():
    """Adding c[n, c] to every position of S (or T) leaves the spatial softmax unchanged (spec 3.3)."""
    s, t = randn(2, 4, 3, 5, seed=7, scale=2), randn(2, 4, 3, 5, seed=8, scale=2)
    shift = randn(2, 4, 1, 1, seed=9, scale=10)
    base = float(channel_wise_kd(s, t, 3.0))
    assert float(channel_wise_kd(s + shift, t, 3.0)) == pytest.approx(base, rel=1e-10)
    assert float(channel_wise_kd(s, t - shift, 3.0)) == pytest.approx(base, rel=1e-10)
    # but not to a per-pixel shift across channels' positions (the softmax is spatial)
    pixel_shift = randn(2, 1, 3, 5, seed=10, scale=3)
    assert float(channel_wise_kd(s + pixel_shift, t, 3.0)) != pytest.approx(base, rel=1e-3)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_closed_form_gradient(tau):
    """dL/dS_{n,c,i} = tau / (N C) * (pS_{n,c,i} - pT_{n,c,i})   (spec 3.3)."""
    n, c, h, w = 2, 5, 3, 7
    s = randn(n, c, h, w, seed=11, scale=2).requires_grad_(True)
    t = randn(n, c, h, w, seed=12, scale=2)
    channel_wise_kd(s, t, tau).backward()
    p_s = torch.softmax(s.detach().reshape(n, c, -1) / tau, -1).reshape(n, c, h, w)
    p_t = torch.softmax(t.reshape(n, c, -1) / tau, -1).reshape(n, c, h, w)
    assert torch.allclose(s.grad, tau / (n * c) * (p_s - p_t), rtol=1e-10, atol=1e-14)


def test_gradcheck():
    s = randn(2, 3, 3, 5, seed=13).requires_grad_(True)
    t = randn(2, 3, 3, 5, seed=14).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: channel_wise_kd(a, b, 2.0), (s, t))


def test_stable_where_log_of_softmax_would_be_infinite():
    """The reference takes log(softmax); on a peaked map that is -inf. We use log_softmax (spec 3.1)."""
    s = torch.zeros(1, 2, 3, 3)
    s[0, 0, 0, 0] = 2000.0
    t = torch.zeros(1, 2, 3, 3)
    assert math.isfinite(float(channel_wise_kd(s, t, 1.0)))
    assert torch.isinf(torch.softmax(s.reshape(1, 2, -1), -1).log()).any()  # the reference's path


def test_teacher_of_another_spatial_size_is_resized_bilinearly():
    s, t = randn(1, 3, 4, 5, seed=15), randn(1, 3, 8, 10, seed=16)
    t_small = F.interpolate(t, size=(4, 5), mode="bilinear", align_corners=False)
    assert float(channel_wise_kd(s, t, 2.0)) == pytest.approx(reference_cwd(s, t_small, 2.0), rel=1e-6)


def outputs(k=5, cs=3, ct=6, h=5, w=7, seed=20, grad=True):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    s_logits, t_logits = mk(2, k, h, w).requires_grad_(grad), mk(2, k, h, w).requires_grad_(grad)
    s_feat, t_feat = mk(2, cs, h, w).requires_grad_(grad), mk(2, ct, h, w).requires_grad_(grad)
    return (SegOutput(s_logits, None, {"head": s_feat}), SegOutput(t_logits, None, {"head": t_feat}))


def batch(h=40, w=56):
    mask = torch.zeros(2, h, w, dtype=torch.long)
    mask[:, :5] = 255
    return Batch(torch.zeros(2, 3, h, w), mask)


@pytest.mark.parametrize("reference_divisor", [False, True])
def test_method_feature_term_with_projector_matches_reference(reference_divisor):
    m = ChannelWiseKD({"weight": 3.0, "tau": 4.0, "feature_weight": 50.0, "feature_tau": 2.0,
                       "feature": "head", "reference_divisor": reference_divisor}, ctx()).double()
    student, teacher = outputs()
    terms = m.terms(student, teacher, batch(), Progress(0, 10))
    assert set(terms) == {"logits", "feature"} and m.weights() == {"logits": 3.0, "feature": 50.0}
    projected = reference_project(student.features["head"].detach(), m.projector.weight.detach())
    expected = reference_cwd(projected, teacher.features["head"].detach(), 2.0,
                             divisor_channels=3 if reference_divisor else 6)
    assert float(terms["feature"].detach()) == pytest.approx(expected, rel=1e-6)
    assert float(terms["logits"].detach()) == pytest.approx(
        reference_cwd(student.logits.detach(), teacher.logits.detach(), 4.0), rel=1e-6)


def test_method_gradients_reach_student_and_projector_not_teacher():
    m = ChannelWiseKD({"weight": 3.0, "tau": 4.0, "feature_weight": 50.0, "feature_tau": 4.0,
                       "feature": "head", "reference_divisor": False}, ctx()).double()
    student, teacher = outputs()
    terms = m.terms(student, teacher, batch(), Progress(0, 10))
    assert all(torch.isfinite(v) for v in terms.values())
    sum(m.weights()[k] * v for k, v in terms.items()).backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
    assert student.features["head"].grad is not None and student.features["head"].grad.abs().sum() > 0
    assert m.projector.weight.grad is not None and m.projector.weight.grad.abs().sum() > 0
    assert teacher.logits.grad is None and teacher.features["head"].grad is None
    assert [n for n, _ in m.named_parameters()] == ["projector.weight"]
    assert m.projector.bias is None and m.projector.weight.shape == (6, 3, 1, 1)


def test_feature_term_off_by_default_no_projector():
    m = ChannelWiseKD({"weight": 3.0, "tau": 4.0}, ctx())
    assert m.projector is None and list(m.parameters()) == []
    student, teacher = outputs(grad=False)
    assert set(m.terms(student, teacher, batch(), Progress(0, 1))) == {"logits"}
    assert m.weights() == {"logits": 3.0}


def test_equal_channels_need_no_projector():
    m = ChannelWiseKD({"weight": 1.0, "tau": 1.0, "feature_weight": 1.0, "feature_tau": 1.0,
                       "feature": "stage4"}, ctx())
    assert m.projector is None
    g = torch.Generator().manual_seed(0)
    s = SegOutput(torch.randn(2, 5, 3, 5, generator=g), None, {"stage4": torch.randn(2, 4, 3, 5, generator=g)})
    t = SegOutput(torch.randn(2, 5, 3, 5, generator=g), None, {"stage4": torch.randn(2, 4, 3, 5, generator=g)})
    out = m.terms(s, t, batch(), Progress(0, 1))
    assert float(out["feature"]) == pytest.approx(reference_cwd(s.features["stage4"], t.features["stage4"], 1.0),
                                                  rel=1e-5)


def test_projector_init_replays_from_the_injected_generator_only():
    cfg = {"feature_weight": 1.0}
    before = torch.get_rng_state()
    a = ChannelWiseKD(cfg, ctx(seed=7)).projector.weight
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    b = ChannelWiseKD(cfg, ctx(seed=7)).projector.weight
    c = ChannelWiseKD(cfg, ctx(seed=8)).projector.weight
    assert torch.equal(a, b) and not torch.equal(a, c)
    # PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), replayed from the generator
    g = torch.Generator().manual_seed(7)
    bound = 1 / math.sqrt(3)
    expected = torch.empty(6, 3, 1, 1).uniform_(-bound, bound, generator=g)
    assert torch.allclose(a, expected)


def test_unknown_feature_and_bad_tau_are_rejected():
    with pytest.raises(ValueError, match="'method.cwd.feature' must be one of stage1, .*, got 'nosuch'"):
        ChannelWiseKD({"feature_weight": 1.0, "feature": "nosuch"}, ctx())
    with pytest.raises(ValueError, match="positive"):
        ChannelWiseKD({"feature_tau": 0.0}, ctx())


def test_config_file_matches_the_schema(monkeypatch):
    from harness import methods
    from harness.config import load_config

    monkeypatch.setitem(methods.METHODS, "cwd", ChannelWiseKD)
    cfg = load_config(["+method=cwd", "method.cwd.feature_weight=50"])
    defaults = ChannelWiseKD.Config()
    assert cfg["method"]["cwd"] == {**vars(defaults), "feature_weight": 50.0}
    assert (defaults.weight, defaults.tau, defaults.feature_weight) == (3.0, 4.0, 0.0)


def test_negative_weights_are_rejected_by_the_config_validator(monkeypatch):
    from harness import methods
    from harness.config import load_config
    from harness.errors import ConfigError

    monkeypatch.setitem(methods.METHODS, "cwd", ChannelWiseKD)
    for key in ("weight", "feature_weight"):
        with pytest.raises(ConfigError, match=f"method.cwd.{key}' must be >= 0"):
            load_config(["+method=cwd", f"method.cwd.{key}=-1"])
