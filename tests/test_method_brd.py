"""BRD (spec section 11, paper 002): boundary targets, L_BD, L_RD (chunked), r(t), tau schedule, method."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harness.methods
from harness.methods.base import Batch, MethodContext, Progress
from harness.methods.brd import (BRD, boundary_kl, boundary_targets, decay_factor, relation_kl,
                                 split_channels)
from harness.models import SegOutput
from harness.engine.teacher import teacher_for

torch.set_num_threads(1)
IGNORE = 255


# ------------------------------------------------------------------------------ loop references
def log_softmax_list(xs):
    m = max(xs)
    z = math.log(sum(math.exp(x - m) for x in xs)) + m
    return [x - z for x in xs]


def kl_list(xt, xs):
    """KL(softmax(xt) || softmax(xs)) of two lists of logits."""
    lt, ls = log_softmax_list(xt), log_softmax_list(xs)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


def reference_boundary_kl(b_s, b_t, tau):
    """tau^2 / N sum_n KL(softmax_hw(b_t/tau) || softmax_hw(b_s/tau)), loops."""
    n_ = b_s.shape[0]
    total = 0.0
    for n in range(n_):
        xs = [float(v) / tau for v in b_s[n].reshape(-1).tolist()]
        xt = [float(v) / tau for v in b_t[n].reshape(-1).tolist()]
        total += kl_list(xt, xs)
    return tau ** 2 * total / n_


def reference_relation_kl(f_s, f_t, tau):
    """tau^2 / (N P) sum_{n,r} KL(row r of softmax(G^t/tau) || of softmax(G^s/tau)), G = X X^T / sqrt(d),
    every G entry a plain sum over channels."""
    n_, d_s, h, w = f_s.shape
    d_t = f_t.shape[1]
    total = 0.0
    for n in range(n_):
        xs = [[float(f_s[n, c, i // w, i % w]) for c in range(d_s)] for i in range(h * w)]
        xt = [[float(f_t[n, c, i // w, i % w]) for c in range(d_t)] for i in range(h * w)]
        for r in range(h * w):
            gs = [sum(a * b for a, b in zip(xs[r], xs[q])) / math.sqrt(d_s) / tau for q in range(h * w)]
            gt = [sum(a * b for a, b in zip(xt[r], xt[q])) / math.sqrt(d_t) / tau for q in range(h * w)]
            total += kl_list(gt, gs)
    return tau ** 2 * total / (n_ * h * w)


def reference_boundary_targets(mask, size):
    """Nearest labels (index floor(i * H_in / H_out)); boundary = valid with a valid, different
    label among the 8 in-image neighbours."""
    n_, hin, win = mask.shape
    h, w = size
    lab = [[[int(mask[n, (i * hin) // h, (j * win) // w]) for j in range(w)] for i in range(h)] for n in range(n_)]
    boundary = torch.zeros(n_, h, w, dtype=torch.float64)
    valid = torch.zeros(n_, h, w, dtype=torch.bool)
    for n in range(n_):
        for i in range(h):
            for j in range(w):
                own = lab[n][i][j]
                if own == IGNORE:
                    continue
                valid[n, i, j] = True
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        a, b = i + di, j + dj
                        if (di or dj) and 0 <= a < h and 0 <= b < w and lab[n][a][b] not in (IGNORE, own):
                            boundary[n, i, j] = 1.0
    return boundary, valid


def reference_bce(logit, target, valid):
    total, count = 0.0, 0
    for x, y, v in zip(logit.reshape(-1).tolist(), target.reshape(-1).tolist(), valid.reshape(-1).tolist()):
        if v:
            p = 1 / (1 + math.exp(-x))
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
            count += 1
    return total / count


def reference_avg_pool(x, k):
    """k x k windows, stride k, the last ones cut at the border (mean of the in-map entries)."""
    n_, c_, h, w = x.shape
    ho, wo = -(-h // k), -(-w // k)
    out = torch.zeros(n_, c_, ho, wo, dtype=torch.float64)
    for n in range(n_):
        for c in range(c_):
            for i in range(ho):
                for j in range(wo):
                    vals = [float(x[n, c, a, b]) for a in range(i * k, min(h, i * k + k))
                            for b in range(j * k, min(w, j * k + k))]
                    out[n, c, i, j] = sum(vals) / len(vals)
    return out


# ------------------------------------------------------------------------------------- helpers
def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


S_CH = {"stage1": 3, "stage2": 4, "stage3": 5, "stage4": 6, "head": 4}
T_CH = {"stage1": 5, "stage2": 7, "stage3": 9, "stage4": 11, "head": 8}


def context(seed=0, k=4):
    return MethodContext(num_classes=k, ignore_index=IGNORE, student_channels=S_CH,
                         student_strides={"stage1": 4, "stage2": 8, "stage3": 8, "stage4": 8, "head": 8},
                         teacher_channels=T_CH,
                         teacher_strides={"stage1": 4, "stage2": 8, "stage3": 16, "stage4": 16, "head": 16},
                         generator=torch.Generator().manual_seed(seed))


def odd_mask(n=2, h=37, w=53, seed=3):
    """Labels with regions of 3 classes, ignore pixels, and class 3 on a single grid pixel."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, h, w, dtype=torch.long)
    mask[:, :, w // 3:] = 1
    mask[:, h // 2:, 2 * w // 3:] = 2
    mask[torch.rand(n, h, w, generator=g) < 0.2] = IGNORE
    mask[:, :8, :8] = IGNORE
    mask[:, 22, 30] = 3  # nearest-resized to the 5 x 7 grid (rows 37i//5, cols 53j//7): pixel (3, 4) alone
    return mask


def outputs(n=2, seed=1, grad=True):
    """Student stages at 10x14 (stride 4) and 5x7; teacher stages 10x14, 5x7, 3x4, 3x4 (heterogeneous)."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda c, h, w: torch.randn(n, c, h, w, generator=g, dtype=torch.float64).requires_grad_(grad)  # noqa
    s = {"stage1": mk(3, 10, 14), "stage2": mk(4, 5, 7), "stage3": mk(5, 5, 7), "stage4": mk(6, 5, 7)}
    t = {"stage1": mk(5, 10, 14), "stage2": mk(7, 5, 7), "stage3": mk(9, 3, 4), "stage4": mk(11, 3, 4)}
    return SegOutput(mk(4, 5, 7), None, s), SegOutput(mk(4, 3, 4), None, t)


def method(seed=0, **cfg):
    return BRD(cfg, context(seed)).double()


def fused_by_hand(fusion, feats, stages, size):
    parts = []
    for conv, s in zip(fusion.convs, stages):
        y = F.conv2d(feats[s].detach(), conv.weight.detach(), conv.bias.detach(), padding=1)
        parts.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
    x = torch.cat(parts, 1)
    if fusion.norm is None:
        return x
    # BatchNorm in training mode: batch statistics over (N, h, w) per channel, biased variance
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    bn = fusion.norm
    return ((x - mean) / torch.sqrt(var + bn.eps) * bn.weight.detach()[None, :, None, None]
            + bn.bias.detach()[None, :, None, None])


# ----------------------------------------------------------------------------- boundary pieces
def test_boundary_targets_match_the_loop_reference_with_ignore_and_single_pixel_class():
    mask = odd_mask()
    got, valid = boundary_targets(mask, (5, 7), IGNORE)
    want, want_valid = reference_boundary_targets(mask, (5, 7))
    assert torch.equal(valid, want_valid) and torch.equal(got.double(), want)
    assert got[0, 3, 4] == 1 and valid[0, 3, 4]  # the single-pixel class is a boundary pixel
    assert not valid[:, 0, 0].any() and got[:, 0, 0].sum() == 0  # ignore: never a target
    assert 0 < got.sum() < valid.sum()


def test_boundary_targets_uniform_labels_have_no_boundary():
    mask = torch.full((1, 16, 24), 2, dtype=torch.long)
    mask[0, :4] = IGNORE  # an ignore neighbour does not make a boundary
    got, valid = boundary_targets(mask, (2, 3), IGNORE)
    assert got.sum() == 0 and valid[0, 1].all() and not valid[0, 0].any()


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_boundary_kl_matches_the_formula_on_odd_sizes(tau):
    b_s, b_t = randn(3, 5, 7, seed=1, scale=2), randn(3, 5, 7, seed=2, scale=2)
    assert float(boundary_kl(b_s, b_t, tau)) == pytest.approx(reference_boundary_kl(b_s, b_t, tau), rel=1e-6)


def test_boundary_kl_zero_for_identical_maps_and_invariant_to_a_constant_per_image():
    b = randn(2, 5, 7, seed=3)
    assert float(boundary_kl(b, b.clone(), 2.0)) == pytest.approx(0.0, abs=1e-12)
    other = randn(2, 5, 7, seed=4)
    base = float(boundary_kl(b, other, 2.0))
    assert base > 0
    assert float(boundary_kl(b + randn(2, 1, 1, seed=5, scale=9), other, 2.0)) == pytest.approx(base, rel=1e-10)


def test_boundary_kl_gradcheck():
    b_s = randn(2, 3, 5, seed=6).requires_grad_(True)
    b_t = randn(2, 3, 5, seed=7)
    assert torch.autograd.gradcheck(lambda x: boundary_kl(x, b_t, 1.7), (b_s,))


# ---------------------------------------------------------------------------- relation pieces
def plain_relation_kl(f_s, f_t, tau):
    """The same loss with full hw x hw maps and autograd (no blocks): the chunked path's oracle."""
    xs, xt = f_s.flatten(2).transpose(1, 2), f_t.flatten(2).transpose(1, 2)
    gs = xs @ xs.transpose(1, 2) / math.sqrt(xs.shape[2])
    gt = xt @ xt.transpose(1, 2) / math.sqrt(xt.shape[2])
    log_ps, log_pt = F.log_softmax(gs / tau, -1), F.log_softmax(gt / tau, -1)
    return tau ** 2 * (log_pt.exp() * (log_pt - log_ps)).sum() / (xs.shape[0] * xs.shape[1])


@pytest.mark.parametrize("tau,chunk", [(1.0, 1 << 22), (2.0, 30), (0.7, 1)])
def test_relation_kl_matches_the_formula_with_different_channels(tau, chunk):
    """d_s = 4, d_t = 6, 3 x 5 maps (P = 15); chunk 30 -> blocks of 2 rows (15 = 7 x 2 + 1), 1 -> 1 row."""
    f_s, f_t = randn(2, 4, 3, 5, seed=8), randn(2, 6, 3, 5, seed=9, scale=1.5)
    loss, rng = relation_kl(f_s, f_t, tau, chunk_entries=chunk, return_range=True)
    assert float(loss) == pytest.approx(reference_relation_kl(f_s, f_t, tau), rel=1e-6)
    xt = f_t.flatten(2).transpose(1, 2)
    p_t = torch.softmax(xt @ xt.transpose(1, 2) / math.sqrt(6) / tau, -1)
    assert rng == pytest.approx(float(p_t.max() - p_t.min()), rel=1e-12)


@pytest.mark.parametrize("chunk", [1 << 22, 30, 1])
def test_relation_kl_chunked_gradient_equals_the_full_map_gradient(chunk):
    f_s = randn(2, 4, 3, 5, seed=10).requires_grad_(True)
    f_t = randn(2, 6, 3, 5, seed=11)
    relation_kl(f_s, f_t, 1.3, chunk_entries=chunk).backward()
    got = f_s.grad.clone()
    f_s.grad = None
    plain_relation_kl(f_s, f_t, 1.3).backward()
    assert torch.allclose(got, f_s.grad, rtol=1e-10, atol=1e-13)


def test_relation_kl_gradcheck_and_teacher_is_detached():
    f_s = randn(2, 3, 3, 3, seed=12).requires_grad_(True)
    f_t = randn(2, 5, 3, 3, seed=13).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: relation_kl(x, f_t, 1.5, chunk_entries=20), (f_s,))
    relation_kl(f_s, f_t, 1.5).backward()
    assert f_t.grad is None


def test_relation_kl_zero_for_identical_and_invariant_to_channel_rotation():
    f = randn(2, 4, 3, 5, seed=14)
    assert float(relation_kl(f, f.clone(), 2.0)) == pytest.approx(0.0, abs=1e-12)
    q, _ = torch.linalg.qr(randn(4, 4, seed=15))  # G = X X^T does not see an orthogonal channel map
    rotated = torch.einsum("dc,nchw->ndhw", q, f)
    other = randn(2, 6, 3, 5, seed=16)
    assert float(relation_kl(rotated, other, 2.0)) == pytest.approx(float(relation_kl(f, other, 2.0)), rel=1e-10)
    assert float(relation_kl(f, rotated, 2.0)) == pytest.approx(0.0, abs=1e-10)


def test_relation_kl_refuses_mismatched_maps():
    with pytest.raises(ValueError, match="same N and h x w"):
        relation_kl(randn(2, 4, 3, 5), randn(2, 4, 3, 4), 1.0)


# ----------------------------------------------------------------------------- schedules
def test_decay_factor_at_chosen_progress_points():
    assert decay_factor(0, 40000) == 1.0                       # r(1) = 1
    assert decay_factor(39999, 40000) == pytest.approx(1 / 40000, rel=1e-12)  # r(t_max) = 1 / t_max
    assert decay_factor(20000, 40000) == pytest.approx(0.5, rel=1e-12)        # t = 20001
    assert decay_factor(3, 10) == pytest.approx(1 - 3 / 10)


class FixedMap(nn.Module):
    """Stands in for the teacher's boundary head: a fixed N x 1 x h x w logit map."""

    def __init__(self, logit):
        super().__init__()
        self.logit = logit

    def forward(self, x):
        return self.logit.to(x.dtype).expand(x.shape[0], -1, -1, -1)


def scheduled(peaked, **cfg):
    """BRD with the boundary term only and a teacher boundary map that is peaked (softmax range ~1 at
    any tau here) or flat (range 0)."""
    m = method(relation_weight=0.0, boundary_map="logit", **cfg)
    logit = torch.zeros(1, 1, 5, 7, dtype=torch.float64)
    if peaked:
        logit[0, 0, 2, 3] = 1000.0
    m.teacher_boundary = FixedMap(logit)
    return m


def step(m, k, total=100):
    s, t = outputs(grad=False)
    m.terms(s, t, Batch(None, odd_mask()), Progress(k, total))
    return m.last_tau


def test_tau_grows_by_the_factor_after_each_step_with_a_wide_range_and_is_capped():
    m = scheduled(peaked=True, temperature_cap=1.2)
    used = [step(m, k) for k in range(6)]
    want = [1.0, 1.05, 1.05 ** 2, 1.05 ** 3, 1.2, 1.2]  # 1.05^4 = 1.2155 > cap
    assert used == pytest.approx(want, rel=1e-12)
    assert m.last_range == pytest.approx(1.0, abs=1e-12)
    assert float(m.state_dict()["tau_now"]) == pytest.approx(1.2)


def test_tau_updates_once_per_iteration_not_in_eval_not_when_flat_or_constant():
    m = scheduled(peaked=True)
    assert [step(m, 0), step(m, 0), step(m, 1), step(m, 1), step(m, 2)] == pytest.approx(
        [1.0, 1.0, 1.05, 1.05, 1.05 ** 2])
    m.eval()  # the step owed by iteration 2 is still taken; eval steps ask for none
    assert [step(m, 3), step(m, 4)] == pytest.approx([1.05 ** 3, 1.05 ** 3])
    flat = scheduled(peaked=False)
    assert [step(flat, k) for k in range(3)] == [1.0, 1.0, 1.0] and flat.last_range == pytest.approx(0.0, abs=1e-12)
    const = scheduled(peaked=True, schedule="constant", tau=2.0)
    assert [step(const, k) for k in range(3)] == [2.0, 2.0, 2.0]


def test_range_is_measured_at_the_current_tau():
    """Teacher logits 0 and 3 on a 5 x 7 map: range of softmax(x / tau) falls below 0.5 once tau is large."""
    m = method(relation_weight=0.0, boundary_map="logit", temperature_cap=100.0, tau=1.0)
    logit = torch.zeros(1, 1, 5, 7, dtype=torch.float64)
    logit[0, 0, 0, 0] = 6.0
    m.teacher_boundary = FixedMap(logit)
    taus = [step(m, k) for k in range(40)]
    ranges = []
    for tau in taus:
        p = torch.softmax(logit.reshape(-1) / tau, 0)
        ranges.append(float(p.max() - p.min()))
    for k in range(1, 40):
        assert taus[k] == pytest.approx(taus[k - 1] * (1.05 if ranges[k - 1] > 0.5 else 1.0), rel=1e-12)
    assert taus[-1] == taus[-2] > 1.0 and ranges[-1] <= 0.5  # self-limiting


# ------------------------------------------------------------------------------------- method
def test_split_channels():
    assert split_channels(256, 4) == [64] * 4 and split_channels(10, 4) == [3, 3, 2, 2]


@pytest.mark.parametrize("fusion_norm", ["batch", "none"])
def test_method_terms_equal_the_reference_at_a_progress_point(fusion_norm):
    m = method(tau=1.5, boundary_supervision="both", relation_pool=1, channels=7, fusion_norm=fusion_norm)
    assert (m.student_fusion.norm is None) == (fusion_norm == "none")
    s, t = outputs()
    mask = odd_mask()
    progress = Progress(30, 120)
    terms = m.terms(s, t, Batch(None, mask), progress)
    assert set(terms) == {"boundary", "relation", "teacher_boundary_bce", "student_boundary_bce"}
    assert m.weights() == {"boundary": 10.0, "relation": 50.0, "teacher_boundary_bce": 1.0,
                           "student_boundary_bce": 1.0}
    stages = ["stage1", "stage2", "stage3", "stage4"]
    s_c = fused_by_hand(m.student_fusion, s.features, stages, (5, 7))
    t_c = fused_by_hand(m.teacher_fusion, t.features, stages, (5, 7))
    assert s_c.shape == (2, 7, 5, 7) and t_c.shape == (2, 7, 5, 7)
    hb = lambda conv, x: F.conv2d(x, conv.weight.detach(), conv.bias.detach())[:, 0]  # noqa: E731
    s_logit, t_logit = hb(m.student_boundary, s_c), hb(m.teacher_boundary, t_c)
    r = 1 - 30 / 120
    assert float(terms["boundary"]) == pytest.approx(
        r * reference_boundary_kl(torch.sigmoid(s_logit), torch.sigmoid(t_logit), 1.5), rel=1e-6)
    assert float(terms["relation"]) == pytest.approx(r * reference_relation_kl(s_c, t_c, 1.5), rel=1e-6)
    target, valid = reference_boundary_targets(mask, (5, 7))
    assert float(terms["teacher_boundary_bce"]) == pytest.approx(reference_bce(t_logit, target, valid), rel=1e-6)
    assert float(terms["student_boundary_bce"]) == pytest.approx(reference_bce(s_logit, target, valid), rel=1e-6)


def test_relation_pooling_and_logit_boundary_map():
    m = method(relation_pool=2, boundary_map="logit", decay=False, channels=5)
    s, t = outputs(grad=False)
    terms = m.terms(s, t, Batch(None, odd_mask()), Progress(50, 100))
    stages = ["stage1", "stage2", "stage3", "stage4"]
    s_c = fused_by_hand(m.student_fusion, s.features, stages, (5, 7))
    t_c = fused_by_hand(m.teacher_fusion, t.features, stages, (5, 7))
    assert float(terms["relation"]) == pytest.approx(
        reference_relation_kl(reference_avg_pool(s_c, 2), reference_avg_pool(t_c, 2), 1.0), rel=1e-6)
    hb = lambda conv, x: F.conv2d(x, conv.weight.detach(), conv.bias.detach())[:, 0]  # noqa: E731
    assert float(terms["boundary"]) == pytest.approx(  # decay off: r = 1
        reference_boundary_kl(hb(m.student_boundary, s_c), hb(m.teacher_boundary, t_c), 1.0), rel=1e-6)


def test_gradients_student_side_from_distillation_teacher_side_only_from_bce():
    m = method()
    s, t = outputs()
    terms = m.terms(s, t, Batch(None, odd_mask()), Progress(0, 10))
    assert set(terms) == {"boundary", "relation", "teacher_boundary_bce"}
    (10 * terms["boundary"] + 50 * terms["relation"]).backward(retain_graph=True)
    for name in ("stage1", "stage2", "stage3", "stage4"):
        assert s.features[name].grad.abs().sum() > 0 and t.features[name].grad is None
    for p in list(m.student_fusion.parameters()) + list(m.student_boundary.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in list(m.teacher_fusion.parameters()) + list(m.teacher_boundary.parameters()):
        assert p.grad is None  # detached inside L_BD / L_RD
    terms["teacher_boundary_bce"].backward()
    for p in list(m.teacher_fusion.parameters()) + list(m.teacher_boundary.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(t.features[name].grad is None for name in t.features)


def teacher_head_bce_trajectory(fusion_norm, steps=8, lr=0.01):
    """`teacher_boundary_bce` over SGD steps (momentum 0.9, the protocol's optimiser) of the
    teacher-side fusion and head alone, on teacher stages whose scale grows with depth as a
    briefly trained teacher's do (mean |x| ~ 2, 6, 21, 69 measured on the smoke teacher)."""
    m = method(channels=16, fusion_norm=fusion_norm)
    params = list(m.teacher_fusion.parameters()) + list(m.teacher_boundary.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    mask = odd_mask(n=4)
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        s, t = outputs(n=4, grad=False)
        for name, scale in zip(("stage1", "stage2", "stage3", "stage4"), (2.0, 6.0, 21.0, 69.0)):
            t.features[name] = (torch.randn(t.features[name].shape, generator=g, dtype=torch.float64)
                                .abs() * scale * 1.25)
        bce = m.terms(s, t, Batch(None, mask), Progress(0, 100))["teacher_boundary_bce"]
        out.append(float(bce))
        if not math.isfinite(out[-1]):
            break
        opt.zero_grad()
        bce.backward()
        opt.step()
    return out


def test_fusion_batchnorm_keeps_the_teacher_head_stable_where_the_bare_conv_diverges():
    """The cause of `harness train +method=brd budget=smoke` diverging (loss NaN at iteration 6):
    unnormalised teacher stages make the bare fused map large (rms 37 there), the head's BCE
    gradient scales with it and one SGD step at lr 0.01 throws the logits to 1e4. BatchNorm on X^c
    keeps the BCE near log 2."""
    bare = teacher_head_bce_trajectory("none")
    normed = teacher_head_bce_trajectory("batch")
    assert max(bare) > 100 or not all(math.isfinite(v) for v in bare), bare
    assert all(math.isfinite(v) and v < 2.0 for v in normed), normed


def test_switched_off_terms_are_not_computed_and_modules_not_built():
    m = method(boundary_weight=0.0)
    assert m.student_boundary is None and m.teacher_boundary is None
    s, t = outputs(grad=False)
    assert set(m.terms(s, t, Batch(None, odd_mask()), Progress(0, 1))) == {"relation"}
    assert m.weights() == {"relation": 50.0}
    m = method(boundary_bce_weight=0.0)
    assert set(m.weights()) == {"boundary", "relation"}
    m = method(boundary_supervision="none")
    assert set(m.terms(s, t, Batch(None, odd_mask()), Progress(0, 1))) == {"boundary", "relation"}


def test_module_init_replays_from_the_injected_generator_only():
    before = torch.get_rng_state()
    a = [p.detach().clone() for p in BRD({}, context(seed=5)).parameters()]
    assert torch.equal(torch.get_rng_state(), before)
    b = [p.detach().clone() for p in BRD({}, context(seed=5)).parameters()]
    c = [p.detach().clone() for p in BRD({}, context(seed=6)).parameters()]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
    # channel split of the fusion: 256 over 4 stages, 3x3 convs
    m = BRD({}, context())
    assert [conv.weight.shape for conv in m.teacher_fusion.convs] == [(64, c, 3, 3) for c in (5, 7, 9, 11)]


@pytest.mark.parametrize("cfg,match", [
    ({"schedule": "cosine"}, "'method.brd.schedule' must be one of range, constant"),
    ({"boundary_map": "edges"}, "boundary_map"),
    ({"boundary_supervision": "student"}, "boundary_supervision"),
    ({"tau": 0.0}, "'method.brd.tau' must be positive"),
    ({"growth": 0.9}, "growth"),
    ({"range_threshold": 0.0}, "range_threshold"),
    ({"tau": 4.0, "temperature_cap": 2.0}, "temperature_cap"),
    ({"stages": ["stage5"]}, r"'method.brd.stages' items must be among .*\['stage5'\]"),
    ({"stages": []}, "non-empty"),
    ({"channels": 0}, "channels"),
    ({"relation_pool": 0}, "relation_pool"),
    ({"relation_weight": -1.0}, "relation_weight' must be >= 0"),
])
def test_bad_settings_are_refused_with_the_key_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        BRD(cfg, context())


# ------------------------------------------------------------------------- config and a real run
@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(harness.methods.METHODS, "brd", BRD)


def test_yaml_defaults_validate(registered):
    from harness.config import load_config
    from harness.errors import ConfigError

    cfg = load_config(["+method=brd"])
    assert cfg["method"]["brd"] == vars(BRD.Config())  # the yaml states the schema's defaults
    with pytest.raises(ConfigError, match="relation_weight' must be >= 0"):
        load_config(["+method=brd", "method.brd.relation_weight=-1"])
    with pytest.raises(ConfigError, match="channels"):
        load_config(["+method=brd", "method.brd.channels=many"])


def test_sweep_sees_two_weights_and_one_temperature(registered):
    from harness.config import load_config
    from harness.sweep.protocol import method_paths

    cfg = load_config(["+method=brd"])
    assert method_paths(cfg, "$temperatures") == {"method.brd.tau": 1.0}
    # the boundary BCE trains the boundary heads (kind aux_weight): no distillation strength to tune
    assert set(method_paths(cfg, "$weights")) == {f"method.brd.{k}" for k in ("boundary_weight", "relation_weight")}


def test_distilled_run_reaches_every_module(tiny, registered, monkeypatch):
    from harness.config import load_config
    from harness.engine import train

    built = []

    def capture(cfg, ctx):
        methods = harness.methods.build_methods(cfg, ctx)
        built.extend(methods)
        return methods

    monkeypatch.setattr(train, "build_methods", capture)
    cfg = load_config(tiny("+method=brd", "method.brd.boundary_supervision=both", "method.brd.channels=16"))
    record = train.run(cfg, teacher=teacher_for(cfg)).record
    assert record["status"] == "completed"
    terms = record["extra_json"]["last_loss_terms"]
    assert {"brd.boundary", "brd.relation", "brd.teacher_boundary_bce", "brd.student_boundary_bce"} <= set(terms)
    assert all(math.isfinite(v) for v in terms.values())
    (m,) = built
    for name, p in m.named_parameters():  # the last step's gradients are left in place
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert m.last_tau >= 1.0
