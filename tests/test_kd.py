"""Pixel-wise KD (spec section 2): value and closed-form gradient."""
import math

import pytest
import torch

from harness.methods.kd import pixel_kd


def reference_kd(s, t, tau):
    """Straight from the formula: tau^2 / (B h w) * sum_pixels sum_k p_t (log p_t - log p_s)."""
    b, k, h, w = s.shape
    total = 0.0
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                ps = torch.softmax(s[bi, :, i, j].double() / tau, 0)
                pt = torch.softmax(t[bi, :, i, j].double() / tau, 0)
                total += float((pt * (pt.log() - ps.log())).sum())
    return tau ** 2 * total / (b * h * w)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_value_matches_the_formula(tau):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 3, 4, generator=g) * 3, torch.randn(2, 5, 3, 4, generator=g) * 3
    assert float(pixel_kd(s, t, tau)) == pytest.approx(reference_kd(s, t, tau), rel=1e-5)


def test_identical_logits_give_zero_and_the_loss_is_nonnegative():
    s = torch.randn(2, 4, 3, 3)
    assert float(pixel_kd(s, s.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(pixel_kd(s, torch.randn(2, 4, 3, 3), 2.0)) > 0


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_closed_form_gradient(tau):
    """dL/dZ^s = tau * (softmax(Z^s/tau) - softmax(Z^t/tau)) / (B h w)   (spec 2.4)."""
    b, k, h, w = 2, 6, 3, 5
    s = torch.randn(b, k, h, w, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, k, h, w, dtype=torch.float64)
    pixel_kd(s, t, tau).backward()
    expected = tau * (torch.softmax(s.detach() / tau, 1) - torch.softmax(t / tau, 1)) / (b * h * w)
    assert torch.allclose(s.grad, expected, atol=1e-12)


def test_teacher_receives_no_gradient_through_the_method():
    from harness.methods import Batch, MethodContext, Progress
    from harness.methods.kd import PixelKD
    from harness.models import SegOutput

    ctx = MethodContext(3, 255, {}, {}, {}, {}, torch.Generator())
    m = PixelKD({"weight": 0.5, "tau": 2.0}, ctx)
    s = torch.randn(1, 3, 2, 2, requires_grad=True)
    t = torch.randn(1, 3, 2, 2, requires_grad=True)
    terms = m.terms(SegOutput(s, None, {}), SegOutput(t, None, {}), Batch(None, None), Progress(0, 1))
    terms["kd"].backward()
    assert t.grad is None and s.grad is not None
    assert m.weights() == {"kd": 0.5}


def test_teacher_logits_of_another_size_are_resized():
    s, t = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 8, 8)
    assert math.isfinite(float(pixel_kd(s, t, 1.0)))
