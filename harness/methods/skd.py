"""SKD: structured knowledge distillation, pair-wise (L_PA) and holistic adversarial (L_HO) terms.

Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019 (cited by
papers 001 and 003; paper 003 tunes lambda_PA and lambda_HO in isolation). Spec sections 4 and 5.
The pixel-wise term of SKD is the separate `kd` method: the full recipe is `+method=[kd,skd]`.

Pair-wise term (`pairwise`, weight `weight`), spec 4. For the named feature (`feature`, default the
head's feature before the classifier; the student's is taken after its dropout):

    F -> max-pool to nodes (kernel = stride, ceil_mode, no padding) -> f_i, i = 1..N = h'w'
    a_ij = f_i . f_j / (|f_i| |f_j|)                         (cosine affinity, B x N x N per net)
    L_PA = 1 / (B N^2) * sum_{b,i,j} (a^s_bij - a^t_bij)^2   (plain mean)

* Node granularity (`pool_kernel`), the largest discrepancy between "SKD" implementations (spec
  4.3): a value in (0, 1) is the official `--pool-scale`, kernel = stride = (floor(s*h), floor(s*w))
  (at least 1), so the default 0.5 turns 64x64 into 2x2 and 65x65 into 3x3 nodes (paper's beta;
  official SKD, the default). An integer >= 1 is a fixed k x k kernel: 2 is CIRKD's re-implementation
  (64x128 -> 32x64 nodes), 1 is no pooling. A kernel larger than the map is clipped to the map.
* Normalisation (`detach_norm`): true (default, official SKD) divides by (|f| + 1e-8) with the norm
  detached, so no gradient flows through it; false (CIRKD) is F.normalize, x / max(|x|, 1e-12),
  with the gradient through the norm. Values agree, gradients differ (spec 4.4).
* Channel counts may differ (the affinity is N x N either way); no projector. The teacher feature is
  detached; if its spatial size differs from the student's it is resized bilinearly first (the
  reference requires equal sizes). No tau (GSKD's Eq. 3 writes one; neither code has it).
* Memory: the affinity is N x N per image, never (B N) x (B N). Images are processed in chunks of
  at most `max(1, 2**26 // N**2)`; when there is more than one chunk each is recomputed in the
  backward pass (activation checkpointing), so only one chunk's N x N maps are alive at a time.
  Official coarse nodes: <= 9 nodes, negligible. CIRKD 2x2 at 64x128: N = 2048, 16.8 MB per image
  and map (float32), one chunk of 8 images ~ 134 MB per map. No pooling at 64x128 (N = 8192):
  one image per chunk, 268 MB per map. Measured on CPU (forward + backward, C_s = 128, C_t = 256,
  64x128): 2x2 at B = 8 adds 0.57 GB to the peak; no pooling adds 1.1 GB, whatever B.

Holistic term (`holistic`, weight `ho_weight`; 0 = off, no discriminator is built), spec 5.
A discriminator D (spec 5.1, as in the official SKD / IFVD / CIRKD `sagan` code) judges K-channel
logit maps at the head's resolution: raw logits (no softmax, no image concatenated: the SKD paper
describes a conditional GAN, every released code feeds the logits alone) -> BatchNorm2d(K) ->
4 x [spectral-norm Conv k4 s2 p1 + LeakyReLU(0.1)] with channels 64, 128, 256 (+ self-attention),
512 (+ self-attention) -> plain Conv(512 -> 1, k4, s1, p0) (widths: `d_channels` x 1, 2, 4, 8). Self-attention: query/key 1x1 convs to
C/8, value 1x1 conv to C, softmax over positions, out = gamma * attn + x with gamma = 0 at start.
The key conv has no bias (the reference's is softmax-invariant: it changes no output and gets no
gradient). Two parameters still get an exactly zero D gradient at times, as in the reference: the
last conv's bias and attn2's value bias shift every D output by the same constant, which cancels in
the WGAN objective always and in the hinge objective whenever as many real as fake outputs lie
inside the margins (e.g. at the start, when |D| < 1).

* Spectral norm: our own small wrapper like the reference's: trainable `weight_bar`, buffers u, v,
  ONE power iteration on every training-mode forward call (so u, v advance with each of the 3-4 D
  calls per step), weight used = weight_bar / (u . W v). `power_iterations = 0` freezes u, v (for
  replaying a forward exactly, spec 5.4). D stays in train mode: its BatchNorm normalises each call
  with that call's batch statistics; student, teacher and interpolated maps go in separate calls.
* Size: the architecture needs a map of at least 64 px per side (the reference fails below that).
  A smaller map is bilinearly upsampled (align_corners=False) to 64 on that side before the
  BatchNorm; maps of 64 px and more pass unchanged, exactly as in the reference.
* Student term (returned by `terms`): L_G = -mean D(Z^s). Its backward also fills D's .grad (the
  train loop has no special case); `extra_step` zeroes them first, and D's parameters are never in
  the student's optimiser, so the student term does not update D.
* D step (`extra_step`, after the student's step, on the same forward pass): Z-bar^s detached,
  Z^t the teacher's logits (resized bilinearly to the student's size if they differ).
    hinge (`adversarial: hinge`, default, CIRKD):
        L_D = d_loss_scale * [mean ReLU(1 - D(Z^t)) + mean ReLU(1 + D(Z-bar^s))]
    WGAN-GP (`adversarial: wgan-gp`, official SKD and IFVD):
        L_D = d_loss_scale * [-mean D(Z^t) + mean D(Z-bar^s)] + d_loss_scale * gp_lambda * GP
        x-hat = alpha Z^t + (1 - alpha) Z-bar^s, alpha ~ U(0,1) per image (B x 1 x 1 x 1) drawn from
        ctx.generator (CPU), GP = mean_b (|grad_{x-hat} sum D(x-hat)|_b - 1)^2, gradient of the SUM of
        D's output map, flattened per image, create_graph=True (as the reference).
* D's own optimiser (`own_optimizer`, built once in __init__): Adam(d_lr, betas (d_momentum,
  d_beta2), weight decay d_weight_decay) or SGD(d_lr, momentum d_momentum, weight decay); LR
  constant (CIRKD) or poly (official SKD, IFVD): d_lr * (1 - k/total)^d_poly_power. One D step per
  student step, no warm-up, D trained from scratch. Defaults are CIRKD's (Adam 4e-4, (0.9, 0.99),
  no decay, constant LR, lambda_adv = ho_weight = 0.001, lambda_d = d_loss_scale = 0.1). The
  official SKD setting: adversarial=wgan-gp ho_weight=0.1 d_optimizer=sgd d_weight_decay=5e-4
  d_schedule=poly. `d_loss_scale` and `gp_lambda` are deliberately not named `*_weight`: they scale
  D's objective, not the student's loss, and the sweep must not tune them as loss weights.
* All initialisation (D's conv weights, PyTorch's default kaiming-uniform a = sqrt(5) and bias
  bounds; spectral-norm u, v ~ N(0, 1) normalised) and the WGAN-GP alpha come from ctx.generator,
  so a run replays exactly and building the method does not touch the global RNG.

Choices (ours) where the spec and the paper leave room: pair-wise defaults follow the official
SKD code (coarse nodes, detached norm, lambda_PA = 1.0, its default; its run script uses 0.5; paper
003's tuned best on Cityscapes is 0.1 for ResNet-18); the adversarial defaults follow CIRKD (hinge),
as the harness's other baselines (IFVD, CWD) are CIRKD-codebase composites.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from harness.methods.base import Method, resized_like
from harness.params import FEATURES, param

ADVERSARIAL = ("hinge", "wgan-gp")
D_OPTIMIZERS = ("adam", "sgd")
D_SCHEDULES = ("constant", "poly")
CHUNK_ELEMENTS = 2 ** 26  # affinity entries per chunk of images (256 MiB per map in float32)


# --------------------------------------------------------------------------- pair-wise (spec 4)
def pool_kernel_size(h: int, w: int, pool_kernel: float) -> Tuple[int, int]:
    """Kernel (= stride) of the node max-pool: a fraction of the map in (0, 1) (official SKD,
    floor(s*h) x floor(s*w), at least 1), or a fixed integer k >= 1 (CIRKD: 2); clipped to the map."""
    if pool_kernel < 1:
        kh, kw = int(pool_kernel * h), int(pool_kernel * w)
    else:
        kh = kw = int(pool_kernel)
    return max(1, min(kh, h)), max(1, min(kw, w))


def pool_nodes(x: torch.Tensor, pool_kernel: float) -> torch.Tensor:
    """B x C x h x w -> B x C x h' x w' by max-pooling, kernel = stride, ceil_mode, no padding."""
    kernel = pool_kernel_size(x.shape[-2], x.shape[-1], pool_kernel)
    if kernel == (1, 1):
        return x
    return F.max_pool2d(x, kernel_size=kernel, stride=kernel, padding=0, ceil_mode=True)


def unit_nodes(x: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """B x C x h x w -> B x C x N, each node's vector divided by its L2 norm over channels:
    x / (|x|.detach() + 1e-8) (official SKD) or x / max(|x|, 1e-12) (F.normalize, CIRKD)."""
    x = x.flatten(2)
    if detach_norm:
        return x / (x.norm(dim=1, keepdim=True).detach() + 1e-8)
    return F.normalize(x, p=2, dim=1)


def _squared_affinity_difference(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """sum over images, i, j of (s_i . s_j - t_i . t_j)^2 for unit node vectors s, t (b x C x N)."""
    a_s = torch.bmm(s.transpose(1, 2), s)
    a_t = torch.bmm(t.transpose(1, 2), t)
    return (a_s - a_t).pow(2).sum()


def pairwise_distillation(student: torch.Tensor, teacher: torch.Tensor, pool_kernel: float,
                          detach_norm: bool, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """L_PA = 1/(B N^2) sum_{b,i,j} (a^s_bij - a^t_bij)^2 on pooled nodes (spec 4; see module doc).

    `student` B x C_s x h x w, `teacher` B x C_t x h x w (resized to the student's h x w if needed;
    pass it detached). Images go through the N x N maps in chunks of <= chunk_elements entries,
    each chunk checkpointed when there is more than one.
    """
    teacher = resized_like(teacher, student)
    s = unit_nodes(pool_nodes(student, pool_kernel), detach_norm)
    t = unit_nodes(pool_nodes(teacher, pool_kernel), detach_norm)
    b, n = s.shape[0], s.shape[-1]
    per = max(1, chunk_elements // (n * n))
    if per >= b:
        total = _squared_affinity_difference(s, t)
    else:
        total = sum(checkpoint(_squared_affinity_difference, s[i:i + per], t[i:i + per], use_reentrant=False)
                    for i in range(0, b, per))
    return total / (b * n * n)


# ------------------------------------------------------------------ discriminator (spec 5.1)
def _l2normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / (x.norm() + eps)  # the reference's l2normalize


def _default_init_(weight: torch.Tensor, bias: Optional[torch.Tensor], generator: torch.Generator) -> None:
    """PyTorch's default conv init (kaiming-uniform a = sqrt(5), bias U(+-1/sqrt(fan_in))), from `generator`."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        if bias is not None:
            bound = 1 / math.sqrt(weight[0].numel())
            bias.uniform_(-bound, bound, generator=generator)


def _conv(c_in: int, c_out: int, kernel: int, stride: int, padding: int, generator: torch.Generator,
          bias: bool = True) -> nn.Conv2d:
    conv = torch.nn.utils.skip_init(nn.Conv2d, c_in, c_out, kernel, stride=stride, padding=padding, bias=bias)
    _default_init_(conv.weight, conv.bias, generator)
    return conv


class SpectralNormConv2d(nn.Module):
    """Conv2d whose weight is weight_bar / sigma, sigma = u . (W v) estimated by power iteration:
    `power_iterations` (default 1, the reference) steps on every training-mode forward call."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                 generator: torch.Generator):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.weight_bar = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(c_out))
        _default_init_(self.weight_bar, self.bias, generator)
        self.register_buffer("u", _l2normalize(torch.randn(c_out, generator=generator)))
        self.register_buffer("v", _l2normalize(torch.randn(c_in * kernel * kernel, generator=generator)))
        self.power_iterations = 1

    def sigma(self) -> torch.Tensor:
        """The current spectral-norm estimate u . (W v) (gradient through W only)."""
        return torch.dot(self.u, self.weight_bar.flatten(1) @ self.v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.power_iterations > 0:
            with torch.no_grad():
                w = self.weight_bar.flatten(1)
                u, v = self.u, self.v
                for _ in range(self.power_iterations):
                    v = _l2normalize(w.t() @ u)
                    u = _l2normalize(w @ v)
            # new tensors, not in-place: earlier calls of this step keep theirs for their backward
            self.u, self.v = u, v
        return F.conv2d(x, self.weight_bar / self.sigma(), self.bias, self.stride, self.padding)


class SelfAttention(nn.Module):
    """SAGAN self-attention: out = gamma * (V softmax_j(q_i . k_j)) + x, gamma learned, 0 at start.
    The key conv has no bias: q_i . (k_j + c) = q_i . k_j + q_i . c is constant along the softmax axis,
    so the reference's key bias changes nothing and never receives a gradient (exactly equivalent)."""

    def __init__(self, channels: int, generator: torch.Generator):
        super().__init__()
        self.query = _conv(channels, channels // 8, 1, 1, 0, generator)
        self.key = _conv(channels, channels // 8, 1, 1, 0, generator, bias=False)
        self.value = _conv(channels, channels, 1, 1, 0, generator)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.query(x).flatten(2), self.key(x).flatten(2), self.value(x).flatten(2)
        attention = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # B x N x N, rows = queries
        out = torch.bmm(v, attention.transpose(1, 2)).view(b, c, h, w)
        return self.gamma * out + x


class Discriminator(nn.Module):
    """Spec 5.1: BN(K) -> SN-conv 64, 128, 256 (+attn), 512 (+attn), LeakyReLU 0.1 -> conv to 1."""

    MIN_SIZE = 64  # smallest side the architecture accepts (4 halvings, then a 4x4 valid conv)

    def __init__(self, num_classes: int, generator: torch.Generator, conv_dim: int):
        super().__init__()
        self.preprocess = nn.BatchNorm2d(num_classes)
        dims = [num_classes, conv_dim, conv_dim * 2, conv_dim * 4, conv_dim * 8]
        self.convs = nn.ModuleList(SpectralNormConv2d(dims[i], dims[i + 1], 4, 2, 1, generator) for i in range(4))
        self.attn1 = SelfAttention(dims[3], generator)
        self.attn2 = SelfAttention(dims[4], generator)
        self.last = _conv(dims[4], 1, 4, 1, 0, generator)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """B x K x h x w -> B x 1 x h'' x w'' (e.g. 64x128 -> 1x5)."""
        h, w = logits.shape[-2:]
        if h < self.MIN_SIZE or w < self.MIN_SIZE:
            size = (max(h, self.MIN_SIZE), max(w, self.MIN_SIZE))
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        x = self.preprocess(logits)
        for i, conv in enumerate(self.convs):
            x = F.leaky_relu(conv(x), 0.1)
            if i == 2:
                x = self.attn1(x)
        x = self.attn2(x)
        return self.last(x)


# ------------------------------------------------------------------ adversarial losses (spec 5.2)
def generator_loss(d_student: torch.Tensor) -> torch.Tensor:
    """The student's term: -mean D(Z^s) (both loss types)."""
    return -d_student.mean()


def hinge_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def wgan_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    return -d_real.mean() + d_fake.mean()


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     alpha: torch.Tensor) -> torch.Tensor:
    """mean_b (|grad_x sum D(x)|_b - 1)^2 at x = alpha real + (1 - alpha) fake (alpha: B x 1 x 1 x 1)."""
    x = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    grad, = torch.autograd.grad(discriminator(x).sum(), x, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


# ------------------------------------------------------------------------------------ the method
class SKD(Method):
    name = "skd"

    @dataclass
    class Config:
        weight: float = param(1.0, kind="weight", low=0, doc="λ_PA. 0 turns the pair-wise term off (official "
                              "default 1.0, its run script 0.5; CIRKD 10)")
        feature: str = param("head", choices=FEATURES, doc="feature of the pair-wise term: `head` or "
                             "`stage1`..`stage4`")
        pool_kernel: float = param(0.5, doc="a value in (0, 1) is a fraction of the map (official `--pool-scale`); "
                                   "an integer k ≥ 1 is a k×k kernel (CIRKD: 2; 1 means no pooling)")
        detach_norm: bool = param(True, doc="divide by (‖f‖ + 1e-8) with the norm detached (official); false uses "
                                  "`F.normalize` (CIRKD)")
        ho_weight: float = param(0.001, kind="weight", low=0, doc="λ of the student's adversarial term. 0 turns it "
                                 "off and builds no D (CIRKD 0.001, official 0.1)")
        adversarial: str = param("hinge", choices=ADVERSARIAL,
                                 doc="D objective: `hinge` (CIRKD) or `wgan-gp` (official SKD, IFVD)")
        d_loss_scale: float = param(0.1, kind="aux_weight", low=0, doc="λ_d, multiplies D's objective including "
                                    "the GP (not a student weight)")
        gp_lambda: float = param(10.0, kind="aux_weight", low=0,
                                 doc="gradient-penalty factor in D's objective, `wgan-gp` only")
        d_optimizer: str = param("adam", choices=D_OPTIMIZERS, doc="`adam` (CIRKD, IFVD) or `sgd` (official SKD)")
        d_lr: float = param(4.0e-4, low=0, low_open=True, doc="D's learning rate")
        d_momentum: float = param(0.9, low=0, doc="Adam β1 (< 1), or SGD momentum")
        d_beta2: float = param(0.99, doc="Adam β2, in [0, 1)")
        d_weight_decay: float = param(0.0, low=0, doc="D's weight decay (official SKD: 5e-4)")
        d_schedule: str = param("constant", choices=D_SCHEDULES, doc="`constant` (CIRKD) or `poly` (official SKD, "
                                "IFVD): `d_lr·(1 − k/total)^d_poly_power`")
        d_poly_power: float = param(0.9, low=0, low_open=True, doc="power of the poly schedule")
        d_channels: int = param(64, low=2, why="self-attention uses C/8",
                                doc="width of D's first conv, then ×2, ×4, ×8")

        @classmethod
        def cross_check(cls, c: dict, prefix: str) -> Optional[str]:
            if c["d_optimizer"] == "adam" and not (float(c["d_momentum"]) < 1 and 0 <= float(c["d_beta2"]) < 1):
                return (f"'{prefix}.d_momentum' and '{prefix}.d_beta2' are Adam's betas and must lie "
                        f"in [0, 1), got {c['d_momentum']}, {c['d_beta2']}")
            k = float(c["pool_kernel"])
            if not (0 < k < 1 or (k >= 1 and k == int(k))):
                return (f"'{prefix}.pool_kernel' must be a fraction in (0, 1) (official: 0.5) or a whole "
                        f"number of pixels >= 1 (CIRKD: 2), got {c['pool_kernel']}")
            return None

    def __init__(self, cfg: dict, ctx):
        super().__init__(cfg, ctx)
        c = self.cfg
        self.weight, self.ho_weight = float(c["weight"]), float(c["ho_weight"])
        if self.weight > 0:
            feature = c["feature"]
            if feature not in ctx.student_channels or feature not in ctx.teacher_channels:
                raise ValueError(f"'method.skd.feature' = '{feature}' is not a feature of both models "
                                 f"(student: {sorted(ctx.student_channels)}, teacher: {sorted(ctx.teacher_channels)})")
        self.discriminator: Optional[Discriminator] = None
        self._d_optimizer: Optional[torch.optim.Optimizer] = None
        if self.ho_weight > 0:
            self.discriminator = Discriminator(ctx.num_classes, ctx.generator, int(c["d_channels"]))
            params = list(self.discriminator.parameters())
            if c["d_optimizer"] == "adam":
                self._d_optimizer = torch.optim.Adam(params, lr=float(c["d_lr"]),
                                                     betas=(float(c["d_momentum"]), float(c["d_beta2"])),
                                                     weight_decay=float(c["d_weight_decay"]))
            else:
                self._d_optimizer = torch.optim.SGD(params, lr=float(c["d_lr"]), momentum=float(c["d_momentum"]),
                                                    weight_decay=float(c["d_weight_decay"]))

    def weights(self) -> Dict[str, float]:
        out = {}
        if self.weight > 0:
            out["pairwise"] = self.weight
        if self.ho_weight > 0:
            out["holistic"] = self.ho_weight
        return out

    def terms(self, student, teacher, batch, progress):
        c, out = self.cfg, {}
        if self.weight > 0:
            out["pairwise"] = pairwise_distillation(student.features[c["feature"]],
                                                    teacher.features[c["feature"]].detach(),
                                                    float(c["pool_kernel"]), bool(c["detach_norm"]))
        if self.discriminator is not None:
            out["holistic"] = generator_loss(self.discriminator(student.logits))
        return out

    def own_optimizer(self) -> Optional[torch.optim.Optimizer]:
        return self._d_optimizer

    def d_lr(self, progress) -> float:
        base = float(self.cfg["d_lr"])
        if self.cfg["d_schedule"] == "poly":
            return base * (1 - progress.fraction) ** float(self.cfg["d_poly_power"])
        return base

    def extra_step(self, student, teacher, batch, progress) -> Dict[str, float]:
        """One D step on the detached logits of this iteration's forward pass (spec 5.2)."""
        if self.discriminator is None:
            return {}
        c, d, opt = self.cfg, self.discriminator, self._d_optimizer
        for group in opt.param_groups:
            group["lr"] = self.d_lr(progress)
        fake = student.logits.detach()
        real = resized_like(teacher.logits.detach(), fake)
        opt.zero_grad(set_to_none=True)  # drops what the student's backward put into D
        # the student's map first, as the references (CIRKD train_kd.py, IFVD kd_model.py): each call
        # advances the spectral norm's power iteration, so the order decides which map gets which sigma
        d_fake = d(fake)
        d_real = d(real)
        logs = {"d_real": float(d_real.detach().mean()), "d_fake": float(d_fake.detach().mean())}
        scale = float(c["d_loss_scale"])
        if c["adversarial"] == "hinge":
            loss = scale * hinge_d_loss(d_real, d_fake)
        else:
            alpha = torch.rand(fake.shape[0], 1, 1, 1, generator=self.ctx.generator)
            gp = gradient_penalty(d, real, fake, alpha.to(device=fake.device, dtype=fake.dtype))
            loss = scale * wgan_d_loss(d_real, d_fake) + scale * float(c["gp_lambda"]) * gp
            logs["gp"] = float(gp.detach())
        loss.backward()
        opt.step()
        logs["d_loss"] = float(loss.detach())
        return logs
