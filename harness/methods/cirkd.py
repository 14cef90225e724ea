"""CIRKD: cross-image relational knowledge distillation (three terms).

Yang, Zhou, Wang, Zhong, Wang, Xu, Ni, "Cross-Image Relational Knowledge Distillation for Semantic
Segmentation", CVPR 2022. Spec section 7 (reference behaviour = `winycg/CIRKD` at `2d8ad0f`,
`losses/cirkd_mini_batch.py`, `losses/cirkd_memory.py`, `train_cirkd.py`). All three terms work on
the post-head feature (`feature: head`; the student's is taken after its dropout), at the
student's feature size; a teacher map of another size is resized bilinearly (ours, as in kd/cwd).
n(x) = x / max(||x||_2, 1e-12) over channels; KL(p || q) = sum p (log p - log q).

1. `batch_p2p` (`batch_p2p_weight` alpha = 1, `batch_p2p_tau` = 0.1), spec 7.1. Unprojected,
   normalised features F_i (A = h*w rows per image i). For every ORDERED pair (i, j) of the batch,
   self-pairs included, S_ij = F_i F_j^T (A x A), row softmax at tau:
       L_batch = 1/B^2 sum_{i,j} 1/A sum_a KL( softmax(S^t_ij[a,:] / tau) || softmax(S^s_ij[a,:] / tau) )
   No tau^2, no ignore mask; student and teacher may have different channel counts (A x A maps).
   The batch is this process's batch (the reference's all-gather is commented out; its 8 x 2 GPU
   runs have B = 2 here).
2. `memory_p2p` (`memory_p2p_weight` beta = 0.1) and 3. `memory_p2r` (`memory_p2r_weight`
   gamma = 0.1), spec 7.2-7.5. Anchors a = every pixel of the batch whose nearest-resized label is
   not ignore; s_a = n(head(F^s))_a (projection head below), t_a = n(F^t)_a. V = rows sampled from
   the pixel (p2p) or region (p2r) queue, detached:
       l^t_a = t_a V^T / tau_c,  l^s_a = s_a V^T / tau_c      (tau_c = `contrast_tau` = 0.1)
       L_mem = tau_kd^2 / n_anchor * sum_a KL( softmax(l^t_a / tau_kd) || softmax(l^s_a / tau_kd) )
   (tau_kd = `contrast_kd_tau` = 1). No valid anchor: both terms are exactly 0, kept in the graph
   (the reference returns NaN there, spec 7.3; not reproduced).

Projection head (memory terms only, always present as in the code; the paper says only when the
channels differ): Conv1x1(C_s -> C_t, no bias) - BatchNorm (SyncBN in the reference; one process
here) - ReLU - Conv1x1(C_t -> C_t, no bias). A submodule of this method, so it joins the student's
SGD (same lr, wd, schedule, spec 7.2). Conv weights use PyTorch's default init (kaiming-uniform,
a = sqrt(5)) drawn from `ctx.generator`, so building the method does not touch the global RNG.

Queues (registered buffers: `pixel_queue` K x N_p x C_t, `region_queue` K x N_r x C_t, per-class
write pointers `pixel_queue_ptr`, `region_queue_ptr`; `state_dict()` carries them, so a checkpoint
restores the memory). Initialised with Gaussian noise from `ctx.generator`, L2-normalised per row.
Updated inside `terms`, BEFORE the losses are computed (as the code; the paper's Algorithm 1 says
after), with the normalised teacher feature of this process's batch (the reference all-gathers it
from every GPU first), image by image, classes in ascending id (spec 7.4):
* region: mean of the class's normalised teacher vectors in the image, re-normalised, written at
  ptr_r[k]; ptr_r[k] <- (ptr_r[k] + 1) mod N_r;
* pixel: K' = min(n_k, `pixel_update_freq` = 16) vectors chosen by one `randperm(n_k)` from
  `ctx.generator`, normalised, written to rows [ptr, ptr + K'); if ptr + K' >= N_p they go to the
  LAST K' rows instead and ptr <- 0 (the code's wrap rule, which may overwrite recent rows), else
  ptr <- ptr + K'. Which pixels: `reference_compat: false` (default, the paper) takes them among
  the class's pixels; `true` reproduces the reference bug (spec 7.4): the permutation of
  0..n_k-1 is used as raster positions of the image, so the "class-k" row holds random pixels among
  the image's first n_k positions, whatever their class.
Sampling for the loss (after the update; nothing is drawn when there is no anchor, as the code):
one `randperm(N_p)` and the first k_p = floor(`pixel_contrast_size` / K) + 1 indices, the SAME
index set for every class; V_p = those rows of every class stacked class by class (K * k_p rows,
4104 for K = 19); then one `randperm(N_r)`, k_r = floor(`region_contrast_size` / K) + 1 (1026).
The paper's K_p = 4096 / K_r = 1024 are totals; the code's per-class counts are used. k_p > N_p or
k_r > N_r is refused (the code would silently use fewer rows).

Randomness: only `ctx.generator` (CPU): projector init, queue init, enqueue permutations, sampling.
Draw order per call: for each image, for each class present: randperm(n_k); then randperm(N_p),
randperm(N_r). A test replays it exactly.

Cost and memory. The reference loops over image pairs and keeps every pair's autograd graph until
backward (by inspection ~2-3 A x A float maps per pair: ~0.8 GB per pair at A = 64 x 128 = 8192,
~3 GB at its B = 2, ~50 GB at B = 8). Here every KL over similarity rows goes through
`similarity_kl_sum`: the rows are cut into blocks of at most `chunk_elements` (default 2^24)
similarity entries and each block is wrapped in `torch.utils.checkpoint` (its maps are recomputed in
backward; only the normalised feature rows are kept). The mini-batch term computes, per block of R
rows (any images), the R x (B*A) map against all images at once, one softmax per image's column
block; value and gradient do not depend on the chunking (tested). Peak memory therefore does not
grow with B or A beyond the feature rows (B*A*(C_s + C_t) floats, a few copies). Measured (CPU,
float32, process RSS increase over forward + backward, 64 x 128 map): mini-batch term B = 2,
C_s = 128, C_t = 256: +0.35 GB; B = 8, C_s = C_t = 16: +0.34 GB (so B = 8 with 128/256 channels is
about +0.35 GB + 0.3 GB of feature rows, < 1 GB; the naive (B*A)^2 map alone would be 17 GB);
memory terms B = 8, K = 19, C_s = 128, C_t = 256 (65 536 anchors x 4104 queue rows): +0.49 GB.
Compute is the method's own and large on a CPU: 2 (B*A)^2 (C_s + C_t) flops forward for the
mini-batch term, ~3x with backward and recomputation (B = 8 at 64 x 128 took ~14 min per step on
one loaded CPU thread; B = 2: ~100 s). The queues take K (N_p + N_r) C_t floats: 428 MB at K = 19,
C_t = 256; 3.4 GB at C_t = 2048 (buffers, as in the reference). `batch_pool > 1` average-pools both
features (kernel = stride = batch_pool, ceil_mode) before the mini-batch term: a cost knob, 1 = off
as in the CVPR'22 code (the later CIRKDv2 code pools 4 x 4 only when h, w >= 256; not reproduced).

Composition: the reference "CIRKD" recipe is L_CE (+0.4 aux) + pixel KD + alpha L_batch + beta
L_p2p + gamma L_p2r (spec 7; its KD baselines also add the adversarial term): use
`+method=[kd,cirkd]`; this file implements only the three CIRKD terms. A term whose weight is 0
is not computed (and with both memory weights 0, no projection head or queue is built).
Temperatures: the reference passes one flag (`--contrast-temperature`, 0.1) to the mini-batch term
and the memory similarity; here they are two keys with that default (`batch_p2p_tau`,
`contrast_tau`). The KL is `log_softmax`-based (finite where the reference's is).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from harness.methods.base import Method, pixel_rows, resized_like
from harness.methods.cwd import make_projector
from harness.params import FEATURES, param

MEMORY_WEIGHTS = ("memory_p2p_weight", "memory_p2r_weight")  # the memory terms are off when both are 0
CHUNK_ELEMENTS = 2 ** 24  # the default of Config.chunk_elements (memory only, not the value)


# ------------------------------------------------------------------------- the pieces (testable)
def _block_kl(s_rows: torch.Tensor, s_keys: torch.Tensor, t_rows: torch.Tensor, t_keys: torch.Tensor,
              tau: float, groups: int) -> torch.Tensor:
    r = s_rows.shape[0]
    log_p_s = F.log_softmax((s_rows @ s_keys.t() / tau).view(r, groups, -1), dim=-1)
    log_p_t = F.log_softmax((t_rows @ t_keys.t() / tau).view(r, groups, -1), dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum()


def similarity_kl_sum(s_rows: torch.Tensor, s_keys: torch.Tensor, t_rows: torch.Tensor,
                      t_keys: torch.Tensor, tau: float, groups: int = 1,
                      chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """sum_rows sum_g KL( softmax_g(t_r t_keys^T / tau) || softmax_g(s_r s_keys^T / tau) ).

    Row r of the similarity map (n_keys entries) is cut into `groups` equal consecutive blocks,
    each with its own softmax. Rows are processed in blocks of <= chunk_elements map entries, each
    block checkpointed when a gradient is needed, so peak memory does not grow with the row count.
    """
    n, n_keys = s_rows.shape[0], s_keys.shape[0]
    if n_keys % groups:
        raise ValueError(f"{n_keys} keys do not split into {groups} equal groups")
    step = max(1, int(chunk_elements) // max(n_keys, 1))
    needs_grad = torch.is_grad_enabled() and (s_rows.requires_grad or s_keys.requires_grad)
    parts = []
    for start in range(0, n, step):
        args = (s_rows[start:start + step], s_keys, t_rows[start:start + step], t_keys, tau, groups)
        if needs_grad and n > step:
            parts.append(checkpoint(_block_kl, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(_block_kl(*args))
    if not parts:
        return (s_rows.sum() + s_keys.sum()) * 0.0
    return torch.stack(parts).sum()


def batch_p2p(s_feat: torch.Tensor, t_feat: torch.Tensor, tau: float, pool: int,
              chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mini-batch pixel-to-pixel term (spec 7.1): 1/B^2 sum_{i,j} 1/A sum_a KL(t || s) of the row
    softmaxes of n(F_i) n(F_j)^T / tau. s_feat: B x C_s x h x w, t_feat: B x C_t x h x w (same h, w)."""
    if s_feat.shape[0] != t_feat.shape[0] or s_feat.shape[-2:] != t_feat.shape[-2:]:
        raise ValueError(f"cirkd batch_p2p needs equal B, h, w: student {tuple(s_feat.shape)}, "
                         f"teacher {tuple(t_feat.shape)}")
    if pool > 1:
        s_feat = F.avg_pool2d(s_feat, pool, pool, ceil_mode=True)
        t_feat = F.avg_pool2d(t_feat, pool, pool, ceil_mode=True)
    b, a = s_feat.shape[0], s_feat.shape[2] * s_feat.shape[3]
    s = pixel_rows(F.normalize(s_feat, p=2, dim=1))  # (B*A) x C_s, image-major
    t = pixel_rows(F.normalize(t_feat, p=2, dim=1))
    return similarity_kl_sum(s, s, t, t, tau, groups=b, chunk_elements=chunk_elements) / (b * b * a)


def memory_kl(s_anchor: torch.Tensor, t_anchor: torch.Tensor, contrast: torch.Tensor, contrast_tau: float,
              kd_tau: float, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Memory term (spec 7.5): tau_kd^2 / n * sum_a KL(softmax(t_a V^T / tau_c / tau_kd) ||
    softmax(s_a V^T / tau_c / tau_kd)); anchors n x C (normalised), V = `contrast` m x C (detached)."""
    n = s_anchor.shape[0]
    if n == 0:
        return s_anchor.sum() * 0.0
    contrast = contrast.detach().to(s_anchor.dtype)
    total = similarity_kl_sum(s_anchor, contrast, t_anchor.detach(), contrast, contrast_tau * kd_tau,
                              chunk_elements=chunk_elements)
    return total * kd_tau ** 2 / n


def nearest_labels(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """B x H x W labels at `size` with PyTorch `nearest` (index floor(i * H_in / H_out))."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.long()
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def projection_head(c_in: int, c_out: int, generator: torch.Generator) -> nn.Sequential:
    """Conv1x1(c_in -> c_out) - BN - ReLU - Conv1x1(c_out -> c_out), no conv biases (spec 7.2)."""
    return nn.Sequential(make_projector(c_in, c_out, generator), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         make_projector(c_out, c_out, generator))


# ------------------------------------------------------------------------------------ the method
class CIRKD(Method):
    name = "cirkd"

    @dataclass
    class Config:
        batch_p2p_weight: float = param(1.0, kind="weight", low=0, doc="α, mini-batch pixel-to-pixel term")
        memory_p2p_weight: float = param(0.1, kind="weight", low=0,
                                         doc="β, memory pixel-to-pixel term (VOC scripts: 0.01)")
        memory_p2r_weight: float = param(0.1, kind="weight", low=0, doc="γ, memory pixel-to-region term (VOC "
                                         "scripts: 0.01). β = γ = 0 builds no head and no queues")
        batch_p2p_tau: float = param(0.1, kind="temperature", low=0, low_open=True, gate="batch_p2p_weight",
                                     doc="similarity temperature of the mini-batch term (reference "
                                         "`--contrast-temperature`)")
        contrast_tau: float = param(0.1, kind="temperature", low=0, low_open=True, gate=MEMORY_WEIGHTS,
                                    doc="τ_c, similarity temperature of the memory terms (`--contrast-temperature`)")
        contrast_kd_tau: float = param(1.0, kind="temperature", low=0, low_open=True, gate=MEMORY_WEIGHTS,
                                       doc="τ_kd, KD temperature of the memory terms, applied with its square "
                                           "(`--contrast-kd-temperature`)")
        pixel_memory_size: int = param(20000, low=1, doc="N_p, pixel-queue rows per class")
        region_memory_size: int = param(2000, low=1, doc="N_r, region-queue rows per class")
        pixel_contrast_size: int = param(4096, low=1, doc="⌊this/K⌋+1 pixel-queue rows sampled per class, the same "
                                         "rows for every class; ⌊this/K⌋+1 ≤ `pixel_memory_size`")
        region_contrast_size: int = param(1024, low=1, doc="⌊this/K⌋+1 region-queue rows sampled per class; "
                                          "⌊this/K⌋+1 ≤ `region_memory_size`")
        pixel_update_freq: int = param(16, low=1, doc="V, teacher pixels enqueued per image and class; "
                                       "≤ `pixel_memory_size`")
        feature: str = param("head", choices=FEATURES, doc="distilled feature: `head` (before the classifier) "
                             "or `stage1`..`stage4`")
        reference_compat: bool = param(False, doc="true reproduces the reference's pixel-enqueue indexing bug")
        batch_pool: int = param(1, low=1, doc="average-pool kernel before the mini-batch term (1 = off, as in the "
                                "CVPR'22 code)")
        chunk_elements: int = param(CHUNK_ELEMENTS, low=1, doc="similarity entries per checkpointed block (affects "
                                    "memory, not the value)")

        @classmethod
        def cross_check(cls, c: dict, prefix: str) -> Optional[str]:
            if int(c["pixel_update_freq"]) > int(c["pixel_memory_size"]):
                return (f"'{prefix}.pixel_update_freq' = {c['pixel_update_freq']} exceeds "
                        f"pixel_memory_size = {c['pixel_memory_size']}")
            return None

    def __init__(self, cfg: dict, ctx):
        super().__init__(cfg, ctx)
        c = self.cfg
        k = int(ctx.num_classes)
        self.num_classes = k
        self.pixel_per_class = int(c["pixel_contrast_size"]) // k + 1
        self.region_per_class = int(c["region_contrast_size"]) // k + 1
        if self.pixel_per_class > int(c["pixel_memory_size"]):
            raise ValueError(f"'method.cirkd.pixel_contrast_size' = {c['pixel_contrast_size']} samples "
                             f"{self.pixel_per_class} rows per class (floor(size / {k}) + 1), more than "
                             f"pixel_memory_size = {c['pixel_memory_size']}")
        if self.region_per_class > int(c["region_memory_size"]):
            raise ValueError(f"'method.cirkd.region_contrast_size' = {c['region_contrast_size']} samples "
                             f"{self.region_per_class} rows per class (floor(size / {k}) + 1), more than "
                             f"region_memory_size = {c['region_memory_size']}")
        feature = c["feature"]
        for who, channels in (("student", ctx.student_channels), ("teacher", ctx.teacher_channels)):
            if feature not in channels:
                raise ValueError(f"'method.cirkd.feature' = '{feature}' is not a {who} feature; valid: "
                                 f"{', '.join(sorted(channels))}")
        self.memory_on = float(c["memory_p2p_weight"]) > 0 or float(c["memory_p2r_weight"]) > 0
        self.projector: Optional[nn.Module] = None
        if self.memory_on:
            c_s, c_t = int(ctx.student_channels[feature]), int(ctx.teacher_channels[feature])
            g = ctx.generator
            self.projector = projection_head(c_s, c_t, g)
            n_p, n_r = int(c["pixel_memory_size"]), int(c["region_memory_size"])
            self.register_buffer("pixel_queue", F.normalize(torch.randn(k, n_p, c_t, generator=g), p=2, dim=2))
            self.register_buffer("pixel_queue_ptr", torch.zeros(k, dtype=torch.long))
            self.register_buffer("region_queue", F.normalize(torch.randn(k, n_r, c_t, generator=g), p=2, dim=2))
            self.register_buffer("region_queue_ptr", torch.zeros(k, dtype=torch.long))

    def weights(self) -> Dict[str, float]:
        return {name: float(self.cfg[f"{name}_weight"])
                for name in ("batch_p2p", "memory_p2p", "memory_p2r") if float(self.cfg[f"{name}_weight"]) > 0}

    # ------------------------------------------------------------------------------- the queues
    @torch.no_grad()
    def enqueue(self, t_norm: torch.Tensor, labels: torch.Tensor) -> None:
        """Write the batch into the queues (spec 7.4). t_norm: B x C_t x h x w, L2-normalised;
        labels: B x h x w at the same size."""
        gen, ignore, k_max = self.ctx.generator, self.ctx.ignore_index, self.num_classes
        n_p, n_r = self.pixel_queue.shape[1], self.region_queue.shape[1]
        freq, compat = int(self.cfg["pixel_update_freq"]), bool(self.cfg["reference_compat"])
        feats = t_norm.flatten(2).to(self.pixel_queue.dtype)  # B x C x A
        labels = labels.flatten(1).cpu()
        p_ptr, r_ptr = self.pixel_queue_ptr.tolist(), self.region_queue_ptr.tolist()
        device = feats.device
        for b in range(feats.shape[0]):
            lab = labels[b]
            for k in torch.unique(lab).tolist():
                if k == ignore:
                    continue
                if not 0 <= k < k_max:
                    raise ValueError(f"cirkd: label {k} is neither a class id in [0, {k_max}) nor ignore "
                                     f"({ignore})")
                idx = torch.nonzero(lab == k).flatten()
                n = idx.numel()
                # region: the class's mean vector in this image
                mean = feats[b][:, idx.to(device)].mean(dim=1)
                self.region_queue[k, r_ptr[k]] = F.normalize(mean, p=2, dim=0)
                r_ptr[k] = (r_ptr[k] + 1) % n_r
                # pixels: K' = min(n_k, V) of them
                perm = torch.randperm(n, generator=gen)
                kk = min(n, freq)
                cols = perm[:kk] if compat else idx[perm[:kk]]
                rows = F.normalize(feats[b][:, cols.to(device)].t(), p=2, dim=1)
                if p_ptr[k] + kk >= n_p:
                    self.pixel_queue[k, n_p - kk:] = rows
                    p_ptr[k] = 0
                else:
                    self.pixel_queue[k, p_ptr[k]:p_ptr[k] + kk] = rows
                    p_ptr[k] += kk
        self.pixel_queue_ptr.copy_(torch.tensor(p_ptr))
        self.region_queue_ptr.copy_(torch.tensor(r_ptr))

    def sample_contrast(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(V_p, V_r): the same random row set of every class, stacked class by class (spec 7.4)."""
        gen = self.ctx.generator
        device = self.pixel_queue.device
        p_idx = torch.randperm(self.pixel_queue.shape[1], generator=gen)[:self.pixel_per_class]
        r_idx = torch.randperm(self.region_queue.shape[1], generator=gen)[:self.region_per_class]
        v_p = self.pixel_queue[:, p_idx.to(device)].reshape(-1, self.pixel_queue.shape[2])
        v_r = self.region_queue[:, r_idx.to(device)].reshape(-1, self.region_queue.shape[2])
        return v_p, v_r

    # ------------------------------------------------------------------------------- the terms
    def terms(self, student, teacher, batch, progress):
        c = self.cfg
        f = c["feature"]
        s_feat = student.features[f]
        t_feat = resized_like(teacher.features[f].detach(), s_feat)
        chunk = int(c["chunk_elements"])
        out: Dict[str, torch.Tensor] = {}
        if float(c["batch_p2p_weight"]) > 0:
            out["batch_p2p"] = batch_p2p(s_feat, t_feat, float(c["batch_p2p_tau"]), int(c["batch_pool"]), chunk)
        if self.memory_on:
            out.update(self.memory_terms(s_feat, t_feat, batch.mask))
        return out

    def memory_terms(self, s_feat: torch.Tensor, t_feat: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        c = self.cfg
        s_proj = F.normalize(self.projector(s_feat), p=2, dim=1)
        t_norm = F.normalize(t_feat.detach(), p=2, dim=1)
        labels = nearest_labels(mask, tuple(s_proj.shape[-2:])).to(s_proj.device)
        self.enqueue(t_norm, labels)  # before the losses, as the reference
        valid = labels.reshape(-1) != self.ctx.ignore_index
        names: List[str] = [n for n in ("memory_p2p", "memory_p2r") if float(c[f"{n}_weight"]) > 0]
        if not bool(valid.any()):  # no anchor: exactly 0, in the graph, and nothing sampled
            zero = s_proj.sum() * 0.0
            return {n: zero for n in names}
        s_anchor = pixel_rows(s_proj)[valid]
        t_anchor = pixel_rows(t_norm)[valid].to(s_anchor.dtype)
        v_p, v_r = self.sample_contrast()
        tau_c, tau_kd, chunk = float(c["contrast_tau"]), float(c["contrast_kd_tau"]), int(c["chunk_elements"])
        contrast = {"memory_p2p": v_p, "memory_p2r": v_r}
        return {n: memory_kl(s_anchor, t_anchor, contrast[n], tau_c, tau_kd, chunk) for n in names}
