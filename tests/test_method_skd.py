"""SKD (spec sections 4 and 5): pair-wise affinity term, discriminator, adversarial losses, method."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import harness.methods
from harness.methods.base import Batch, MethodContext, Progress
from harness.methods.skd import (SKD, Discriminator, SelfAttention, SpectralNormConv2d, generator_loss,
                                 gradient_penalty, hinge_d_loss, pairwise_distillation, pool_kernel_size,
                                 wgan_d_loss)
from harness.models import SegOutput
from harness.engine.teacher import teacher_for

torch.set_num_threads(1)


# ------------------------------------------------------------------------ float64 references
def reference_kernel(h, w, pool_kernel):
    """Spec 4.1/4.2: fraction -> (floor(s h), floor(s w)) (at least 1); integer k -> k x k; clipped."""
    if pool_kernel < 1:
        kh, kw = math.floor(pool_kernel * h), math.floor(pool_kernel * w)
    else:
        kh = kw = int(pool_kernel)
    return max(1, min(kh, h)), max(1, min(kw, w))


def reference_nodes(x, pool_kernel):
    """One image, C x h x w nested lists -> list of node vectors: max over each kernel x kernel
    window, stride = kernel, ceil mode (the last window may be cut by the border)."""
    c, h, w = len(x), len(x[0]), len(x[0][0])
    kh, kw = reference_kernel(h, w, pool_kernel)
    nodes = []
    for i in range(math.ceil(h / kh)):
        for j in range(math.ceil(w / kw)):
            rows, cols = range(i * kh, min(i * kh + kh, h)), range(j * kw, min(j * kw + kw, w))
            nodes.append([max(x[ch][a][b] for a in rows for b in cols) for ch in range(c)])
    return nodes


def reference_pairwise(s, t, pool_kernel, detach_norm):
    """L_PA = 1/(B N^2) sum_b sum_ij (cos_s(i,j) - cos_t(i,j))^2, loops, float64 (spec 4)."""
    def unit(v):
        norm = math.sqrt(sum(a * a for a in v))
        d = norm + 1e-8 if detach_norm else max(norm, 1e-12)
        return [a / d for a in v]

    total, n = 0.0, None
    for xs, xt in zip(s.double().tolist(), t.double().tolist()):
        ns = [unit(v) for v in reference_nodes(xs, pool_kernel)]
        nt = [unit(v) for v in reference_nodes(xt, pool_kernel)]
        n = len(ns)
        for i in range(n):
            for j in range(n):
                a_s = sum(p * q for p, q in zip(ns[i], ns[j]))
                a_t = sum(p * q for p, q in zip(nt[i], nt[j]))
                total += (a_s - a_t) ** 2
    return total / (s.shape[0] * n * n)


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


# ----------------------------------------------------------------------- pair-wise term (spec 4)
@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("pool_kernel,h,w", [(0.5, 9, 17), (2, 9, 17), (0.3, 11, 7), (1, 5, 7), (3, 8, 13)])
def test_pairwise_matches_the_loop_reference(pool_kernel, h, w, detach_norm):
    s, t = randn(2, 8, h, w, seed=1), randn(2, 16, h, w, seed=2, scale=3)  # C_s != C_t
    got = pairwise_distillation(s, t, pool_kernel, detach_norm)
    assert float(got) == pytest.approx(reference_pairwise(s, t, pool_kernel, detach_norm), rel=1e-6)
    f32 = pairwise_distillation(s.float(), t.float(), pool_kernel, detach_norm)
    assert float(f32) == pytest.approx(float(got), rel=1e-4)


@pytest.mark.parametrize("h,w,pool_kernel,nodes", [
    (65, 65, 0.5, (3, 3)), (64, 64, 0.5, (2, 2)), (64, 128, 2, (32, 64)), (9, 17, 0.5, (3, 3)),
    (9, 17, 2, (5, 9)), (1, 3, 0.5, (1, 3)), (3, 3, 5, (1, 1))])
def test_node_granularity(h, w, pool_kernel, nodes):
    """Official 0.5: 65x65 -> 3x3 and 64x64 -> 2x2 nodes; CIRKD 2x2: 64x128 -> 32x64 (spec 4.1, 4.2)."""
    kh, kw = pool_kernel_size(h, w, pool_kernel)
    assert (kh, kw) == reference_kernel(h, w, pool_kernel)
    assert (math.ceil(h / kh), math.ceil(w / kw)) == nodes
    x = randn(1, 2, h, w)
    assert F.max_pool2d(x, (kh, kw), (kh, kw), ceil_mode=True).shape[-2:] == nodes


def test_zero_for_identical_features_positive_otherwise():
    s = randn(2, 6, 9, 17, seed=3)
    for kernel in (0.5, 2, 1):
        assert float(pairwise_distillation(s, s.clone(), kernel, True)) == pytest.approx(0.0, abs=1e-14)
        assert float(pairwise_distillation(s, randn(2, 6, 9, 17, seed=4), kernel, True)) > 0


def test_invariant_to_positive_rescaling():
    """Per-position positive scale (unpooled nodes) and per-image positive scale (any pooling)."""
    s, t = randn(2, 5, 5, 7, seed=5), randn(2, 9, 5, 7, seed=6)
    scale = randn(2, 1, 5, 7, seed=7).abs() + 0.1
    base = float(pairwise_distillation(s, t, 1, False))
    assert float(pairwise_distillation(s * scale, t, 1, False)) == pytest.approx(base, rel=1e-10)
    assert float(pairwise_distillation(s, t * scale, 1, True)) == pytest.approx(base, rel=1e-6)
    per_image = torch.tensor([3.0, 0.2], dtype=torch.float64).view(2, 1, 1, 1)
    pooled = float(pairwise_distillation(s, t, 2, True))
    assert float(pairwise_distillation(s * per_image, t, 2, True)) == pytest.approx(pooled, rel=1e-6)


@pytest.mark.parametrize("pool_kernel", [0.5, 2, 1])
def test_gradcheck_through_the_norm(pool_kernel):
    s = randn(2, 3, 5, 7, seed=8).requires_grad_(True)
    t = randn(2, 4, 5, 7, seed=9)
    assert torch.autograd.gradcheck(lambda x: pairwise_distillation(x, t, pool_kernel, False), (s,))


def frozen_norm_loss(x, t, x0, pool_kernel):
    """The official variant's function of x with its node norms frozen at x0 (what autograd sees):
    torch ops on window slices, independent of max_pool2d."""
    def nodes(y):
        h, w = y.shape[-2:]
        kh, kw = reference_kernel(h, w, pool_kernel)
        cols = [y[:, :, i:i + kh, j:j + kw].amax(dim=(-2, -1)) for i in range(0, h, kh) for j in range(0, w, kw)]
        return torch.stack(cols, dim=-1)  # B x C x N

    n_x, n_x0, n_t = nodes(x), nodes(x0), nodes(t)
    u = n_x / (n_x0.norm(dim=1, keepdim=True) + 1e-8)
    v = n_t / (n_t.norm(dim=1, keepdim=True) + 1e-8)
    a_s, a_t = u.transpose(1, 2) @ u, v.transpose(1, 2) @ v
    return ((a_s - a_t) ** 2).mean()


@pytest.mark.parametrize("pool_kernel", [0.5, 2])
def test_detached_norm_gradient_is_the_frozen_norm_gradient(pool_kernel):
    """Official SKD detaches the norm: same value as CIRKD's normalisation, different gradient."""
    s = randn(2, 3, 5, 7, seed=10).requires_grad_(True)
    t = randn(2, 4, 5, 7, seed=11)
    x0 = s.detach().clone()
    assert torch.autograd.gradcheck(lambda x: frozen_norm_loss(x, t, x0, pool_kernel), (s,))
    expected, = torch.autograd.grad(frozen_norm_loss(s, t, x0, pool_kernel), s)
    detached, = torch.autograd.grad(pairwise_distillation(s, t, pool_kernel, True), s)
    through, = torch.autograd.grad(pairwise_distillation(s, t, pool_kernel, False), s)
    assert torch.allclose(detached, expected, rtol=1e-8, atol=1e-14)
    assert not torch.allclose(detached, through, rtol=1e-3)
    s = s.detach()
    assert float(pairwise_distillation(s, t, pool_kernel, True)) == pytest.approx(
        float(pairwise_distillation(s, t, pool_kernel, False)), rel=1e-6)


def test_chunked_affinities_give_the_same_value_and_gradient():
    s = randn(5, 3, 6, 8, seed=12).requires_grad_(True)
    t = randn(5, 4, 6, 8, seed=13)
    whole = pairwise_distillation(s, t, 2, False)
    g_whole, = torch.autograd.grad(whole, s)
    chunked = pairwise_distillation(s, t, 2, False, chunk_elements=2 * 12 * 12)  # 2 images of 12 nodes
    g_chunked, = torch.autograd.grad(chunked, s)
    assert float(chunked.detach()) == pytest.approx(float(whole.detach()), rel=1e-12)
    assert torch.allclose(g_chunked, g_whole, rtol=1e-10, atol=1e-15)


def test_teacher_of_another_size_is_resized_bilinearly():
    s, t = randn(1, 3, 6, 10, seed=14), randn(1, 5, 12, 20, seed=15)
    t_small = F.interpolate(t, size=(6, 10), mode="bilinear", align_corners=False)
    expected = reference_pairwise(s, t_small, 2, True)
    assert float(pairwise_distillation(s, t, 2, True)) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------ discriminator (5.1)
def discriminator(k=5, seed=0):
    return Discriminator(k, torch.Generator().manual_seed(seed), 64).double()


def test_spectral_norm_on_the_four_strided_convs():
    d = discriminator()
    sn = [m for m in d.modules() if isinstance(m, SpectralNormConv2d)]
    assert len(sn) == 4 and list(d.convs) == sn
    assert [tuple(m.weight_bar.shape) for m in sn] == [(64, 5, 4, 4), (128, 64, 4, 4), (256, 128, 4, 4),
                                                       (512, 256, 4, 4)]
    assert isinstance(d.last, nn.Conv2d) and d.last.weight.shape == (1, 512, 4, 4) and d.last.bias is not None
    names = {n for n, _ in d.named_parameters()}
    assert "convs.0.weight_bar" in names and "convs.0.u" not in names  # u, v are buffers, not trained
    assert {"convs.0.u", "convs.0.v"} <= {n for n, _ in d.named_buffers()}
    conv = sn[0]
    conv.power_iterations = 300
    conv(randn(1, 5, 4, 4))  # one call = 300 power iterations
    w = conv.weight_bar.detach().flatten(1)
    true_sigma = torch.linalg.matrix_norm(w, ord=2)
    assert float(conv.sigma().detach()) == pytest.approx(float(true_sigma), rel=1e-4)
    assert float(torch.linalg.matrix_norm(w / conv.sigma().detach(), ord=2)) == pytest.approx(1.0, rel=1e-4)


def test_one_power_iteration_per_training_forward_and_none_when_frozen():
    conv = discriminator().convs[1]
    u0, v0, w = conv.u.clone(), conv.v.clone(), conv.weight_bar.detach().flatten(1)
    x = randn(2, 64, 6, 6)
    out = conv(x)
    v1 = w.t() @ u0
    v1 = v1 / (v1.norm() + 1e-12)
    u1 = w @ v1
    u1 = u1 / (u1.norm() + 1e-12)
    assert torch.allclose(conv.v, v1) and torch.allclose(conv.u, u1) and not torch.allclose(u0, u1)
    sigma = float((u1 * (w @ v1)).sum())
    assert torch.allclose(out, F.conv2d(x, conv.weight_bar / sigma, conv.bias, stride=2, padding=1))
    conv.power_iterations = 0
    conv(x)
    assert torch.equal(conv.u, u1) and torch.equal(conv.v, v1)


@pytest.mark.parametrize("h,w,out", [(64, 128, (1, 5)), (67, 129, (1, 5)), (200, 70, (9, 1)),
                                     (9, 17, (1, 1)), (4, 4, (1, 1)), (64, 63, (1, 1))])
def test_output_shapes_on_odd_and_small_inputs(h, w, out):
    d = discriminator(k=3)
    assert d(randn(2, 3, h, w)).shape == (2, 1, *out)


def reference_attention(a, x):
    """gamma * out + x, out[:, :, i] = sum_j softmax_j(q_i . k_j) v_j (explicit einsums, float64)."""
    b, c, h, w = x.shape
    q = F.conv2d(x, a.query.weight, a.query.bias).reshape(b, -1, h * w)
    k = F.conv2d(x, a.key.weight, a.key.bias).reshape(b, -1, h * w)
    v = F.conv2d(x, a.value.weight, a.value.bias).reshape(b, c, h * w)
    energy = torch.einsum("bci,bcj->bij", q, k)
    weights = torch.exp(energy - energy.amax(dim=2, keepdim=True))
    weights = weights / weights.sum(dim=2, keepdim=True)
    return a.gamma * torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w) + x


def reference_discriminator(d, x):
    """Spec 5.1 layer by layer with frozen u, v: BN on this call's batch statistics (biased var)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    bn = d.preprocess
    y = (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    for i, conv in enumerate(d.convs):
        w = conv.weight_bar.detach().flatten(1)
        sigma = sum(float(conv.u[r]) * float(w[r] @ conv.v) for r in range(w.shape[0]))
        y = F.conv2d(y, conv.weight_bar / sigma, conv.bias, stride=2, padding=1)
        y = torch.where(y > 0, y, 0.1 * y)
        if i == 2:
            y = reference_attention(d.attn1, y)
    y = reference_attention(d.attn2, y)
    return F.conv2d(y, d.last.weight, d.last.bias)


def test_discriminator_output_matches_the_layer_by_layer_reference():
    d = discriminator(k=5, seed=3)
    with torch.no_grad():
        d.attn1.gamma.fill_(0.7)
        d.attn2.gamma.fill_(-0.4)
        d.preprocess.weight.uniform_(0.5, 1.5)
        d.preprocess.bias.uniform_(-0.5, 0.5)
    for conv in d.convs:
        conv.power_iterations = 0
    a, b = randn(2, 5, 64, 67, seed=1, scale=3), randn(3, 5, 64, 67, seed=2, scale=3) + 1
    got = d(a)
    assert torch.allclose(got, reference_discriminator(d, a), rtol=1e-9, atol=1e-12)
    # each call is normalised with its own batch statistics: a batch of both is not the same
    both = d(torch.cat([a, b]))
    assert not torch.allclose(both[:2], got, rtol=1e-3)
    assert torch.allclose(both, reference_discriminator(d, torch.cat([a, b])), rtol=1e-9, atol=1e-12)


def test_small_maps_are_upsampled_to_64_before_the_discriminator():
    d = discriminator(k=3)
    for conv in d.convs:
        conv.power_iterations = 0
    x = randn(2, 3, 9, 70, seed=4)
    up = F.interpolate(x, size=(64, 70), mode="bilinear", align_corners=False)
    assert torch.allclose(d(x), reference_discriminator(d, up), rtol=1e-9, atol=1e-12)


def test_initialisation_comes_only_from_the_generator():
    before = torch.get_rng_state()
    a, b, c = discriminator(seed=1), discriminator(seed=1), discriminator(seed=2)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["convs.0.weight_bar"], sc["convs.0.weight_bar"])
    assert a.attn1.gamma.item() == 0.0 and a.attn2.gamma.item() == 0.0
    bound = 1 / math.sqrt(5 * 16)  # PyTorch's default conv init for the first layer
    assert float(a.convs[0].weight_bar.detach().abs().max()) <= bound and float(a.convs[0].u.norm()) == pytest.approx(1.0)


def test_self_attention_with_zero_gamma_is_the_identity_and_has_no_key_bias():
    a = SelfAttention(16, torch.Generator().manual_seed(0)).double()
    x = randn(2, 16, 3, 5)
    assert torch.equal(a(x), x)
    assert a.key.bias is None and a.query.bias is not None and a.value.bias is not None
    # a key bias would be softmax-invariant: q_i . (k_j + c) is shifted by a constant along j
    with torch.no_grad():
        a.gamma.fill_(0.5)
        out = a(x)
        a.key.bias = nn.Parameter(randn(2, seed=3))
        assert torch.allclose(a(x), out, rtol=1e-12, atol=1e-14)


# -------------------------------------------------------------------- adversarial losses (5.2)
def test_hinge_wgan_and_generator_losses_by_hand():
    real = torch.tensor([[[[0.5, 2.0, -1.0]]], [[[1.5, 0.0, 3.0]]]], dtype=torch.float64)
    fake = torch.tensor([[[[-2.0, 0.5, -0.5]]], [[[-1.0, 1.0, 0.2]]]], dtype=torch.float64)
    reals, fakes = real.flatten().tolist(), fake.flatten().tolist()
    hinge = (sum(max(0.0, 1 - x) for x in reals) / 6) + (sum(max(0.0, 1 + x) for x in fakes) / 6)
    assert float(hinge_d_loss(real, fake)) == pytest.approx(hinge, rel=1e-12)
    by_hand = (0.5 + 0 + 2 + 0 + 1 + 0) / 6 + (0 + 1.5 + 0.5 + 0 + 2 + 1.2) / 6
    assert float(hinge_d_loss(real, fake)) == pytest.approx(by_hand, rel=1e-12)
    assert float(wgan_d_loss(real, fake)) == pytest.approx(-sum(reals) / 6 + sum(fakes) / 6, rel=1e-12)
    assert float(generator_loss(fake)) == pytest.approx(-sum(fakes) / 6, rel=1e-12)


def test_gradient_penalty_of_a_linear_critic():
    """D(x) = 1x1 conv with weight w: grad of sum D = w at every position, |grad| = |w| sqrt(h w)."""
    conv = nn.Conv2d(3, 1, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64).view(1, 3, 1, 1))
    real, fake = randn(2, 3, 5, 7, seed=1), randn(2, 3, 5, 7, seed=2)
    alpha = torch.tensor([0.3, 0.9], dtype=torch.float64).view(2, 1, 1, 1)
    norm = math.sqrt(0.2 ** 2 + 0.1 ** 2 + 0.05 ** 2) * math.sqrt(35)
    assert float(gradient_penalty(conv, real, fake, alpha).detach()) == pytest.approx((norm - 1) ** 2, rel=1e-12)


def test_gradient_penalty_depends_on_alpha_as_the_formula_says():
    """D(x) = sum_c x_c^2 per pixel: grad of its sum is 2 x-hat, GP = mean_b (2 |x-hat_b| - 1)^2."""
    critic = lambda x: (x ** 2).sum(dim=1, keepdim=True)  # noqa: E731
    real, fake = randn(3, 2, 3, 5, seed=3, scale=0.1), randn(3, 2, 3, 5, seed=4, scale=0.1)
    alpha = torch.rand(3, 1, 1, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = 0.0
    for b in range(3):
        a = float(alpha[b])
        x = [a * p + (1 - a) * q for p, q in zip(real[b].flatten().tolist(), fake[b].flatten().tolist())]
        expected += (2 * math.sqrt(sum(v * v for v in x)) - 1) ** 2 / 3
    got = gradient_penalty(critic, real.requires_grad_(True), fake, alpha)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-12)
    assert got.requires_grad  # create_graph: the penalty itself is differentiable


# ---------------------------------------------------------------------------------- the method
def context(k=5, seed=0, cs=6, ct=10):
    return MethodContext(k, 255, {"head": cs, "stage4": 4}, {"head": 8, "stage4": 8},
                         {"head": ct, "stage4": 4}, {"head": 8, "stage4": 8}, torch.Generator().manual_seed(seed))


def outputs(k=5, cs=6, ct=10, h=9, w=13, seed=20, b=2):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    student = SegOutput(mk(b, k, h, w).requires_grad_(True), None, {"head": mk(b, cs, h, w).requires_grad_(True)})
    teacher = SegOutput(2 * mk(b, k, h, w), None, {"head": mk(b, ct, h, w)})
    return student, teacher, Batch(torch.zeros(b, 3, 8 * h, 8 * w), torch.zeros(b, 8 * h, 8 * w, dtype=torch.long))


def method(ctx=None, **cfg):
    return SKD(cfg, ctx or context()).double()


def test_terms_weights_and_the_pairwise_value():
    m = method(weight=0.5, ho_weight=0.01, pool_kernel=2, detach_norm=False)
    student, teacher, batch = outputs()
    terms = m.terms(student, teacher, batch, Progress(0, 10))
    assert set(terms) == {"pairwise", "holistic"} and m.weights() == {"pairwise": 0.5, "holistic": 0.01}
    assert float(terms["pairwise"].detach()) == pytest.approx(
        reference_pairwise(student.features["head"].detach(), teacher.features["head"], 2, False), rel=1e-6)
    assert all(torch.isfinite(v) for v in terms.values())


def test_ho_weight_zero_builds_no_discriminator():
    m = method(ho_weight=0.0)
    assert m.discriminator is None and list(m.parameters()) == [] and m.own_optimizer() is None
    student, teacher, batch = outputs()
    assert set(m.terms(student, teacher, batch, Progress(0, 1))) == {"pairwise"}
    assert m.weights() == {"pairwise": 1.0} and m.extra_step(student, teacher, batch, Progress(0, 1)) == {}
    assert set(method(weight=0.0).terms(student, teacher, batch, Progress(0, 1))) == {"holistic"}


def test_own_optimizer_is_built_once_over_the_discriminator():
    m = method()
    opt = m.own_optimizer()
    assert opt is m.own_optimizer() and isinstance(opt, torch.optim.Adam)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in m.discriminator.parameters()}
    assert {id(p) for p in m.parameters()} == {id(p) for p in m.discriminator.parameters()}
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["weight_decay"] == 0.0
    sgd = method(d_optimizer="sgd", d_weight_decay=5e-4).own_optimizer()
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


def test_student_term_reaches_the_student_not_the_teacher_and_does_not_step_d():
    m = method()
    before = copy.deepcopy(m.discriminator.state_dict())
    student, teacher, batch = outputs()
    terms = m.terms(student, teacher, batch, Progress(0, 10))
    sum(m.weights()[k] * v for k, v in terms.items()).backward()
    assert student.logits.grad.abs().sum() > 0 and student.features["head"].grad.abs().sum() > 0
    assert teacher.logits.grad is None and teacher.features["head"].grad is None
    # the student's backward fills D's .grad (no special case in the loop) but changes no D weight
    assert m.discriminator.convs[0].weight_bar.grad.abs().sum() > 0
    after = m.discriminator.state_dict()
    state = (".u", ".v", "running_mean", "running_var", "num_batches_tracked")  # advanced by every D call
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(state))


@pytest.mark.parametrize("adversarial", ["hinge", "wgan-gp"])
def test_extra_step_discards_the_gradients_of_the_student_backward(adversarial):
    with_student, without = method(adversarial=adversarial), method(adversarial=adversarial)
    s1, t1, b1 = outputs()
    s2, t2, b2 = outputs()
    with_student.terms(s1, t1, b1, Progress(0, 4))["holistic"].backward()
    without.terms(s2, t2, b2, Progress(0, 4))  # the same D calls (u, v, BN stats), no backward
    log1 = with_student.extra_step(s1, t1, b1, Progress(0, 4))
    log2 = without.extra_step(s2, t2, b2, Progress(0, 4))
    assert log1 == log2
    p1, p2 = dict(with_student.named_parameters()), dict(without.named_parameters())
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_hinge_step_loss_and_update():
    m = method(d_loss_scale=0.1)
    student, teacher, batch = outputs()
    ref = method()
    ref.load_state_dict(m.state_dict())
    before = {k: v.clone() for k, v in m.named_parameters()}
    logs = m.extra_step(student, teacher, batch, Progress(0, 4))
    d_fake = ref.discriminator(student.logits.detach())  # the references' order: the student's map first
    d_real = ref.discriminator(teacher.logits)
    reals, fakes = d_real.flatten().tolist(), d_fake.flatten().tolist()
    hinge = sum(max(0.0, 1 - x) for x in reals) / len(reals) + sum(max(0.0, 1 + x) for x in fakes) / len(fakes)
    assert logs["d_loss"] == pytest.approx(0.1 * hinge, rel=1e-10) and "gp" not in logs
    changed = [k for k, p in m.named_parameters() if not torch.equal(p, before[k])]
    assert "discriminator.convs.0.weight_bar" in changed and "discriminator.attn1.gamma" in changed


def test_discriminator_step_calls_d_on_the_student_map_first_as_the_references():
    """CIRKD train_kd.py and IFVD kd_model.py call D on the student's map, then the teacher's. Each call
    advances the spectral norm's power iteration, so the order changes both outputs on a fresh D: a
    replay in the references' order matches the step's logs, the reverse order does not."""
    m = method()
    student, teacher, batch = outputs()
    in_order, reversed_ = method(), method()
    in_order.load_state_dict(m.state_dict())
    reversed_.load_state_dict(m.state_dict())
    logs = m.extra_step(student, teacher, batch, Progress(0, 4))
    fake, real = student.logits.detach(), teacher.logits
    d_fake = in_order.discriminator(fake)
    d_real = in_order.discriminator(real)
    assert logs["d_fake"] == pytest.approx(float(d_fake.detach().mean()), rel=1e-12)
    assert logs["d_real"] == pytest.approx(float(d_real.detach().mean()), rel=1e-12)
    r_real = reversed_.discriminator(real)
    r_fake = reversed_.discriminator(fake)
    assert abs(float(r_real.detach().mean()) - logs["d_real"]) > 1e-6 and abs(float(r_fake.detach().mean()) - logs["d_fake"]) > 1e-6


def test_wgan_gp_step_replays_alpha_from_the_generator():
    m = method(ctx=context(seed=11), adversarial="wgan-gp", d_loss_scale=0.1, gp_lambda=10.0)
    student, teacher, batch = outputs()
    ref = method(ctx=context(seed=11), adversarial="wgan-gp")
    ref.load_state_dict(m.state_dict())
    replay = torch.Generator()
    replay.set_state(m.ctx.generator.get_state())
    logs = m.extra_step(student, teacher, batch, Progress(0, 4))
    real, fake = teacher.logits, student.logits.detach()
    d_fake = ref.discriminator(fake)  # same call order (student first): u, v advance alike
    d_real = ref.discriminator(real)
    alpha = torch.rand(2, 1, 1, 1, generator=replay).double()
    gp = gradient_penalty(ref.discriminator, real, fake, alpha)
    expected = 0.1 * (-d_real.mean() + d_fake.mean()) + 0.1 * 10.0 * gp
    assert logs["gp"] == pytest.approx(float(gp.detach()), rel=1e-10)
    assert logs["d_loss"] == pytest.approx(float(expected.detach()), rel=1e-10)
    # a different alpha gives a different penalty
    other = gradient_penalty(ref.discriminator, real, fake, torch.full((2, 1, 1, 1), 0.5, dtype=torch.float64))
    assert float(other.detach()) != pytest.approx(float(gp.detach()), rel=1e-6)


def test_poly_schedule_of_the_discriminator_lr():
    m = method(d_schedule="poly", d_lr=1e-3, d_poly_power=0.9)
    student, teacher, batch = outputs()
    m.extra_step(student, teacher, batch, Progress(5, 20))
    assert m.own_optimizer().param_groups[0]["lr"] == pytest.approx(1e-3 * (1 - 5 / 20) ** 0.9)
    const = method()
    const.extra_step(student, teacher, batch, Progress(5, 20))
    assert const.own_optimizer().param_groups[0]["lr"] == pytest.approx(4e-4)


def test_bad_values_are_rejected():
    for cfg, match in [({"pool_kernel": 2.5}, "pool_kernel"), ({"pool_kernel": 0.0}, "pool_kernel"),
                       ({"adversarial": "wgan"}, "adversarial"), ({"d_optimizer": "rmsprop"}, "d_optimizer"),
                       ({"d_schedule": "cosine"}, "d_schedule"), ({"d_lr": 0.0}, "d_lr"),
                       ({"d_beta2": 1.0}, "beta2"), ({"feature": "nosuch"}, "feature"),
                       ({"gp_lambda": -1.0}, "gp_lambda")]:
        with pytest.raises(ValueError, match=match):
            SKD(cfg, context())


# ------------------------------------------------------------------------- config and a real run
def test_yaml_states_the_schema_defaults_and_validates():
    from harness.config import load_config
    from harness.errors import ConfigError

    assert harness.methods.METHODS["skd"] is SKD
    cfg = load_config(["+method=[kd,skd]"])
    assert cfg["method"]["skd"] == vars(SKD.Config())
    cfg = load_config(["+method=skd", "method.skd.pool_kernel=2", "method.skd.adversarial=wgan-gp"])
    assert cfg["method"]["skd"]["pool_kernel"] == 2.0
    with pytest.raises(ConfigError, match="method.skd.d_lr"):
        load_config(["+method=skd", "method.skd.d_lr=fast"])
    with pytest.raises(ConfigError, match="'method.skd.ho_weight' must be >= 0"):
        load_config(["+method=skd", "method.skd.ho_weight=-1"])


# Parameters whose D-loss gradient can be exactly zero: the last bias, and attn2's value bias
# (attention rows sum to 1, so it shifts every output of the last conv by the same amount), cancel in
# -mean D(T) + mean D(S) (always for WGAN, for hinge whenever as many real as fake outputs lie
# inside the margin). (The reference's key biases, softmax-invariant, are not built at all.)
STRUCTURALLY_ZERO = {"discriminator.last.bias", "discriminator.attn2.value.bias"}


@pytest.mark.parametrize("extra", [(), ("method.skd.adversarial=wgan-gp", "method.skd.d_optimizer=sgd",
                                        "method.skd.d_schedule=poly", "method.skd.pool_kernel=2",
                                        "method.skd.detach_norm=false", "method.skd.d_lr=0.05")])
def test_distilled_run_steps_the_discriminator(tiny, monkeypatch, extra):
    from harness.config import load_config
    from harness.engine import train

    built = []

    def capture(method_cfg, ctx):
        methods = harness.methods.build_methods(method_cfg, ctx)
        if "skd" in method_cfg:  # not the teacher's own training run
            built.extend(methods)
            built.append({k: v.detach().clone() for k, v in methods[0].named_parameters()})
        return methods

    monkeypatch.setattr(train, "build_methods", capture)
    # a narrow D keeps the test fast (the 4x4 logit maps are upsampled to 64x64 for it)
    cfg = load_config(tiny("+method=skd", "method.skd.ho_weight=0.1", "method.skd.d_channels=8",
                           "budget.iterations=3", "budget.eval_interval=3", *extra))
    result = train.run(cfg, teacher=teacher_for(cfg))
    assert result.record["status"] == "completed"
    terms = result.record["extra_json"]["last_loss_terms"]
    assert {"skd.pairwise", "skd.holistic"} <= set(terms) and all(math.isfinite(v) for v in terms.values())
    m, initial = built
    params = {k: p for k, p in m.named_parameters() if k not in STRUCTURALLY_ZERO}
    assert len(params) == len(initial) - len(STRUCTURALLY_ZERO) and m.own_optimizer() is not None
    assert [k for k, p in params.items() if p.grad is None or p.grad.abs().sum() == 0] == []  # last D backward
    # D stepped: every weight outside the attention blocks, and both gammas (the attention convs'
    # updates scale with gamma, which starts at 0, and may still round away after 3 steps)
    stepped = [k for k in params if not k.startswith(("discriminator.attn1.", "discriminator.attn2."))
               or k.endswith("gamma")]
    assert len(stepped) == 4 * 2 + 2 + 2 + 1  # 4 SN convs, BN weight/bias, 2 gammas, last weight
    assert [k for k in stepped if torch.equal(params[k], initial[k])] == []
    assert [k for k, p in result.model.named_parameters()
            if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)] == []
