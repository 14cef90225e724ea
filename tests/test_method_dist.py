"""DIST (spec section 8): inter/intra-class Pearson relations, aux-head terms, method."""
import math

import pytest
import torch

from harness.methods.base import Batch, MethodContext, Progress
from harness.methods.dist import DIST, dist_inter, dist_intra
from harness.models import SegOutput

torch.set_num_threads(1)


def _probs(z, tau):
    """Per-pixel softmax over classes by loops; returns a list of P rows of K floats (b, i, j order)."""
    b_, k_, h, w = z.shape
    z = z.double().tolist()
    rows = []
    for b in range(b_):
        for i in range(h):
            for j in range(w):
                x = [z[b][k][i][j] / tau for k in range(k_)]
                m = max(x)
                e = [math.exp(v - m) for v in x]
                rows.append([v / sum(e) for v in e])
    return rows


def _pearson(u, v):
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    du, dv = [a - mu for a in u], [b - mv for b in v]
    num = sum(a * b for a, b in zip(du, dv))
    return num / (math.sqrt(sum(a * a for a in du)) * math.sqrt(sum(b * b for b in dv)) + 1e-8)


def reference_dist(s, t, tau=1.0):
    """(inter, intra) straight from spec 8 (with the classification-form tau^2), float64 loops."""
    ys, yt = _probs(s, tau), _probs(t, tau)
    p, k = len(ys), len(ys[0])
    inter = 1 - sum(_pearson(ys[q], yt[q]) for q in range(p)) / p
    intra = 1 - sum(_pearson([r[c] for r in ys], [r[c] for r in yt]) for c in range(k)) / k
    return tau ** 2 * inter, tau ** 2 * intra


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_values_match_the_formula_on_odd_sizes(tau):
    s, t = randn(2, 5, 7, 9, seed=1, scale=3), randn(2, 5, 7, 9, seed=2, scale=3)
    inter, intra = reference_dist(s, t, tau)
    assert float(dist_inter(s, t, tau)) == pytest.approx(inter, rel=1e-6)
    assert float(dist_intra(s, t, tau)) == pytest.approx(intra, rel=1e-6)
    assert float(dist_inter(s.float(), t.float(), tau)) == pytest.approx(inter, rel=1e-4)
    assert float(dist_intra(s.float(), t.float(), tau)) == pytest.approx(intra, rel=1e-4)


def test_identical_inputs_give_zero_up_to_the_eps():
    s = randn(2, 5, 3, 5, seed=3, scale=2)
    inter, intra = reference_dist(s, s)  # nonzero only through the 1e-8 in the denominator
    assert 0 <= inter < 1e-5 and 0 <= intra < 1e-5
    assert float(dist_inter(s, s.clone(), 1.0)) == pytest.approx(inter, abs=1e-12)
    assert float(dist_intra(s, s.clone(), 1.0)) == pytest.approx(intra, abs=1e-12)
    other = randn(2, 5, 3, 5, seed=4, scale=2)
    assert float(dist_inter(s, other, 1.0)) > 0.1 and float(dist_intra(s, other, 1.0)) > 0.1


def test_invariant_to_per_pixel_logit_shifts():
    s, t = randn(2, 5, 3, 5, seed=5, scale=2), randn(2, 5, 3, 5, seed=6, scale=2)
    shift = randn(2, 1, 3, 5, seed=7, scale=10)
    for fn in (dist_inter, dist_intra):
        base = float(fn(s, t, 1.0))
        assert float(fn(s + shift, t, 1.0)) == pytest.approx(base, rel=1e-10)
        assert float(fn(s, t - shift, 1.0)) == pytest.approx(base, rel=1e-10)


def test_intra_term_depends_on_the_batch_composition_inter_does_not():
    """B=2 at once vs the two images alone: inter is a per-pixel mean (splits average exactly),
    intra correlates each class over all pixels of the batch (it does not)."""
    s, t = randn(2, 5, 3, 5, seed=8, scale=2), randn(2, 5, 3, 5, seed=9, scale=2)
    halves = [(s[i:i + 1], t[i:i + 1]) for i in range(2)]
    assert float(dist_inter(s, t, 1.0)) == pytest.approx(sum(float(dist_inter(a, b, 1.0)) for a, b in halves) / 2,
                                                    rel=1e-12)
    intra_split = sum(float(dist_intra(a, b, 1.0)) for a, b in halves) / 2
    assert abs(float(dist_intra(s, t, 1.0)) - intra_split) > 1e-3
    for a, b in halves:  # B = 1 against the loop reference too
        assert float(dist_intra(a, b, 1.0)) == pytest.approx(reference_dist(a, b)[1], rel=1e-6)


def test_gradcheck():
    s = randn(2, 4, 3, 5, seed=10).requires_grad_(True)
    t = randn(2, 4, 3, 5, seed=11).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: dist_inter(a, b, 2.0), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: dist_intra(a, b, 2.0), (s, t))


def test_teacher_of_another_spatial_size_is_resized_bilinearly():
    import torch.nn.functional as F

    s, t = randn(1, 4, 3, 5, seed=12), randn(1, 4, 6, 10, seed=13)
    t_small = F.interpolate(t, size=(3, 5), mode="bilinear", align_corners=False)
    assert float(dist_inter(s, t, 1.0)) == pytest.approx(reference_dist(s, t_small)[0], rel=1e-6)
    assert float(dist_intra(s, t, 1.0)) == pytest.approx(reference_dist(s, t_small)[1], rel=1e-6)


def ctx(seed=0):
    return MethodContext(5, 255, {"head": 3}, {"head": 8}, {"head": 6}, {"head": 8},
                         torch.Generator().manual_seed(seed))


def outputs(s_aux=True, t_aux=True, seed=20, h=5, w=7):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    student = SegOutput(mk(2, 5, h, w), mk(2, 5, h, w) if s_aux else None, {})
    teacher = SegOutput(mk(2, 5, h, w), mk(2, 5, h, w) if t_aux else None, {})
    return student, teacher


def batch(h=40, w=56, all_ignored=False):
    """Labels with ignore pixels (255) and a class (4) present at a single pixel; DIST ignores labels."""
    mask = torch.zeros(2, h, w, dtype=torch.long)
    mask[:, :, w // 2:] = 1
    mask[:, :6] = 255
    mask[0, 10, 10] = 4
    if all_ignored:
        mask[:] = 255
    return Batch(torch.zeros(2, 3, h, w), mask)


def test_method_total_matches_reference_with_aux_and_gradients_flow():
    m = DIST({"inter_weight": 2.0, "intra_weight": 0.5, "aux_weight": 0.4, "tau": 1.0}, ctx())
    student, teacher = outputs()
    terms = m.terms(student, teacher, batch(), Progress(0, 10))
    weights = m.weights()
    assert set(terms) == {"inter", "intra", "aux_inter", "aux_intra"}
    assert weights == {"inter": 2.0, "intra": 0.5, "aux_inter": pytest.approx(0.8),
                       "aux_intra": pytest.approx(0.2)}
    assert all(torch.isfinite(v) for v in terms.values())
    total = sum(weights[k] * v for k, v in terms.items())
    main = reference_dist(student.logits.detach(), teacher.logits.detach())
    aux = reference_dist(student.aux_logits.detach(), teacher.aux_logits.detach())
    expected = 2.0 * main[0] + 0.5 * main[1] + 0.4 * (2.0 * aux[0] + 0.5 * aux[1])
    assert float(total.detach()) == pytest.approx(expected, rel=1e-6)
    total.backward()
    assert student.logits.grad.abs().sum() > 0 and student.aux_logits.grad.abs().sum() > 0
    assert teacher.logits.grad is None and teacher.aux_logits.grad is None
    assert list(m.parameters()) == []


@pytest.mark.parametrize("s_aux,t_aux", [(False, True), (True, False), (False, False)])
def test_aux_terms_absent_when_either_model_has_no_aux_head(s_aux, t_aux):
    m = DIST({"inter_weight": 1.0, "intra_weight": 1.0, "aux_weight": 0.4, "tau": 1.0}, ctx())
    student, teacher = outputs(s_aux, t_aux)
    assert set(m.terms(student, teacher, batch(), Progress(0, 1))) == {"inter", "intra"}


def test_aux_weight_zero_skips_the_aux_terms():
    m = DIST({"aux_weight": 0.0}, ctx())
    assert set(m.terms(*outputs(), batch(), Progress(0, 1))) == {"inter", "intra"}


def test_labels_do_not_matter_and_no_randomness_is_used():
    m = DIST({}, ctx())
    gen_state = m.ctx.generator.get_state()
    rng_state = torch.get_rng_state()
    student, teacher = outputs()
    a = m.terms(student, teacher, batch(), Progress(0, 1))
    b = m.terms(student, teacher, batch(all_ignored=True), Progress(3, 5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(m.ctx.generator.get_state(), gen_state)
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_bad_tau_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        DIST({"tau": 0.0}, ctx())


def test_config_file_matches_the_schema(monkeypatch):
    from harness import methods
    from harness.config import load_config

    monkeypatch.setitem(methods.METHODS, "dist", DIST)
    cfg = load_config(["+method=dist", "method.dist.intra_weight=2"])
    assert cfg["method"]["dist"] == {**vars(DIST.Config()), "intra_weight": 2.0}
    assert vars(DIST.Config()) == {"inter_weight": 1.0, "intra_weight": 1.0, "aux_weight": 0.4, "tau": 1.0}


def test_negative_weights_are_rejected_by_the_config_validator(monkeypatch):
    from harness import methods
    from harness.config import load_config
    from harness.errors import ConfigError

    monkeypatch.setitem(methods.METHODS, "dist", DIST)
    for key in ("inter_weight", "intra_weight", "aux_weight"):
        with pytest.raises(ConfigError, match=f"method.dist.{key}' must be >= 0"):
            load_config(["+method=dist", f"method.dist.{key}=-1"])
