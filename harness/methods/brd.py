"""BRD: boundary and relation distillation (L_BD, L_RD, with the r(t) decay and a tau schedule).

Zhang, Dong, Hu, Chen, Cheng, "Boundary and Relation Distillation for Semantic Segmentation"
(paper 002, Eqs. 2-8); spec section 11. There is no public code: everything the paper leaves open is
decided below under "Our interpretation" (spec 11.2 proposes most of it).

    X^c   = BN(concat_i resize_{1/8}(Conv3x3_i(X_i))),  X in {T, S}, i over the backbone stages, d channels
    b^X   = sigmoid(Conv1x1(X^c))                   in [0, 1]^{h x w}   (boundary map, "T^B", "S^B")
    L_BD  = tau^2 / N * sum_n KL( softmax_hw(b^T_n / tau) || softmax_hw(b^S_n / tau) )
    G^X_n = X^c_n X^c_n^T / sqrt(d)                 in R^{hw x hw}     (pixel self-relation)
    L_RD  = tau^2 / (N hw) * sum_{n, r} KL( softmax(G^T_{n,r,:} / tau) || softmax(G^S_{n,r,:} / tau) )
    L     = L_task + r(t) alpha L_BD + r(t) beta L_RD,    r(t) = 1 - (t - 1) / t_max,  t = 1..t_max

alpha = `boundary_weight` (10), beta = `relation_weight` (50), t_max = the run's iterations (the paper:
40 000 iterations; its text says "epoch"), so r = 1 - progress.iteration / progress.total: 1 at the
first step, 1 / t_max at the last. BRD's own total has no pixel KD term.

Terms (all UNWEIGHTED; the train loop multiplies by `weights()`):
* `boundary` = r(t) L_BD, weight `boundary_weight`;  `relation` = r(t) L_RD, weight `relation_weight`.
  The r(t) factor is applied here because `weights()` has no access to the training progress.
* `teacher_boundary_bce` (and `student_boundary_bce` with `boundary_supervision: both`), weight
  `boundary_bce_weight`: binary cross-entropy of the boundary head's logit against the label-derived
  boundary, mean over labelled grid pixels. Not decayed by r(t).
A term whose weight is 0 is not computed (and its modules are not built where nothing else uses them).

Our interpretation (the paper is silent or not differentiable as written):
1. Stages and fusion: all four backbone stages (`stages`). "Concatenated to 256 channels after a 3x3
   conv" is read as one 3x3 conv per stage (with bias) to its share of the d = `channels` output
   channels (d / #stages, the remainder to the first stages), applied at the stage's own resolution,
   then bilinear resizing (align_corners=False) to the 1/8 grid ceil(H/8) x ceil(W/8) of the input,
   then concatenation, then (`fusion_norm: batch`, the default) a BatchNorm2d(d) over the fused map
   (batch statistics in training, weight 1 / bias 0 at init, no activation). One-conv-per-stage is 4x
   cheaper than a 3x3 conv on the concatenation (3840 -> 256 channels for a ResNet-101 teacher) and
   matches "after a 3x3 conv for T_i and S_i". Teacher and student each have their own convs (channels
   differ), so teacher and student may differ in channels and spatial size.
   Why the norm (measured, `harness train +method=brd budget=smoke`, lr 0.01): the paper writes a bare
   conv, and BRD has no public code (the paper says "implemented on MMRazor"; MMRazor has no BRD
   loss, and no authors' repository was found), so the norm cannot be matched to the authors' code;
   it is what an MMSeg/MMRazor "3x3 conv" block (ConvModule with the model's norm_cfg) carries, and
   what the row softmax of G = X X^T / sqrt(d) presumes (unit-scale channels, as in attention).
   Without it the run diverged: the teacher's stages are unnormalised (mean |x| 2 / 6 / 21 / 69 for
   stages 1-4 of the smoke teacher), so the bare fused map T^c had rms 37 and the teacher-side
   boundary logits reached |54| at init; the BCE's gradient scales with T^c (head 76, fusion 228 at
   iteration 0), one SGD step at lr 0.01 sent the logits to 9.7e3 (BCE 3.5 -> 1.3e3 -> 8.3e4 ->
   1.2e8), the exploding T^c turned the teacher's relation rows one-hot, L_RD and the student's
   gradient followed (student grad norm 652 -> 1.1e5 -> 1.6e10) and the loss was NaN at iteration 6.
   With the norm T^c and S^c have rms 1, the BCE stays at 0.64-0.82 (head grad <= 2.1), the student
   grad norm falls from 1049 to 8 within 12 iterations, and the run completes at every lr of the
   protocol's range up to 0.1 (docs/methods.md, BRD). It also makes L_RD compare the STRUCTURE of the
   two self-relations instead of their scales (bare: student rms 0.7 vs teacher 37, i.e. near-uniform
   against one-hot rows). `fusion_norm: none` keeps the bare convs (the paper as written).
2. Boundary map: the paper's B(.) outputs 0/1 along lines between pixel pairs (IRN style) and is not
   differentiable. We use its relaxation b = sigmoid(Conv1x1(X^c)) (spec 11.2.2), the probability of a
   class boundary at each grid pixel; the IRN "max along the line" is not used. The paper's "1 - ..."
   is dropped: softmax_hw((1 - b)/tau) = softmax_hw(-b/tau) would spread the mass on region interiors,
   while a boundary loss should put it on boundaries (the minimiser, b^S = b^T, is the same).
   `boundary_map: logit` feeds the pre-sigmoid logit to the spatial softmax instead (CWD-like, a
   sharper distribution; not the paper).
3. Training of the heads (spec 11.2.3): the teacher is frozen and all teacher-side quantities are
   DETACHED inside L_BD and L_RD, otherwise the teacher-side convs would drift towards the student.
   The teacher-side convs are trained by `teacher_boundary_bce` only (a target a frozen teacher can
   be probed for); they join the student's optimiser, as every method submodule does. The
   student-side convs are trained by L_BD / L_RD together with the student (and additionally by
   `student_boundary_bce` when `boundary_supervision: both`, which also sends label gradient into the
   student backbone; off by default, so the only label signal to the student stays L_task).
   `boundary_supervision: none` (or `boundary_weight: 0`, which drops the boundary heads and the BCE)
   leaves the teacher-side convs at their random initialisation: L_RD then compares the student's
   relation with that of a fixed random projection of the teacher's stages.
   Boundary target: labels nearest-resized to the grid (PyTorch `nearest`, spec 0); a labelled pixel
   is a boundary pixel when one of its 8 in-image neighbours carries a different, non-ignore label.
   Ignore pixels are excluded from the BCE; an ignore neighbour does not make a boundary. No
   pos_weight (boundaries are rare; `boundary_bce_weight` can be raised, the protocol does not tune it:
   it is an `aux_weight`, it trains a head and is no distillation strength).
4. O(.) ("region-aligned operation" of refs [39, 73]) is the identity flatten of X^c; the extra
   "/tau" of Eq. 4 and the second softmax of Eq. 5 collapse into one row softmax at temperature tau
   (spec 11.2.4). d in the sqrt is each network's fused channel count (both `channels`).
5. Reductions: the paper writes sums over M and over hw x hw items; with alpha = 10, beta = 50 those
   are unusable, so L_BD is a mean over images of the spatial KL and L_RD a mean over (image, row)
   pairs of the row KL (spec 11.2.5). tau^2 multiplies both, as Eqs. 3 and 5. Ignore/padded pixels are
   not masked in L_BD / L_RD (as the CWD / CIRKD feature terms, spec 13.7).
6. tau schedule (`schedule: range`, spec 11.2.6): tau starts at `tau`. At iteration k
   (progress.iteration) the range max - min over all entries of the softened TEACHER distributions of
   that step (softmax_hw(b^T/tau) and every row softmax(G^T/tau), over the whole batch) is compared
   with `range_threshold` (0.5); if it exceeds it (in training mode), tau *= `growth` (1.05), capped at
   `temperature_cap` (10), from iteration k+1 on: at most one step per iteration, and every call
   within one iteration sees the same tau. Measuring the range on the softened distribution (not on raw
   features, which would fire at every step and make tau = 1.05^t) makes the rule self-limiting: a
   larger tau flattens the distributions. One tau is shared by L_BD and L_RD and kept in buffers
   (`tau_now`, `tau_step_pending`, `tau_iteration`: part of the state dict); the tau used last is
   `self.last_tau`, the range seen `self.last_range`. Only computed terms (weight > 0) enter the range.
   `schedule: constant` keeps tau fixed.
7. r(t) (`decay: true`) as Eq. 7 with t = progress.iteration + 1 and t_max = progress.total;
   `decay: false` is the paper's "w/o WD" ablation.

Memory and cost of L_RD (P = h w positions): G is P x P per image (P = 8192 at a 64 x 128 grid: 67 M
entries, 268 MB in float32, several such maps per image in a plain autograd graph: > 10 GB for a batch
of 8). `relation_kl` never holds more than one block of rows: a custom autograd function computes the
loss over blocks of R = max(1, 2^22 // P) rows (4 M entries) per image and recomputes the blocks in
backward from the saved N x P x d inputs (exact, no pooling). Measured peak memory above the inputs,
forward + backward at P = 64 x 128, d = 256, float32, CPU (ru_maxrss): 290 MB at N = 1, 257 MB at
N = 2; it does not grow with N beyond the N x P x d copies (8 MB per image and tensor), so about
0.4 GB at N = 8. The cost is O(N P^2 d): ~70 GFLOP per image forward at that size, about twice that
backward (17 s per image on one CPU thread). `relation_pool` (k > 1) average-pools X^c by k x k
(ceil mode) before L_RD: P and memory / k^2, cost / k^4; default 1 (off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from harness.methods.base import Method
from harness.params import FEATURES, param

SCHEDULES = ("range", "constant")
BOUNDARY_MAPS = ("probability", "logit")
SUPERVISIONS = ("teacher", "both", "none")
FUSION_NORMS = ("batch", "none")
CHUNK_ENTRIES = 1 << 22  # entries of one block of relation rows (4 M: 16 MB in float32)
GRID_STRIDE = 8          # the paper resizes every stage to 1/8 of the input


# ------------------------------------------------------------------------- the pieces (testable)
def decay_factor(iteration: int, total: int) -> float:
    """r(t) = 1 - (t - 1) / t_max with t = iteration + 1 (iteration is 0-based), t_max = total."""
    return 1.0 - iteration / max(int(total), 1)


def boundary_targets(mask: torch.Tensor, size: Tuple[int, int], ignore_index: int
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(boundary, valid), both N x h x w at `size`: labels nearest-resized to the grid; a valid pixel
    is a boundary (1.0) when one of its 8 in-image neighbours has a different valid label."""
    labels = F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
    valid = labels != ignore_index
    padded = F.pad(labels, (1, 1, 1, 1), value=ignore_index)
    h, w = labels.shape[-2:]
    boundary = torch.zeros_like(valid)
    for di in (0, 1, 2):
        for dj in (0, 1, 2):
            if di == 1 and dj == 1:
                continue
            other = padded[:, di:di + h, dj:dj + w]
            boundary |= (other != ignore_index) & (other != labels)
    return (boundary & valid).to(torch.get_default_dtype()), valid


def boundary_kl(b_s: torch.Tensor, b_t: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 / N * sum_n KL(softmax_hw(b_t[n] / tau) || softmax_hw(b_s[n] / tau)); b: N x h x w
    (or N x 1 x h x w). The teacher map is used as given (detach it before calling)."""
    n = b_s.shape[0]
    log_p_s = F.log_softmax(b_s.reshape(n, -1) / tau, dim=1)
    log_p_t = F.log_softmax(b_t.reshape(n, -1) / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum() * tau ** 2 / n


def boundary_range(b_t: torch.Tensor, tau: float) -> float:
    """max - min over all entries of the softened teacher boundary distributions of the batch."""
    with torch.no_grad():
        p = torch.softmax(b_t.reshape(b_t.shape[0], -1) / tau, dim=1)
        return float(p.max() - p.min())


def _rows_per_block(p: int, chunk_entries: int) -> int:
    return max(1, int(chunk_entries) // max(p, 1))


class _RelationKL(torch.autograd.Function):
    """sum_{n, r} KL(softmax(G^t_{n,r,:}/tau) || softmax(G^s_{n,r,:}/tau)), G = F F^T / sqrt(d), by
    blocks of rows; backward recomputes the blocks (memory O(rows x P), never P x P)."""

    @staticmethod
    def forward(ctx, f_s, f_t, tau, rows):  # f_*: N x P x d_*, f_t carries no gradient
        n, p, _ = f_s.shape
        scale_s, scale_t = 1.0 / (math.sqrt(f_s.shape[2]) * tau), 1.0 / (math.sqrt(f_t.shape[2]) * tau)
        total = f_s.new_zeros(())
        t_max = f_s.new_full((), -math.inf)
        t_min = f_s.new_full((), math.inf)
        for i in range(n):
            for r0 in range(0, p, rows):
                log_p_s = F.log_softmax((f_s[i, r0:r0 + rows] @ f_s[i].t()) * scale_s, dim=1)
                log_p_t = F.log_softmax((f_t[i, r0:r0 + rows] @ f_t[i].t()) * scale_t, dim=1)
                p_t = log_p_t.exp()
                total += (p_t * (log_p_t - log_p_s)).sum()
                t_max = torch.maximum(t_max, p_t.max())
                t_min = torch.minimum(t_min, p_t.min())
        ctx.save_for_backward(f_s, f_t)
        ctx.scales, ctx.rows = (scale_s, scale_t), rows
        ctx.mark_non_differentiable(t_max, t_min)
        return total, t_max, t_min

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_max, _grad_min):
        f_s, f_t = ctx.saved_tensors
        (scale_s, scale_t), rows = ctx.scales, ctx.rows
        n, p, _ = f_s.shape
        grad = torch.zeros_like(f_s)
        for i in range(n):
            for r0 in range(0, p, rows):
                rs = f_s[i, r0:r0 + rows]
                p_s = torch.softmax((rs @ f_s[i].t()) * scale_s, dim=1)
                p_t = torch.softmax((f_t[i, r0:r0 + rows] @ f_t[i].t()) * scale_t, dim=1)
                # d KL / d (F F^T)[r, c] = scale_s (p_s - p_t); F F^T depends on F through both factors
                d_g = (p_s - p_t) * (grad_total * scale_s)
                grad[i, r0:r0 + rows] += d_g @ f_s[i]
                grad[i] += d_g.t() @ rs
        return grad, None, None, None


def relation_kl(f_s: torch.Tensor, f_t: torch.Tensor, tau: float, chunk_entries: int = CHUNK_ENTRIES,
                return_range: bool = False):
    """tau^2 / (N P) * sum_{n, r} KL(softmax(G^t_{n,r,:}/tau) || softmax(G^s_{n,r,:}/tau)),
    G^X_n = X_n X_n^T / sqrt(d_X), X_n the P x d_X matrix of pixel features of image n.

    f_s: N x d_s x h x w, f_t: N x d_t x h x w, same N and h x w (d may differ). The teacher is
    detached. Memory O(rows x P) per block (see the module docstring). With `return_range`, also the
    max - min over all entries of the softened teacher rows (a float).
    """
    if f_s.shape[0] != f_t.shape[0] or f_s.shape[-2:] != f_t.shape[-2:]:
        raise ValueError(f"relation_kl needs the same N and h x w, got {tuple(f_s.shape)} and {tuple(f_t.shape)}")
    n, p = f_s.shape[0], f_s.shape[-2] * f_s.shape[-1]
    xs = f_s.flatten(2).transpose(1, 2)
    xt = f_t.detach().flatten(2).transpose(1, 2).contiguous()
    total, t_max, t_min = _RelationKL.apply(xs, xt, float(tau), _rows_per_block(p, chunk_entries))
    loss = total * tau ** 2 / (n * p)
    return (loss, float(t_max - t_min)) if return_range else loss


def split_channels(total: int, parts: int) -> List[int]:
    """`total` channels as evenly as possible over `parts` (the remainder to the first parts)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _init_conv(conv: nn.Conv2d, generator: torch.Generator) -> nn.Conv2d:
    """PyTorch's default conv initialisation, drawn from `generator` only (replayable)."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
        if conv.bias is not None:
            bound = 1 / math.sqrt(conv.weight[0].numel())
            conv.bias.uniform_(-bound, bound, generator=generator)
    return conv


class Fusion(nn.Module):
    """One 3x3 conv per stage (to its share of `channels`), resize to the grid, concatenate, and (with
    `norm="batch"`) a BatchNorm over the `channels` fused channels (batch statistics in training)."""

    def __init__(self, in_channels: Sequence[int], channels: int, generator: torch.Generator,
                 norm: str = "batch"):
        super().__init__()
        outs = split_channels(channels, len(in_channels))
        self.convs = nn.ModuleList(
            _init_conv(torch.nn.utils.skip_init(nn.Conv2d, c_in, c_out, 3, padding=1), generator)
            for c_in, c_out in zip(in_channels, outs))
        self.norm = nn.BatchNorm2d(channels) if norm == "batch" else None  # weight 1, bias 0

    def forward(self, features: Sequence[torch.Tensor], size: Tuple[int, int]) -> torch.Tensor:
        parts = []
        for conv, x in zip(self.convs, features):
            y = conv(x)
            if tuple(y.shape[-2:]) != tuple(size):
                y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
            parts.append(y)
        fused = torch.cat(parts, dim=1)
        return self.norm(fused) if self.norm is not None else fused


def boundary_head(channels: int, generator: torch.Generator) -> nn.Conv2d:
    return _init_conv(torch.nn.utils.skip_init(nn.Conv2d, channels, 1, 1), generator)


# ------------------------------------------------------------------------------------ the method
class BRD(Method):
    name = "brd"

    @dataclass
    class Config:
        boundary_weight: float = param(10.0, kind="weight", low=0, doc="α, boundary distillation (paper: 10)")
        relation_weight: float = param(50.0, kind="weight", low=0, doc="β, relation distillation (paper: 50)")
        boundary_bce_weight: float = param(1.0, kind="aux_weight", low=0,
                                           doc="BCE of the boundary head(s) against label boundaries "
                                               "(trains the teacher-side head; not a distillation strength)")
        tau: float = param(1.0, kind="temperature", low=0, low_open=True, gate=("boundary_weight", "relation_weight"),
                           doc="initial temperature of both terms (paper: 1)")
        schedule: str = param("range", choices=SCHEDULES, doc="`range` multiplies τ by `growth` after a step whose "
                              "softened-teacher range exceeds `range_threshold`; `constant` keeps τ fixed")
        growth: float = param(1.05, low=1, why="tau only grows", doc="factor of one τ step (paper: 1.05)")
        range_threshold: float = param(0.5, low=0, low_open=True, doc="range that triggers a step (paper: 0.5)")
        temperature_cap: float = param(10.0, doc="τ never exceeds this; must be ≥ `tau`")
        decay: bool = param(True, doc="r(t) on both terms (paper's \"WD\"); false = the \"w/o WD\" ablation")
        stages: List[str] = param(["stage1", "stage2", "stage3", "stage4"], choices=FEATURES,
                                  doc="backbone stages fused (distinct, at least one)")
        channels: int = param(256, low=1, doc="d, fused channels of each network (paper: 256); ≥ the number of stages")
        fusion_norm: str = param("batch", choices=FUSION_NORMS, doc="`batch`: BatchNorm on X^c (mmseg's "
                                 "conv-norm block; stable at the protocol's lr); `none`: the bare 3×3 convs "
                                 "as the paper writes (diverges at lr 0.01, see the docs)")
        boundary_map: str = param("probability", choices=BOUNDARY_MAPS, doc="softmax input of L_BD: `probability` "
                                  "(sigmoid) or `logit` (CWD-like, not the paper)")
        boundary_supervision: str = param("teacher", choices=SUPERVISIONS,
                                          doc="boundary heads trained by the BCE: `teacher`, `both` or `none`")
        relation_pool: int = param(1, low=1, doc="k×k average pooling of X^c before L_RD (1 = none)")

        @classmethod
        def cross_check(cls, c: dict, prefix: str) -> Optional[str]:
            if float(c["temperature_cap"]) < float(c["tau"]):
                return f"'{prefix}.temperature_cap' ({c['temperature_cap']}) must be >= '{prefix}.tau' ({c['tau']})"
            stages = list(c["stages"])
            if not stages or len(set(stages)) != len(stages):
                return f"'{prefix}.stages' must be a non-empty list of distinct stages, got {stages}"
            if int(c["channels"]) < len(stages):
                return f"'{prefix}.channels' ({c['channels']}) must be >= the number of stages"
            return None

    def __init__(self, cfg: dict, ctx):
        super().__init__(cfg, ctx)
        c = self.cfg
        self.tau0 = float(c["tau"])
        self.stages = list(c["stages"])
        for who, channels in (("student", ctx.student_channels), ("teacher", ctx.teacher_channels)):
            missing = [s for s in self.stages if s not in channels]
            if missing:
                raise ValueError(f"'method.brd.stages': {missing} are not {who} features; "
                                 f"valid: {', '.join(sorted(channels))}")

        self.use_boundary = float(c["boundary_weight"]) > 0
        self.use_relation = float(c["relation_weight"]) > 0
        sup = c["boundary_supervision"] if float(c["boundary_bce_weight"]) > 0 else "none"
        self.supervise_teacher = sup in ("teacher", "both") and self.use_boundary
        self.supervise_student = sup == "both" and self.use_boundary
        d, g = int(c["channels"]), ctx.generator
        norm = c["fusion_norm"]
        self.student_fusion = Fusion([ctx.student_channels[s] for s in self.stages], d, g, norm)
        self.teacher_fusion = Fusion([ctx.teacher_channels[s] for s in self.stages], d, g, norm)
        self.student_boundary = boundary_head(d, g) if self.use_boundary else None
        self.teacher_boundary = boundary_head(d, g) if self.use_boundary else None
        # tau schedule state (in the state dict): current tau, a step owed by the last iteration, and
        # the iteration the schedule last saw
        self.register_buffer("tau_now", torch.tensor(self.tau0, dtype=torch.float64))
        self.register_buffer("tau_step_pending", torch.tensor(False))
        self.register_buffer("tau_iteration", torch.tensor(-1, dtype=torch.long))
        self.last_tau = self.tau0
        self.last_range: Optional[float] = None

    # -------------------------------------------------------------------------------- interface
    def weights(self) -> Dict[str, float]:
        c, out = self.cfg, {}
        if self.use_boundary:
            out["boundary"] = float(c["boundary_weight"])
        if self.use_relation:
            out["relation"] = float(c["relation_weight"])
        if self.supervise_teacher:
            out["teacher_boundary_bce"] = float(c["boundary_bce_weight"])
        if self.supervise_student:
            out["student_boundary_bce"] = float(c["boundary_bce_weight"])
        return out

    def grid(self, mask: torch.Tensor) -> Tuple[int, int]:
        """The 1/8 grid of the input: ceil(H / 8) x ceil(W / 8) (the stride-8 size of the backbones)."""
        h, w = mask.shape[-2:]
        return -(-h // GRID_STRIDE), -(-w // GRID_STRIDE)

    def fused(self, student, teacher, size) -> Tuple[torch.Tensor, torch.Tensor]:
        """(S^c, T^c): N x d x h x w each; T^c is computed from the detached teacher features and
        keeps the gradient of the teacher-side convs (for their BCE)."""
        s_c = self.student_fusion([student.features[s] for s in self.stages], size)
        t_c = self.teacher_fusion([teacher.features[s].detach() for s in self.stages], size)
        return s_c, t_c

    def _map(self, logit: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logit) if self.cfg["boundary_map"] == "probability" else logit

    def _advance_schedule(self, iteration: int) -> float:
        """At the first call of a new iteration, apply the step the previous iteration asked for; the
        tau returned stays the same for every call within one iteration."""
        if self.cfg["schedule"] == "range" and iteration > int(self.tau_iteration):
            if bool(self.tau_step_pending):
                self.tau_now.fill_(min(float(self.tau_now) * float(self.cfg["growth"]),
                                       float(self.cfg["temperature_cap"])))
            self.tau_step_pending.fill_(False)
            self.tau_iteration.fill_(iteration)
        return float(self.tau_now)

    def terms(self, student, teacher, batch, progress):
        tau = self._advance_schedule(progress.iteration)
        r = decay_factor(progress.iteration, progress.total) if self.cfg["decay"] else 1.0
        size = self.grid(batch.mask)
        s_c, t_c = self.fused(student, teacher, size)
        out, ranges = {}, []
        if self.use_boundary:
            s_logit, t_logit = self.student_boundary(s_c)[:, 0], self.teacher_boundary(t_c)[:, 0]
            b_t = self._map(t_logit.detach())
            out["boundary"] = r * boundary_kl(self._map(s_logit), b_t, tau)
            ranges.append(boundary_range(b_t, tau))
            if self.supervise_teacher or self.supervise_student:
                target, valid = boundary_targets(batch.mask, size, self.ctx.ignore_index)
                target = target.to(t_logit.dtype)
                for who, logit, on in (("teacher", t_logit, self.supervise_teacher),
                                       ("student", s_logit, self.supervise_student)):
                    if on:
                        out[f"{who}_boundary_bce"] = masked_bce(logit, target, valid)
        if self.use_relation:
            k = int(self.cfg["relation_pool"])
            fs, ft = (s_c, t_c) if k == 1 else (F.avg_pool2d(x, k, k, ceil_mode=True) for x in (s_c, t_c))
            loss, rng = relation_kl(fs, ft, tau, return_range=True)
            out["relation"] = r * loss
            ranges.append(rng)
        self.last_tau = tau
        self.last_range = max(ranges) if ranges else None
        if (self.cfg["schedule"] == "range" and self.training and self.last_range is not None
                and self.last_range > float(self.cfg["range_threshold"])):
            self.tau_step_pending.fill_(True)
        return out


def masked_bce(logit: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy (with logits) over the valid pixels; 0 (in the graph) if none."""
    per_pixel = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    count = valid.sum()
    if int(count) == 0:
        return logit.sum() * 0.0
    return (per_pixel * valid).sum() / count
