"""Af-DCD (spec section 9): tokens, both terms and the whole method against loop-based float64
references, injected mask randomness, gradient clipping, config checks, a real run."""
import math

import pytest
import torch

import harness.methods
from harness.methods.afdcd import (AfDCD, contrastive_loss, feature_distillation, keep_mask, to_tokens)
from harness.methods.base import Batch, MethodContext, Progress
from harness.models import SegOutput
from harness.engine.teacher import teacher_for

torch.set_num_threads(1)
IGNORE = 255


# ------------------------------------------------------------------------- loop-based references
def reference_max_pool(x, k):
    """x: nested list b, c, h, w -> kernel = stride = k, floor mode."""
    if k == 1:
        return x
    h, w = len(x[0][0]), len(x[0][0][0])
    return [[[[max(ch[i * k + di][j * k + dj] for di in range(k) for dj in range(k))
               for j in range(w // k)] for i in range(h // k)] for ch in img] for img in x]


def reference_ctr(g, t, tau, groups, pool, patch):
    """Spec 9 with plain loops: pool, crop to patch multiples, per patch and anchor (p, m): positive
    = teacher token (p, m), negatives = teacher tokens (q, n) with n != m (any q); similarity = -L1;
    CE summed over anchors, / (B h' w')."""
    g = reference_max_pool(g.double().tolist(), pool)
    t = reference_max_pool(t.double().tolist(), pool)
    b_, c_ = len(g), len(g[0])
    h, w = len(g[0][0]), len(g[0][0][0])
    h, w = h - h % patch, w - w % patch
    cg = c_ // groups
    positions = [(r, q) for r in range(patch) for q in range(patch)]

    def token(x, b, pi, pj, pos, m):
        r, q = pos
        return [x[b][m * cg + k][pi * patch + r][pj * patch + q] for k in range(cg)]

    total = 0.0
    for b in range(b_):
        for pi in range(h // patch):
            for pj in range(w // patch):
                for p in positions:
                    for m in range(groups):
                        anchor = token(g, b, pi, pj, p, m)

                        def sim(pos, n):
                            return -sum(abs(a - z) for a, z in zip(anchor, token(t, b, pi, pj, pos, n))) / tau
                        logits = [sim(p, m)] + [sim(q, n) for q in positions for n in range(groups) if n != m]
                        assert len(logits) == 1 + patch * patch * (groups - 1)
                        top = max(logits)
                        total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[0]
    return total / (b_ * h * w)


def reference_fd(g, t):
    g, t = g.double().flatten(1).tolist(), t.double().flatten(1).tolist()
    return sum((a - z) ** 2 for gi, ti in zip(g, t) for a, z in zip(gi, ti)) / len(g)


def reference_conv(x, weight, bias):
    """Zero-padded 'same' convolution (odd kernel), stride 1, by loops, float64."""
    b_, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    x, weight, bias = x.double().tolist(), weight.double().tolist(), bias.double().tolist()
    out = torch.zeros(b_, c_out, h, w, dtype=torch.float64)
    for b in range(b_):
        for o in range(c_out):
            for i in range(h):
                for j in range(w):
                    acc = bias[o]
                    for c in range(c_in):
                        for di in range(kh):
                            for dj in range(kw):
                                y, z = i + di - kh // 2, j + dj - kw // 2
                                if 0 <= y < h and 0 <= z < w:
                                    acc += weight[o][c][di][dj] * x[b][c][y][z]
                    out[b, o, i, j] = acc
    return out


def reference_generate(m, s, keep):
    """G by loops from the method's own (detached) parameters: align, mask, projector."""
    c = lambda x, layer: reference_conv(x, layer.weight.detach(), layer.bias.detach())  # noqa: E731
    if m.align is not None:
        s = c(s, m.align)
    s = s * keep.double()
    if m.cfg["projector"] == "plain":
        return c(c(s, m.projector[0]).clamp(min=0), m.projector[2])
    p = m.projector
    x1 = c(s, p.block1[0]).clamp(min=0)
    x2 = c(x1, p.block2[0]).clamp(min=0)
    return (c(x1, p.adaptor1) + c(x2, p.adaptor2)) / 2


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ------------------------------------------------------------------------------- tokens and terms
def test_token_order_on_an_arange_tensor():
    """Token (patch, position * M + group, k) = x[b, group * C/M + k, patch row * P + r, patch col * P + q]."""
    b, c, h, w, patch, groups = 2, 6, 4, 6, 2, 3
    x = torch.arange(b * c * h * w).reshape(b, c, h, w)
    tok = to_tokens(x, patch, groups)
    assert tok.shape == (b * 2 * 3, patch * patch * groups, c // groups)
    cg = c // groups
    for bi in range(b):
        for pi in range(h // patch):
            for pj in range(w // patch):
                row = (bi * (h // patch) + pi) * (w // patch) + pj
                for r in range(patch):
                    for q in range(patch):
                        for m in range(groups):
                            expected = [int(x[bi, m * cg + k, pi * patch + r, pj * patch + q]) for k in range(cg)]
                            assert tok[row, (r * patch + q) * groups + m].tolist() == expected


@pytest.mark.parametrize("shape,groups,pool,patch", [((2, 6, 9, 11), 3, 2, 2), ((1, 4, 5, 7), 2, 1, 2),
                                                      ((2, 6, 4, 4), 2, 1, 4)])
@pytest.mark.parametrize("tau", [0.07, 1.0])
def test_contrastive_term_matches_the_loop_reference(shape, groups, pool, patch, tau):
    g, t = randn(*shape, seed=1), randn(*shape, seed=2)
    got = float(contrastive_loss(g, t, tau, groups, pool, patch))
    assert got == pytest.approx(reference_ctr(g, t, tau, groups, pool, patch), rel=1e-6)
    assert float(contrastive_loss(g.float(), t.float(), tau, groups, pool, patch)) == pytest.approx(got, rel=1e-4)


def test_logit_count_per_anchor_at_the_reference_setting():
    """16 x 16 tokens per 4 x 4 patch: 1 positive + 16 * 15 = 240 negatives (spec 9)."""
    g, t = randn(1, 32, 4, 4, seed=3), randn(1, 32, 4, 4, seed=4)
    got = float(contrastive_loss(g, t, 0.07, 16, 1, 4))
    assert got == pytest.approx(reference_ctr(g, t, 0.07, 16, 1, 4), rel=1e-6)  # asserts 241 logits inside


def test_feature_term_value_and_zero_for_identical_maps():
    g, t = randn(2, 3, 5, 7, seed=5), randn(2, 3, 5, 7, seed=6)
    assert float(feature_distillation(g, t)) == pytest.approx(reference_fd(g, t), rel=1e-12)
    assert float(feature_distillation(t.clone(), t)) == 0.0


def test_contrastive_properties():
    g, t = randn(2, 6, 6, 6, seed=7), randn(2, 6, 6, 6, seed=8)
    base = float(contrastive_loss(g, t, 0.5, 3, 1, 2))
    # a common shift leaves every L1 distance (and the max-pool order) unchanged
    assert float(contrastive_loss(g + 3.0, t + 3.0, 0.5, 3, 2, 2)) == pytest.approx(
        float(contrastive_loss(g, t, 0.5, 3, 2, 2)), rel=1e-10)
    # scaling both maps and tau together changes nothing
    assert float(contrastive_loss(4 * g, 4 * t, 2.0, 3, 1, 2)) == pytest.approx(base, rel=1e-10)
    # generated == teacher: every positive has the largest similarity (0), so the loss is below the
    # uniform-logit value log(1 + N2 (M - 1)) and below a random pair's
    same = float(contrastive_loss(t.clone(), t, 0.5, 3, 1, 2))
    assert 0 < same < math.log(1 + 4 * 2) and same < base


def test_small_maps_adapt_pooling_then_patch():
    """6x6 with pool 4 / patch 4 (64 px CPU crops give 8x8 stage4 maps): pooling is reduced to 1
    (6 // 2 = 3 < 4), then the patch to what fits; the value equals the explicit call."""
    from harness.methods.afdcd import fitted_sizes, pooled_and_cropped

    assert fitted_sizes(6, 6, 4, 4) == (1, 4)
    assert fitted_sizes(8, 8, 4, 4) == (2, 4)
    assert fitted_sizes(3, 5, 4, 4) == (1, 3)
    assert fitted_sizes(64, 128, 4, 4) == (4, 4)          # the papers' sizes are untouched
    g, t = randn(1, 4, 6, 6, seed=1), randn(1, 4, 6, 6, seed=2)
    assert float(contrastive_loss(g, t, 0.07, 2, 4, 4)) == float(contrastive_loss(g, t, 0.07, 2, 1, 4))
    with pytest.raises(ValueError, match="pool_size"):   # the low-level helper still refuses
        pooled_and_cropped(g, 4, 4)


def test_gradcheck_terms():
    g = randn(1, 4, 5, 5, seed=9).requires_grad_(True)
    t = randn(1, 4, 5, 5, seed=10).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: contrastive_loss(a, b, 0.5, 2, 1, 2), (g, t))
    assert torch.autograd.gradcheck(lambda a, b: contrastive_loss(a, b, 0.5, 2, 2, 2), (g, t))
    assert torch.autograd.gradcheck(feature_distillation, (g, t))


# ---------------------------------------------------------------------------------------- masks
def test_random_mask_replays_from_the_generator_and_zeroes_the_ratio():
    a = keep_mask(2, 5, 7, 0.75, "random", torch.Generator().manual_seed(0))
    b = keep_mask(2, 5, 7, 0.75, "random", torch.Generator().manual_seed(0))
    c = keep_mask(2, 5, 7, 0.75, "random", torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (2, 1, 5, 7)
    u = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, (u <= 0.25).float())  # zeroed where u > 1 - ratio, as the code
    big = keep_mask(4, 64, 64, 0.75, "random", torch.Generator().manual_seed(0))
    assert abs(float(big.mean()) - 0.25) < 0.02
    assert float(keep_mask(1, 9, 9, 0.0, "random", torch.Generator()).min()) == 1.0
    assert float(keep_mask(1, 9, 9, 1.0, "random", torch.Generator()).max()) == 0.0


def test_centre_mask_zeroes_the_middle_third_and_draws_nothing():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    keep = keep_mask(2, 9, 12, 0.75, "centre", g)
    assert torch.equal(g.get_state(), state)
    expected = torch.ones(9, 12)
    expected[3:6, 4:8] = 0
    assert torch.equal(keep[0, 0], expected) and torch.equal(keep[1, 0], expected)


# ---------------------------------------------------------------------------------- the method
def context(cs=3, ct=6, seed=0, feature="stage4"):
    chans_s, chans_t = {feature: cs, "head": 8}, {feature: ct, "head": 8}
    return MethodContext(5, IGNORE, chans_s, {n: 8 for n in chans_s}, chans_t, {n: 8 for n in chans_t},
                         torch.Generator().manual_seed(seed))


def outputs(cs=3, ct=6, h=5, w=7, seed=20, teacher_size=None):
    th, tw = teacher_size or (h, w)
    s = SegOutput(randn(2, 5, h, w, seed=seed), None, {"stage4": randn(2, cs, h, w, seed=seed + 1).requires_grad_(True)})
    t = SegOutput(randn(2, 5, th, tw, seed=seed + 2), None,
                  {"stage4": randn(2, ct, th, tw, seed=seed + 3).requires_grad_(True)})
    return s, t, Batch(torch.zeros(2, 3, 8 * h, 8 * w), torch.zeros(2, 8 * h, 8 * w, dtype=torch.long))


BASE = {"groups": 3, "pool_size": 1, "patch_size": 2, "tau": 0.5, "fd_weight": 1.0, "ctr_weight": 1.0}


@pytest.mark.parametrize("projector,cs", [("plain", 3), ("enhanced", 3), ("plain", 6)])
def test_method_equals_the_loop_reference_with_the_replayed_mask(projector, cs):
    m = AfDCD({**BASE, "projector": projector}, context(cs=cs, seed=5)).double()
    assert (m.align is None) == (cs == 6)
    student, teacher, batch = outputs(cs=cs)
    state = m.ctx.generator.get_state()
    terms = m.terms(student, teacher, batch, Progress(0, 1))
    keep = keep_mask(2, 5, 7, 0.75, "random", torch.Generator().set_state(state))
    g = reference_generate(m, student.features["stage4"].detach(), keep)
    t = teacher.features["stage4"].detach()
    assert float(terms["fd"].detach()) == pytest.approx(reference_fd(g, t), rel=1e-6)
    assert float(terms["ctr"].detach()) == pytest.approx(reference_ctr(g, t, 0.5, 3, 1, 2), rel=1e-6)


def test_same_seed_same_losses_other_seed_other_losses_global_rng_untouched():
    def losses(seed, global_seed):
        torch.manual_seed(global_seed)
        m = AfDCD(BASE, context(seed=seed)).double()
        out = []
        for step in range(2):  # two steps: two successive masks
            student, teacher, batch = outputs(seed=20 + step)
            out.append({k: float(v.detach()) for k, v in m.terms(student, teacher, batch, Progress(step, 2)).items()})
        return out

    before = torch.get_rng_state()
    AfDCD(BASE, context(seed=0)).double().terms(*outputs(), Progress(0, 1))
    assert torch.equal(torch.get_rng_state(), before)
    assert losses(3, 0) == losses(3, 99)
    assert losses(3, 0) != losses(4, 0)
    assert losses(3, 0)[0] != losses(3, 0)[1]  # the mask changes from step to step


def test_module_init_replays_from_the_generator():
    a, b, c = (AfDCD(BASE, context(seed=s)) for s in (7, 7, 8))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    bound = 1 / math.sqrt(6 * 9)  # default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    w = a.projector[0].weight.detach()
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.8 * bound


def test_gradients_reach_student_and_modules_never_the_teacher():
    m = AfDCD({**BASE, "grad_clip_norm": 0.0}, context()).double()
    student, teacher, batch = outputs(teacher_size=(10, 14))  # teacher at another size: resized
    terms = m.terms(student, teacher, batch, Progress(0, 1))
    assert set(terms) == {"fd", "ctr"} and m.weights() == {"fd": 1.0, "ctr": 1.0}
    sum(m.weights()[k] * v for k, v in terms.items()).backward()
    assert student.features["stage4"].grad.abs().sum() > 0
    assert teacher.features["stage4"].grad is None
    names = [n for n, _ in m.named_parameters()]
    assert names == ["align.weight", "align.bias", "projector.0.weight", "projector.0.bias",
                     "projector.2.weight", "projector.2.bias"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_gradcheck_through_the_method():
    m = AfDCD({**BASE, "grad_clip_norm": 0.0, "mask_ratio": 0.5}, context()).double()
    student, teacher, batch = outputs(h=4, w=4)

    def loss(s):
        m.ctx.generator.manual_seed(11)  # the same mask on every evaluation
        out = SegOutput(student.logits, None, {"stage4": s})
        return sum(v for v in m.terms(out, teacher, batch, Progress(0, 1)).values())
    assert torch.autograd.gradcheck(loss, (student.features["stage4"].detach().clone().requires_grad_(True),))


def test_module_gradients_are_clipped_to_the_norm_once_per_backward():
    student, teacher, batch = outputs()
    free = AfDCD({**BASE, "grad_clip_norm": 0.0}, context(seed=1)).double()
    clipped = AfDCD({**BASE, "grad_clip_norm": 1e-3}, context(seed=1)).double()
    grads = {}
    for name, m in (("free", free), ("clipped", clipped)):
        for step in range(2):  # a second step re-arms the count
            s = student.features["stage4"].detach().clone().requires_grad_(True)
            m.zero_grad(set_to_none=True)
            m.ctx.generator.manual_seed(0)
            out = m.terms(SegOutput(student.logits, None, {"stage4": s}), teacher, batch, Progress(step, 2))
            sum(out.values()).backward()
        grads[name] = ([p.grad.clone() for p in m.parameters()], s.grad.clone())
    free_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads["free"][0]]))
    assert float(free_norm) > 1e-2
    scale = 1e-3 / (float(free_norm) + 1e-6)  # clip_grad_norm_'s factor
    for f, c in zip(grads["free"][0], grads["clipped"][0]):
        assert torch.allclose(c, f * scale, rtol=1e-10, atol=1e-15)
    assert torch.equal(grads["free"][1], grads["clipped"][1])  # the student's gradient is not clipped


def test_switched_off_terms_are_not_computed():
    m = AfDCD({**BASE, "ctr_weight": 0.0}, context()).double()
    student, teacher, batch = outputs(h=3, w=3)  # too small for a contrastive patch at pool 4 / patch 4
    m.cfg.update(pool_size=4, patch_size=4)
    assert set(m.terms(student, teacher, batch, Progress(0, 1))) == {"fd"} and m.weights() == {"fd": 1.0}
    m.cfg.update(ctr_weight=1.0)                  # on: computed (with pooling and patch fitted to 3x3)
    assert set(m.terms(student, teacher, batch, Progress(0, 1))) == {"fd", "ctr"}


@pytest.mark.parametrize("cfg,match", [
    ({"mask_mode": "block"}, "mask_mode"), ({"projector": "deep"}, "projector"), ({"tau": 0.0}, "tau"),
    ({"mask_ratio": 1.5}, "mask_ratio"), ({"groups": 4}, "groups"), ({"groups": 1}, "groups"),
    ({"pool_size": 0}, "pool_size"), ({"patch_size": 0}, "patch_size"), ({"feature": "neck"}, "feature"),
    ({"fd_weight": -1.0}, "fd_weight"), ({"grad_clip_norm": -1.0}, "grad_clip_norm")])
def test_bad_settings_are_refused_with_the_key_named(cfg, match):
    with pytest.raises(ValueError, match=match):
        AfDCD({**BASE, **cfg}, context())


# ------------------------------------------------------------------------- config and a real run
@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(harness.methods.METHODS, "afdcd", AfDCD)


def test_yaml_states_the_schema_defaults_and_the_validator_checks(registered):
    from harness.config import load_config
    from harness.errors import ConfigError

    cfg = load_config(["+method=[kd,afdcd]"])
    assert cfg["method"]["afdcd"] == vars(AfDCD.Config())
    defaults = AfDCD.Config()
    assert (defaults.tau, defaults.groups, defaults.pool_size, defaults.patch_size, defaults.mask_ratio) == (
        0.07, 16, 4, 4, 0.75)
    with pytest.raises(ConfigError, match="method.afdcd.ctr_weight' must be >= 0"):
        load_config(["+method=afdcd", "method.afdcd.ctr_weight=-1"])
    with pytest.raises(ConfigError, match="method.afdcd.tau' must be positive"):
        load_config(["+method=afdcd", "method.afdcd.tau=0"])
    with pytest.raises(ConfigError, match="method.afdcd.groups"):
        load_config(["+method=afdcd", "method.afdcd.groups=many"])


def test_distilled_run_trains_the_method_modules(tiny, registered, monkeypatch):
    from harness.config import load_config
    from harness.engine import train

    built = []
    real_build = train.build_methods

    def capture(*args, **kwargs):
        built.extend(real_build(*args, **kwargs))
        return built

    monkeypatch.setattr(train, "build_methods", capture)
    # tiny crops give a 4 x 4 stage4 map: no pooling, one 4 x 4 patch per image
    cfg = load_config(tiny("+method=[kd,afdcd]", "method.afdcd.pool_size=1", "method.afdcd.fd_weight=1e-3"))
    result = train.run(cfg, teacher=teacher_for(cfg))
    assert result.record["status"] == "completed"
    terms = result.record["extra_json"]["last_loss_terms"]
    assert {"afdcd.fd", "afdcd.ctr"} <= set(terms) and all(math.isfinite(v) for v in terms.values())
    (afdcd,) = [m for m in built if m.name == "afdcd"]
    assert afdcd.align is not None  # student stage4 has fewer channels than the teacher's
    params = list(afdcd.named_parameters())
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                          for _, p in params)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for _, p in params]))
    assert float(total) <= 15.0 * (1 + 1e-5)
