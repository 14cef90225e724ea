"""HeteroAKD: heterogeneous-architecture KD in a projected logit space, with knowledge mixing (KMM)
and knowledge evaluation (KEM).

Huang, Hu, Zhang, Chen, Gao, "Distilling Knowledge from Heterogeneous Architectures for Semantic
Segmentation", AAAI 2025 (paper 004, Eqs. 4-10); spec section 12. No public code. With y the one-hot
label, sigma the sigmoid and everything per pixel (h, w) and class c:

    Z^t = up(G^t_proj(F^t)),  Z^s = up(G^s_proj(F^s))      G_proj = Conv1x1 + BN + ReLU -> K  (Eq. 4)
    H(Z)     = -[y log sigma(Z) + (1 - y) log(1 - sigma(Z))]  = softplus(Z) - y Z             (Eq. 5)
    S^t      = 1 - H(Z^t) / (H(Z^t) + H(Z^s))                                              (Eq. 6)
    Zhat^t   = S^t Z^t + (1 - S^t) Z^s                         (KMM, hybrid teacher)         (Eq. 7)
    dH       = 1[H(Z^s) > H(Zhat^t)] (H(Z^s) - H(Zhat^t))      = max(0, H(Z^s) - H(Zhat^t))  (Eq. 8)
    W_{:,:,c}= softmax_c(H(Z^s) + dH)                          (KEM; both branches of Eq. 9 are this)
    L_hkd    = -1/K sum_c sum_{hw} softmax_hw(Zhat^t_c / tau) log softmax_hw(Z^s_c / tau) W_c   (Eq. 10)

F^t, F^s: the last backbone stage (`feature: stage4`) of each network; their channels and spatial
sizes may differ (CNN <-> transformer): each network has its own projector, and both projections are
resized to the same grid before anything is compared. L_hkd is the CE form of Eq. 10 (no tau^2, no
entropy subtracted: it is not 0 for identical inputs; its student gradient equals that of the
W-weighted KL). The paper's total L_task + lambda_1 L_kd + lambda_2 L_hkd takes L_kd (Eq. 1, pixel KD
on the real heads) from the `kd` method: use `+method=[kd,heteroakd]`; here `weight` is lambda_2.

Terms (UNWEIGHTED; `weights()` gives `weight` and `projector_bce_weight`):
* `hkd`: L_hkd; exactly 0 (still connected to the student's graph) before the warm-up ends.
* `teacher_projector_bce`, `student_projector_bce`: mean of H over labelled pixels and classes of
  each projector's output, the signal that trains the projectors (see 3 below). Active from step 0.

Our interpretation (spec 12.2):
1. Softmax axis of Eq. 10 (`softmax_axis`): `spatial` (default; "(:, c)" and the 1/K in Eq. 10 read
   as a CWD-style distribution over positions per class), reduced as sum over positions, 1/K over
   classes, mean over the N images. `class`: a softmax over classes per pixel,
   -1/K sum_c p^t_c log p^s_c W_c, averaged over the labelled pixels of the batch.
2. Stop-gradients: S^t, Zhat^t (which contains Z^s), dH and W are computed without gradient; the
   student receives gradient only through log softmax(Z^s / tau). The teacher features are detached.
3. Training the projectors (not stated by the paper; with Zhat^t detached the teacher projector would
   stay at its random initialisation): both projectors are trained with the Eq. 5 BCE against the
   labels (`supervise: both`, weight `projector_bce_weight`); the teacher projector sees detached
   teacher features, and the student projector's BCE is computed on DETACHED student features (a
   probe: the projector learns to read the student, but no label gradient reaches the student's
   backbone through it, so L_task stays the student's only label signal). The student projector also
   receives the L_hkd gradient, which does reach the student backbone. The probe is a second
   forward of the same projector (its BN batch statistics are the same; the running statistics,
   never used since projectors are discarded after training, are updated twice).
   `supervise: teacher` drops the student probe BCE, `none` both (then the teacher projector stays
   random). Projector BN layers are in training mode throughout (batch statistics).
4. Ignore pixels are excluded from H, W and L_hkd: the spatial softmax runs over labelled pixels only
   (an image without any contributes 0 to the sum, still divided by N), the class-axis mean and the
   BCEs count labelled pixels only.
5. Resolution (`size`): `label` (default, the paper's H x W) upsamples both projections bilinearly
   (align_corners=True, as the CIRKD-codebase task loss) to the label size; `logits` brings both to
   the student's logit grid (output stride) with nearest-resized labels (PyTorch `nearest`, spec 0),
   64x cheaper at output stride 8.
6. Warm-up (`warmup_fraction`): L_hkd is 0 while progress.fraction < warmup_fraction (the paper warms
   the student up with labels only, length not given; default 0.1 of the run), then on. The projector
   BCEs run during the warm-up so that the projections are meaningful when distillation starts.
7. Projector (`projector`): `conv_bn_relu` as the paper (Conv1x1 without bias + BN + ReLU); note the
   ReLU makes Z >= 0, so sigma(Z) >= 1/2 and H of a negative class cannot fall below log 2.
   `conv_bn` drops the ReLU (not the paper). Conv weights are drawn from `ctx.generator` only.
8. Ablations: `mixing: false` uses Zhat^t = Z^t (paper's "w/o KMM"); `evaluation: false` uses W = 1
   ("w/o KEM"; the loss is then about K times larger, retune `weight`). Defaults tau = 1, weight = 1:
   the paper's values are only in its Fig. 6 and not legible.
9. H with float guard: S^t = 1/2 where H(Z^t) + H(Z^s) underflows to 0.

Memory: at the label size every map is N x K x H x W (8 x 19 x 512 x 1024 = 80 M entries, 320 MB in
float32); the KMM/KEM targets are computed without a graph and freed before the BCEs. Measured peak
above the inputs, `terms()` forward + backward with all three terms, N = 8, K = 19, 512 x 1024 labels,
stage4 maps 64 x 128 with 512 (student) and 2048 (teacher) channels, float32, CPU (ru_maxrss):
3.7 GB (`softmax_axis: spatial`), 3.3 GB (`class`). No hw x hw map exists here; `size: logits`
divides the maps by the output stride squared (64 at stride 8).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from harness.methods.base import Method
from harness.params import FEATURES, param

AXES = ("spatial", "class")
SIZES = ("label", "logits")
PROJECTORS = ("conv_bn_relu", "conv_bn")
SUPERVISIONS = ("both", "teacher", "none")


# ------------------------------------------------------------------------- the pieces (testable)
def sigmoid_bce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise -[y log sigma(z) + (1 - y) log(1 - sigma(z))] = softplus(z) - y z (Eq. 5)."""
    return F.softplus(z) - y * z


def one_hot_labels(labels: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, valid): y N x K x h x w one-hot (all zero at ignore pixels), valid N x h x w."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    if valid.any() and int(safe.max()) >= num_classes:
        raise ValueError(f"label {int(safe.max())} >= num_classes {num_classes}")
    y = torch.zeros(labels.shape[0], num_classes, *labels.shape[1:], dtype=dtype, device=labels.device)
    y.scatter_(1, safe[:, None], valid[:, None].to(dtype))
    return y, valid


@torch.no_grad()
def knowledge_targets(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, mixing: bool,
                      evaluation: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Zhat^t, W) of KMM (Eqs. 6-7) and KEM (Eqs. 8-9), without gradient. All N x K x h x w."""
    z_s, z_t = z_s.detach(), z_t.detach()
    h_s = sigmoid_bce(z_s, y)
    if mixing:
        h_t = sigmoid_bce(z_t, y)
        den = h_t + h_s
        s_t = torch.where(den > 0, h_s / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(den, 0.5))
        z_hat = s_t * z_t + (1 - s_t) * z_s
    else:
        z_hat = z_t
    if evaluation:
        delta = (h_s - sigmoid_bce(z_hat, y)).clamp_min(0)
        weight = torch.softmax(h_s + delta, dim=1)
    else:
        weight = torch.ones_like(z_s)
    return z_hat, weight


def hetero_kd(z_s: torch.Tensor, z_hat: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor,
              tau: float, axis: str) -> torch.Tensor:
    """L_hkd (Eq. 10), CE form, ignore pixels (valid False) excluded; z_hat and weight are targets.

    spatial: 1/(N K) sum_{n,c} -sum_{i valid} softmax_i(zhat/tau) log softmax_i(z_s/tau) W.
    class:   mean over valid pixels of -1/K sum_c softmax_c(zhat/tau) log softmax_c(z_s/tau) W_c.
    """
    n, k = z_s.shape[:2]
    z_hat, weight = z_hat.detach(), weight.detach()
    if axis == "spatial":
        low = torch.finfo(z_s.dtype).min
        keep = valid[:, None].expand_as(z_s).reshape(n, k, -1)
        xs = (z_s / tau).reshape(n, k, -1).masked_fill(~keep, low)
        xt = (z_hat / tau).reshape(n, k, -1).masked_fill(~keep, low)
        log_p_s = torch.where(keep, F.log_softmax(xs, dim=-1), torch.zeros_like(xs))
        p_t = torch.where(keep, torch.softmax(xt, dim=-1), torch.zeros_like(xt))
        return -(p_t * log_p_s * weight.reshape(n, k, -1)).sum() / (n * k)
    if axis == "class":
        log_p_s = F.log_softmax(z_s / tau, dim=1)
        p_t = torch.softmax(z_hat / tau, dim=1)
        per_pixel = -(p_t * log_p_s * weight).sum(dim=1) / k
        count = valid.sum()
        if int(count) == 0:
            return z_s.sum() * 0.0
        return torch.where(valid, per_pixel, torch.zeros_like(per_pixel)).sum() / count
    raise ValueError(f"softmax axis must be one of {', '.join(AXES)}, got '{axis}'")


def mean_bce(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of Eq. 5 over labelled pixels and classes; 0 (in the graph) when nothing is labelled."""
    count = valid.sum() * z.shape[1]
    if int(count) == 0:
        return z.sum() * 0.0
    return (sigmoid_bce(z, y) * valid[:, None].to(z.dtype)).sum() / count


def projector(c_in: int, num_classes: int, relu: bool, generator: torch.Generator) -> nn.Sequential:
    """Conv1x1 (no bias) + BN (+ ReLU) to K channels; conv init drawn from `generator` only."""
    conv = torch.nn.utils.skip_init(nn.Conv2d, c_in, num_classes, 1, bias=False)
    with torch.no_grad():
        nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
    layers = [conv, nn.BatchNorm2d(num_classes)] + ([nn.ReLU()] if relu else [])
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------ the method
class HeteroAKD(Method):
    name = "heteroakd"

    @dataclass
    class Config:
        weight: float = param(1.0, kind="weight", low=0, doc="λ₂ of L_hkd (the paper's values appear only in its "
                              "Fig. 6, which is not legible)")
        tau: float = param(1.0, kind="temperature", low=0, low_open=True, gate="weight",
                           doc="temperature of L_hkd (no τ² factor, as in Eq. 10)")
        projector_bce_weight: float = param(1.0, kind="aux_weight", low=0,
                                            doc="Eq. 5 BCE against the labels that trains both projectors (the "
                                                "student's on detached features); not a distillation strength")
        warmup_fraction: float = param(0.1, low=0, high=1, high_open=True, doc="L_hkd is 0 before this fraction of "
                                       "the run (paper: labels-only warm-up, length not given)")
        feature: str = param("stage4", choices=FEATURES,
                             doc="feature projected in both networks (paper: last backbone stage)")
        softmax_axis: str = param("spatial", choices=AXES,
                                  doc="Eq. 10 softmax over `spatial` (per class, CWD-like) or `class` (per pixel)")
        size: str = param("label", choices=SIZES, doc="compare at `label` (image H×W, paper) or `logits` "
                          "(student's logit grid, cheaper)")
        projector: str = param("conv_bn_relu", choices=PROJECTORS,
                               doc="`conv_bn_relu` (paper) or `conv_bn` (no ReLU)")
        supervise: str = param("both", choices=SUPERVISIONS,
                               doc="projectors trained by the BCE: `both`, `teacher` or `none`")
        mixing: bool = param(True, doc="KMM; false uses Ẑ^t = Z^t (paper's \"w/o KMM\")")
        evaluation: bool = param(True, doc="KEM; false uses W = 1 (paper's \"w/o KEM\"; the loss is then about "
                                 "K× larger, so retune `weight`)")

    def __init__(self, cfg: dict, ctx):
        super().__init__(cfg, ctx)
        c = self.cfg
        feature = c["feature"]
        for who, channels in (("student", ctx.student_channels), ("teacher", ctx.teacher_channels)):
            if feature not in channels:
                raise ValueError(f"'method.heteroakd.feature' = '{feature}' is not a {who} feature; "
                                 f"valid: {', '.join(sorted(channels))}")
        relu = c["projector"] == "conv_bn_relu"
        k = int(ctx.num_classes)
        self.student_projector = projector(ctx.student_channels[feature], k, relu, ctx.generator)
        self.teacher_projector = projector(ctx.teacher_channels[feature], k, relu, ctx.generator)
        bce = float(c["projector_bce_weight"]) > 0
        self.supervise_teacher = bce and c["supervise"] in ("both", "teacher")
        self.supervise_student = bce and c["supervise"] == "both"

    def weights(self) -> Dict[str, float]:
        out = {"hkd": float(self.cfg["weight"])}
        if self.supervise_teacher:
            out["teacher_projector_bce"] = float(self.cfg["projector_bce_weight"])
        if self.supervise_student:
            out["student_projector_bce"] = float(self.cfg["projector_bce_weight"])
        return out

    def active(self, progress) -> bool:
        """Distillation is on once the warm-up is over."""
        return progress.fraction >= float(self.cfg["warmup_fraction"])

    def _to_grid(self, z: torch.Tensor, size) -> torch.Tensor:
        if tuple(z.shape[-2:]) == tuple(size):
            return z
        return F.interpolate(z, size=tuple(size), mode="bilinear", align_corners=True)

    def terms(self, student, teacher, batch, progress):
        c = self.cfg
        f_s = student.features[c["feature"]]
        f_t = teacher.features[c["feature"]].detach()
        mask = batch.mask
        if c["size"] == "label":
            size, labels = tuple(mask.shape[-2:]), mask
        else:
            size = tuple(student.logits.shape[-2:])
            labels = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0].long()
        z_s = self._to_grid(self.student_projector(f_s), size)
        z_t = self._to_grid(self.teacher_projector(f_t), size)
        y, valid = one_hot_labels(labels, z_s.shape[1], self.ctx.ignore_index, z_s.dtype)
        out = {}
        if self.active(progress):
            z_hat, weight = knowledge_targets(z_s, z_t, y, bool(c["mixing"]), bool(c["evaluation"]))
            out["hkd"] = hetero_kd(z_s, z_hat, weight, valid, float(c["tau"]), c["softmax_axis"])
            del z_hat, weight
        else:
            out["hkd"] = z_s.sum() * 0.0
        if self.supervise_teacher:
            out["teacher_projector_bce"] = mean_bce(z_t, y, valid)
        if self.supervise_student:
            probe = self._to_grid(self.student_projector(f_s.detach()), size)
            out["student_projector_bce"] = mean_bce(probe, y, valid)
        return out
