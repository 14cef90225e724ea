"""Af-DCD: augmentation-free dense contrastive distillation (L_fd + L_ctr).

Fan et al., "Augmentation-free Dense Contrastive Knowledge Distillation for Efficient Semantic
Segmentation", NeurIPS 2023. The paper is not among our seeds: this follows the authors' code
(`OSVAI/Af-DCD`, `losses/ocmgd.py`, `train_ocmgd.py`) as restated in spec section 9. With S the
student's and T the teacher's feature map (default `stage4`, the backbone's last stage, the code's
`outputs[-2]`), B x C x h x w:

1. Align: S <- Conv1x1(S) (with bias, C_s -> C_t), only when C_s != C_t.
2. Mask: a keep map m in {0, 1}^{B x 1 x h x w}; `mask_mode: random` zeroes each position with
   probability zeta = `mask_ratio` (u ~ U[0, 1), zeroed where u > 1 - zeta, as the code), `centre`
   zeroes the block [h//3, 2h//3) x [w//3, 2w//3) of every image.
3. Generate: G = P(S * m), P = Conv3x3(C_t -> C_t) - ReLU - Conv3x3(C_t -> C_t) (biases; `plain`),
   or the code's "enhanced" projector (`enhanced`): x1 = ReLU(Conv3x3(x)), x2 = ReLU(Conv3x3(x1)),
   G = (A1(x1) + A2(x2)) / 2 with A1, A2 two more Conv3x3.
4. Feature term:   L_fd = (1 / B) * sum_{b,c,i} (G - T)^2          (sum over C h w, mean over B).
5. Contrastive term on (G, T): both max-pooled with kernel = stride = `pool_size` (floor mode), cut
   into non-overlapping `patch_size` x `patch_size` spatial patches and `groups` (M) channel groups
   of C_t / M channels. In a patch of N2 = patch_size^2 positions there are N2 * M tokens per map,
   token (p, m) = the C_t/M channels of group m at position p. For every student token (anchor)
   (p, m):
       s(a, t) = -|| G-token a - T-token t ||_1                      (negative L1 distance)
       logits  = [s(a, T(p, m)), s(a, T(q, n)) for all q, all n != m] / tau     (1 + N2 (M - 1))
       l(a)    = CE(logits, target 0) = logsumexp(logits) - s(a, T(p, m)) / tau
   i.e. the positive is the teacher token at the same position and group; the negatives are every
   teacher token of ANOTHER group anywhere in the patch; same-group tokens at other positions are
   left out. L_ctr = (1 / (B h' w')) * sum over all B h' w' M anchors of l(a), with h' x w' the
   pooled (and cropped, below) size: the code's sum-reduced CE / (h' w') / B.

The total of the code is L_CE (+0.4 aux) + lambda_kd L_KD + lambda_fd L_fd + lambda_ctr L_ctr;
compose `+method=[kd,afdcd]` for it (its KD is our `kd`, lambda_kd 1; 0.5 on ADE20K / COCO).

Defaults: the code's Cityscapes script (fd_weight 2e-6, ctr_weight 5e-3); the code's own defaults
are 4e-5 / 1e-3, VOC 1e-6 / 5e-3, CamVid 8e-6 / 1e-2 (with pool_size 1), ADE20K 1e-6 / 4e-2. tau 0.07,
M = 16, pool 4, patch 4 x 4, zeta 0.75 as the code.

Choices where the code is silent, dataset-specific or would crash (ours):
* Equal channel counts: no align conv (the code only creates it when C_s != C_t but always calls
  it, so equal channels crash there).
* Maps whose pooled size is not a multiple of the patch size: cropped to the top-left largest
  multiple before patching. This is the code's CamVid branch (45 x 45 -> 44 x 44, no pooling,
  here `pool_size: 1`) generalised; at Cityscapes' 64 x 128 with pool 4 (16 x 32) nothing is cut.
  A map too small for one patch after pooling (64 px CPU crops: stage4 is 8 x 8; a stride-32
  transformer stage) adapts instead of failing (`fitted_sizes`): pooling is reduced first, as the
  code's CamVid setting does, then the patch; at the papers' sizes nothing changes. The code's
  other pooling setting `pool_size: 0` is spelt 1 here (no pooling).
* Teacher maps of another spatial size are resized bilinearly to the student's (`resized_like`).
* Randomness: the random mask is drawn from `ctx.generator` (CPU), then moved to the feature's
  device, so a run is replayable and the global RNG is untouched; `keep_mask` is the one place it
  is drawn (tests replay it). It is drawn every step, even when both weights are 0, so switching a
  term off does not shift later draws. The align and projector convs get PyTorch's default conv
  init, drawn from `ctx.generator` as well.
* The align conv and projector are submodules of this method, so they join the student's SGD (same
  LR / wd / poly schedule, as the code). The code clips THEIR gradient norm to 15 after backward and
  before the step (`grad_clip_norm`; 0 = off); the train loop has no hook for that, so the clipping
  runs inside backward: each parameter has a post-accumulate-grad hook and the last one to receive
  its gradient clips all of them (counted per `terms` call, so exactly once per backward).
* A term whose weight is 0 is not computed (its key is absent from `weights()` and `terms()`).
* The contrastive CE is computed as logsumexp over the allowed logits minus the positive (the same
  value as the code's CE over [positive, negatives]; the order of negatives does not matter).
* The student's feature is the backbone stage as the model returns it (the code's `c4`; no dropout).

Cost (B = 8, feature map 64 x 128, C_s = 512, C_t = 2048, float32): the generative branch holds a
few C_t x h x w maps per batch: the aligned student, the masked student, the projector's hidden map,
G and G - T, 0.54 GB each, ~3 GB saved for backward; the plain projector has 2 x (9 C_t^2 + C_t) =
75.5 M parameters (0.3 GB, x3 with gradient and momentum). The contrastive term compares tokens only
within a patch: pooled maps 16 x 32 (34 MB each), one (B * 32 patches) x 256 x 256 distance tensor
(67 MB) plus its masked copy and softmax. Measured on CPU (forward + backward of L_ctr alone): peak RSS
+0.61 GB over the inputs, 0.54 GB of it G's own gradient. The cost is linear in h w (B h' w' / N2
patches of (N2 M)^2 entries), never (h w)^2, so nothing is chunked. Without pooling (`pool_size: 1`,
the CamVid setting) at 64 x 128 it is 16x the pairs: measured +7.0 GB, still within a 24 GB machine
(CamVid's own 45 x 45 maps are 4x smaller than that).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from harness.methods.base import Method, resized_like
from harness.params import FEATURES, param

MASK_MODES = ("random", "centre")
PROJECTORS = ("plain", "enhanced")


# ------------------------------------------------------------------------- the pieces (testable)
def conv(c_in: int, c_out: int, kernel: int, generator: torch.Generator) -> nn.Conv2d:
    """Conv2d with bias and PyTorch's default init (kaiming-uniform a = sqrt(5) weights, bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))), drawn only from `generator`."""
    layer = torch.nn.utils.skip_init(nn.Conv2d, c_in, c_out, kernel_size=kernel, padding=kernel // 2)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(c_in * kernel * kernel)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


class EnhancedProjector(nn.Module):
    """The code's optional projector: two conv-ReLU blocks, an adaptor conv on each, averaged."""

    def __init__(self, channels: int, generator: torch.Generator):
        super().__init__()
        self.block1 = nn.Sequential(conv(channels, channels, 3, generator), nn.ReLU())
        self.block2 = nn.Sequential(conv(channels, channels, 3, generator), nn.ReLU())
        self.adaptor1 = conv(channels, channels, 3, generator)
        self.adaptor2 = conv(channels, channels, 3, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.block1(x)
        x2 = self.block2(x1)
        return (self.adaptor1(x1) + self.adaptor2(x2)) / 2


def make_projector(kind: str, channels: int, generator: torch.Generator) -> nn.Module:
    if kind == "enhanced":
        return EnhancedProjector(channels, generator)
    return nn.Sequential(conv(channels, channels, 3, generator), nn.ReLU(), conv(channels, channels, 3, generator))


def keep_mask(batch: int, h: int, w: int, ratio: float, mode: str, generator: torch.Generator) -> torch.Tensor:
    """B x 1 x h x w float {0, 1} map of kept positions (CPU). `random`: u ~ U[0,1) from
    `generator`, zeroed where u > 1 - ratio; `centre`: the middle third block zeroed, nothing drawn."""
    if mode == "random":
        u = torch.rand(batch, 1, h, w, generator=generator)
        return (u <= 1 - ratio).float()
    keep = torch.ones(batch, 1, h, w)
    keep[:, :, h // 3:2 * h // 3, w // 3:2 * w // 3] = 0
    return keep


def feature_distillation(generated: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """L_fd = sum (G - T)^2 / B."""
    return (generated - teacher).pow(2).sum() / generated.shape[0]


def to_tokens(x: torch.Tensor, patch: int, groups: int) -> torch.Tensor:
    """B x C x h x w (h, w multiples of `patch`) -> (B * patches) x (patch^2 * groups) x (C / groups).

    Patches in row-major order per image; inside a patch, token index = position * groups + group,
    position = row * patch + column, group m = channels [m C / M, (m + 1) C / M) (the code's order).
    """
    b, c, h, w = x.shape
    x = x.reshape(b, groups, c // groups, h // patch, patch, w // patch, patch)
    # -> b, patch row, patch col, row in patch, col in patch, group, channel in group
    x = x.permute(0, 3, 5, 4, 6, 1, 2)
    return x.reshape(b * (h // patch) * (w // patch), patch * patch * groups, c // groups)


def fitted_sizes(h: int, w: int, pool_size: int, patch: int) -> tuple:
    """(pool, patch) for an h x w map: the configured ones when the pooled map holds a patch; else
    less pooling first (the code's CamVid setting switches pooling off for its small maps), then a
    smaller patch (small crops on a CPU, stride-32 transformer stages)."""
    while pool_size > 1 and min(h, w) // pool_size < patch:
        pool_size -= 1
    return pool_size, max(1, min(patch, h // pool_size, w // pool_size))


def pooled_and_cropped(x: torch.Tensor, pool_size: int, patch: int) -> torch.Tensor:
    """Max-pool (kernel = stride = pool_size, floor), then crop top-left to multiples of `patch`."""
    h, w = (size // pool_size for size in x.shape[-2:])
    if h < patch or w < patch:
        raise ValueError(f"afdcd: the contrastive term needs a map of at least patch_size x patch_size = "
                         f"{patch} x {patch} after pooling by {pool_size}, got {h} x {w}; lower "
                         f"method.afdcd.pool_size or method.afdcd.patch_size")
    if pool_size > 1:
        x = F.max_pool2d(x, pool_size)
    return x[..., :h - h % patch, :w - w % patch]


def contrastive_loss(generated: torch.Tensor, teacher: torch.Tensor, tau: float, groups: int,
                     pool_size: int, patch: int) -> torch.Tensor:
    """L_ctr (spec 9): per patch, negative-L1 similarities between generated and teacher tokens;
    CE with the same-(position, group) teacher token as the positive and all other-group teacher
    tokens as negatives; summed over the anchors, divided by B h' w' (pooled, cropped size)."""
    pool_size, patch = fitted_sizes(*generated.shape[-2:], pool_size, patch)
    g = pooled_and_cropped(generated, pool_size, patch)
    t = pooled_and_cropped(teacher, pool_size, patch)
    b, _, h, w = g.shape
    sim = -torch.cdist(to_tokens(g, patch, groups), to_tokens(t, patch, groups), p=1) / tau
    n = sim.shape[-1]
    group = torch.arange(n, device=sim.device) % groups
    left_out = (group[:, None] == group[None, :]) & ~torch.eye(n, dtype=torch.bool, device=sim.device)
    logits = sim.masked_fill(left_out, float("-inf"))
    per_anchor = torch.logsumexp(logits, dim=-1) - sim.diagonal(dim1=-2, dim2=-1)
    return per_anchor.sum() / (b * h * w)


# ------------------------------------------------------------------------------------ the method
class AfDCD(Method):
    name = "afdcd"

    @dataclass
    class Config:
        fd_weight: float = param(2e-6, kind="weight", low=0,
                                 doc="λ_fd, masked-generation MSE (Cityscapes script; code default 4e-5); 0 = off")
        ctr_weight: float = param(5e-3, kind="weight", low=0,
                                  doc="λ_ctr, contrastive term (Cityscapes script; code default 1e-3); 0 = off")
        tau: float = param(0.07, kind="temperature", low=0, low_open=True, gate="ctr_weight",
                           doc="temperature of the contrastive logits")
        mask_ratio: float = param(0.75, low=0, high=1, doc="ζ, probability that a student position is zeroed")
        mask_mode: str = param("random", choices=MASK_MODES,
                               doc="`random` (per-position Bernoulli) or `centre` (middle third zeroed)")
        groups: int = param(16, low=2, why="negatives come from other groups",
                            doc="M, channel groups per token. Must divide C_t")
        pool_size: int = param(4, low=1, doc="max-pool kernel = stride before L_ctr. 1 means no pooling "
                               "(the code spells it 0)")
        patch_size: int = param(4, low=1, doc="side of the spatial patch (N2 = 16)")
        projector: str = param("plain", choices=PROJECTORS, doc="`plain` (Conv3×3–ReLU–Conv3×3) or `enhanced` "
                               "(two blocks + two adaptors, averaged)")
        feature: str = param("stage4", choices=FEATURES,
                             doc="`stage4` (last backbone stage, the code's c4) or `stage1`..`stage3`, `head`")
        grad_clip_norm: float = param(15.0, low=0, doc="clips the gradient norm of this method's own parameters; "
                                      "0 = off")

    def __init__(self, cfg: dict, ctx):
        super().__init__(cfg, ctx)
        c = self.cfg
        feature = c["feature"]
        for who, channels in (("student", ctx.student_channels), ("teacher", ctx.teacher_channels)):
            if feature not in channels:
                raise ValueError(f"'method.afdcd.feature' = '{feature}' is not a {who} feature; valid: "
                                 f"{', '.join(sorted(channels))}")
        c_s, c_t = int(ctx.student_channels[feature]), int(ctx.teacher_channels[feature])
        groups = int(c["groups"])
        if c_t % groups:
            raise ValueError(f"'method.afdcd.groups' must divide the teacher's {c_t} channels of '{feature}', "
                             f"got {groups}")
        self.align: Optional[nn.Module] = conv(c_s, c_t, 1, ctx.generator) if c_s != c_t else None
        self.projector = make_projector(c["projector"], c_t, ctx.generator)
        self._clip_params: List[nn.Parameter] = []
        self._pending = 0

    def weights(self):
        out = {}
        if float(self.cfg["fd_weight"]) > 0:
            out["fd"] = float(self.cfg["fd_weight"])
        if float(self.cfg["ctr_weight"]) > 0:
            out["ctr"] = float(self.cfg["ctr_weight"])
        return out

    def generate(self, student_feature: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """G = projector(align(S) * keep)."""
        s = self.align(student_feature) if self.align is not None else student_feature
        return self.projector(s * keep.to(device=s.device, dtype=s.dtype))

    def terms(self, student, teacher, batch, progress):
        c = self.cfg
        s = student.features[c["feature"]]
        t = resized_like(teacher.features[c["feature"]].detach(), s)
        b, _, h, w = s.shape
        keep = keep_mask(b, h, w, float(c["mask_ratio"]), c["mask_mode"], self.ctx.generator)
        wanted = self.weights()
        if not wanted:
            return {}
        self._arm_gradient_clipping()
        g = self.generate(s, keep)
        out = {}
        if "fd" in wanted:
            out["fd"] = feature_distillation(g, t)
        if "ctr" in wanted:
            out["ctr"] = contrastive_loss(g, t, float(c["tau"]), int(c["groups"]), int(c["pool_size"]),
                                          int(c["patch_size"]))
        return out

    # --- the code's clip_grad_norm_(criterion.parameters(), 15) between backward and step
    def _arm_gradient_clipping(self) -> None:
        if not float(self.cfg["grad_clip_norm"]) > 0:
            return
        if not self._clip_params:
            self._clip_params = [p for p in self.parameters() if p.requires_grad]
            for p in self._clip_params:
                p.register_post_accumulate_grad_hook(self._gradient_arrived)
        self._pending = len(self._clip_params)

    def _gradient_arrived(self, _param: torch.Tensor) -> None:
        self._pending -= 1
        if self._pending == 0:
            torch.nn.utils.clip_grad_norm_(self._clip_params, float(self.cfg["grad_clip_norm"]))
