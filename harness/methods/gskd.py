"""GSKD: global structural knowledge distillation (L_gskd).

Park, Ahn, Choi, Min, "Global Structural Knowledge Distillation for Semantic Segmentation",
IEEE Access 2025 (paper 000, Algorithm 1, Eqs. 5-9); spec section 10. Per image:

1. Class-balanced sampling (CBS). Labels are nearest-resized to the teacher's logit size
   (spec 0: PyTorch `nearest`, index floor(i * H_in / H_out)); a pixel is a candidate when its label
   is not ignore and equals argmax of the teacher's logits ("teacher-correct"). For each of the
   C_img classes present among the candidates, N pixels are drawn; the same positions are read from
   the student and the teacher feature, giving M_s, M_t in R^{B x d} with B = N * C_img, rows
   L2-normalised over channels.
2. Global structural similarity map (GSSM):  V_l = M_l M_l^T in R^{B x B}, l in {s, t}   (Eq. 5).
3. Sub-image descriptors (SID): each ROW of V is permuted by its own random permutation (the same
   one for student and teacher): V~[r, c] = V[r, pi_r(c)]. The columns of V~ are cut into G = B / S
   groups of S; descriptor i is the B x S block V~[:, iS:(i+1)S] read as one vector of B*S entries.
4.  L_gskd(image) = tau^2 / G * sum_i KL( softmax(d^t_i / tau) || softmax(d^s_i / tau) ) [/ (B*S)]
   (Eq. 7; one softmax over all B*S entries of a descriptor, as in the authors' code; the bracket
   is `reduction: entries`), and L_gskd = mean over the images that took part.

Standalone the paper trains L_task + L_kd + 10 L_gskd with N = 16, S = 8 (use `+method=[kd,gskd]`);
as a plug-in, L_other + lambda L_gskd with N = 8, S = C_img and lambda 2 (CWD), 5 (SKD, CIRKD,
Af-DCD), 10 (DIST); `mode` selects the N/S preset, `n_per_class` / `group_size` override it.

Choices where paper and released code (`MaryAhn/GSKD`, `losses/gskd_loss_B.py`) are silent, disagree
or are wrong (spec 10.2, 10.3); each is a config key unless marked fixed:

* The gradient reaches the student. The released code all-gathers the student feature through a
  no-grad helper, so its loss is a constant for the student and its projection head (spec 10.3);
  not reproduced. Also not reproduced: only the last image counting (the accumulator is reset inside
  the image loop) and features scrambled by reshape instead of permute. All images count; a sample
  is the d-vector at one pixel.
* Feature (`feature`): the head's feature before the classifier (`head`; the student's is taken
  after its dropout), as CIRKD-codebase feature methods do; `logits` or a backbone stage may be
  chosen instead. If the teacher's map has another spatial size it is resized bilinearly to the
  student's; the teacher-correct label map is nearest-resized from the logit size to that grid.
* Projection (`projector`): the released code always maps the student feature through the CIRKD
  head Conv1x1(C_s->C_t, no bias)-BN-ReLU-Conv1x1(C_t->C_t, no bias); the paper has none (a B x B
  map needs no channel match). `auto` (default) uses that head only when C_s != C_t, `always` as
  the code, `none` as the paper. Its parameters join the student's optimiser.
* KL direction teacher || student and the tau^2 factor, as the code (the paper's tau = 1 makes tau^2
  moot); tau default 1 (paper; the code's default is 4).
* Per-descriptor reduction (`reduction`): `sum` = plain KL as Eq. 7 (default); `entries` = KL / (B*S)
  as the released code (F.kl_div batchmean on a 1-D vector), 1/(B*S) of the former.
* Too few teacher-correct pixels. A class needs `min_class_pixels` (default 2: the code skips a class
  with a single correct pixel) to be sampled. A class with n >= N gives N pixels without
  replacement; one with n < N gives all n plus N - n more (`fill`): `others` (default, as the code)
  draws them among the image's teacher-correct pixels of other classes, `repeat` re-draws the
  class's own pixels with replacement. When `others` runs out of pixels (an image with one class)
  the rest is filled by `repeat` (the code instead returns 0 for the whole batch). An image takes
  part when at least `min_classes` classes are sampled (default 2, spec 10.3's recommendation; a
  single-class GSSM holds no between-class structure); the loss is the mean over taking-part
  images, and exactly 0 (kept in the graph, zero gradient) when none does, e.g. a teacher wrong
  everywhere. Never NaN.
* Group size: S < 0 means |S| * C_img (the code's convention; the plug-in preset is S = -1); when
  B is not a multiple of S, the last B mod S columns form one more, narrower descriptor and all
  ceil(B/S) descriptors are averaged with equal weight (the code adds the remainder after the
  average); S >= B gives one descriptor, the whole map (the code then switches to a column softmax).
* Randomness (class sampling, padding draws, row permutations) comes only from `ctx.generator`
  (CPU); indices are drawn on the CPU and moved to the feature's device. Classes are visited in
  ascending id, images in batch order, so a run replays exactly. The paper samples across the local
  batch image by image; there is no all-gather (one process).
* The paper's Algorithm 1 builds the student descriptors from the teacher map (a typo, spec 10.1);
  here they come from the student map, as Eq. 6 says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from harness.methods.base import Method, resized_like
from harness.params import FEATURES, param

# mode -> (N samples per class, S columns per descriptor; S < 0 means |S| x classes in the image)
PRESETS: Dict[str, Tuple[int, int]] = {"standalone": (16, 8), "plugin": (8, -1)}
PROJECTORS = ("auto", "always", "none")
FILLS = ("others", "repeat")
REDUCTIONS = ("sum", "entries")


# ------------------------------------------------------------------------- the pieces (testable)
def teacher_correct_labels(teacher_logits: torch.Tensor, mask: torch.Tensor, ignore_index: int,
                           size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """B x h x w label map at the teacher's logit size (nearest), ignore_index wherever the label is
    ignore or the teacher's argmax disagrees with it; then nearest-resized to `size` if given."""
    h, w = teacher_logits.shape[-2:]
    labels = F.interpolate(mask[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    correct = (labels != ignore_index) & (teacher_logits.argmax(1) == labels)
    labels = torch.where(correct, labels, torch.full_like(labels, ignore_index))
    if size is not None and tuple(size) != (h, w):
        labels = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
    return labels


def class_balanced_sample(labels: torch.Tensor, ignore_index: int, n_per_class: int,
                          generator: torch.Generator, fill: str, min_class_pixels: int,
                          min_classes: int) -> Tuple[torch.Tensor, List[int]]:
    """CBS on one image's flattened teacher-correct label map (CPU, length h*w).

    Returns (indices into the flattened map, N per class, class blocks in ascending class id; the
    classes sampled). Returns an empty index tensor and [] when fewer than `min_classes` classes have
    `min_class_pixels` teacher-correct pixels; nothing is drawn from the generator in that case.
    """
    labels = labels.reshape(-1).cpu()
    valid = labels != ignore_index
    classes, counts = torch.unique(labels[valid], return_counts=True)
    kept = [int(c) for c, n in zip(classes.tolist(), counts.tolist()) if n >= min_class_pixels]
    if not kept or len(kept) < min_classes:
        return torch.empty(0, dtype=torch.long), []
    blocks = []
    for c in kept:
        own = torch.nonzero(labels == c).flatten()
        n = own.numel()
        if n >= n_per_class:
            blocks.append(own[torch.randperm(n, generator=generator)[:n_per_class]])
            continue
        need, parts = n_per_class - n, [own]
        if fill == "others":
            others = torch.nonzero(valid & (labels != c)).flatten()
            take = min(need, others.numel())
            if take:
                parts.append(others[torch.randperm(others.numel(), generator=generator)[:take]])
            need -= take
        if need:
            parts.append(own[torch.randint(n, (need,), generator=generator)])
        blocks.append(torch.cat(parts))
    return torch.cat(blocks), kept


def row_shuffle_index(b: int, generator: torch.Generator) -> torch.Tensor:
    """B x B long tensor whose every row is an independent random permutation of 0..B-1 (CPU)."""
    return torch.rand(b, b, generator=generator).argsort(dim=1)


def descriptor_kl(v_s: torch.Tensor, v_t: torch.Tensor, shuffle: torch.Tensor, group_size: int,
                  tau: float, reduction: str) -> torch.Tensor:
    """Mean over sub-image descriptors of tau^2 KL(softmax(d_t/tau) || softmax(d_s/tau)).

    v_s, v_t: B x B similarity maps; shuffle: B x B per-row column permutation; group_size S >= 1
    columns per descriptor (S >= B: one descriptor). `reduction="entries"` divides each KL by its
    descriptor's number of entries.
    """
    b = v_s.shape[0]
    s = min(int(group_size), b)
    vs, vt = v_s.gather(1, shuffle), v_t.gather(1, shuffle)
    full = b // s
    # descriptors as rows: the `full` B x S blocks, then the narrower remainder block if any
    pieces = [(vs[:, :full * s].reshape(b, full, s).transpose(0, 1).reshape(full, b * s),
               vt[:, :full * s].reshape(b, full, s).transpose(0, 1).reshape(full, b * s))]
    if full * s < b:
        pieces.append((vs[:, full * s:].reshape(1, -1), vt[:, full * s:].reshape(1, -1)))
    losses = []
    for d_s, d_t in pieces:
        log_p_s = F.log_softmax(d_s / tau, dim=1)
        log_p_t = F.log_softmax(d_t / tau, dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
        losses.append(kl / d_s.shape[1] if reduction == "entries" else kl)
    return torch.cat(losses).mean() * tau ** 2


def gssm(m: torch.Tensor) -> torch.Tensor:
    """Global structural similarity map of sampled features m (B x d): n(m) n(m)^T."""
    m = F.normalize(m, p=2, dim=1)
    return m @ m.t()


def projection_head(c_in: int, c_out: int) -> nn.Sequential:
    """CIRKD's / the GSKD code's student projector: Conv1x1-BN-ReLU-Conv1x1, no biases. Its weights
    come from the global random state, which the train loop seeds right before building the methods
    (so runs replay exactly); unlike CIRKD's and CWD's projectors they are not drawn from
    `ctx.generator`: changing that would change every stored GSKD result (results/)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 1, bias=False))


# ------------------------------------------------------------------------------------ the method
class GSKD(Method):
    name = "gskd"

    @dataclass
    class Config:
        weight: float = param(10.0, kind="weight", low=0,
                              doc="λ (standalone 10; plug-in 2 / 5 / 10 by host, see §3)")
        tau: float = param(1.0, kind="temperature", low=0, low_open=True, gate="weight",
                           doc="descriptor temperature (paper: fixed 1; released code: 4)")
        mode: str = param("standalone", choices=tuple(PRESETS),
                          doc="N/S preset: `standalone` (N = 16, S = 8) or `plugin` (N = 8, S = classes in the image)")
        n_per_class: Optional[int] = param(None, low=1, doc="N. null takes the mode's value")
        group_size: Optional[int] = param(None, doc="S; −k means k × (classes in the image), never 0. "
                                                    "null takes the mode's value")
        feature: str = param("head", choices=FEATURES + ("logits",), doc="distilled map: `head` (feature before "
                             "the classifier), `logits` or `stage1`..`stage4`")
        projector: str = param("auto", choices=PROJECTORS, doc="student Conv1×1–BN–ReLU–Conv1×1 to C_t: `auto` "
                               "(if C_s ≠ C_t), `always` (code) or `none` (paper)")
        fill: str = param("others", choices=FILLS, doc="a class with n < N: `others` pads with other classes' "
                          "correct pixels (code); `repeat` redraws its own with replacement")
        min_class_pixels: int = param(2, low=1, doc="teacher-correct pixels a class needs to be sampled "
                                                    "(the code skips 1-pixel classes)")
        min_classes: int = param(2, low=1, doc="sampled classes an image needs to take part")
        reduction: str = param("sum", choices=REDUCTIONS,
                               doc="per-descriptor KL: `sum` (Eq. 7) or `entries` (released code: KL/(B'·S))")

        @classmethod
        def cross_check(cls, c: dict, prefix: str) -> Optional[str]:
            if c["group_size"] is not None and int(c["group_size"]) == 0:
                return (f"'{prefix}.group_size' must be a positive number of columns or "
                        "negative (-k = k x classes in the image), got 0")
            return None

    def __init__(self, cfg: dict, ctx):
        super().__init__(cfg, ctx)
        c = self.cfg
        preset_n, preset_s = PRESETS[c["mode"]]
        self.n_per_class = int(preset_n if c["n_per_class"] is None else c["n_per_class"])
        self.group_size = int(preset_s if c["group_size"] is None else c["group_size"])
        c_s, c_t = self._channels(ctx.student_channels, "student"), self._channels(ctx.teacher_channels, "teacher")
        wants = c["projector"] == "always" or (c["projector"] == "auto" and c_s != c_t)
        self.projector = projection_head(c_s, c_t) if wants else None

    def _channels(self, channels: Dict[str, int], who: str) -> int:
        feature = self.cfg["feature"]
        if feature == "logits":
            return int(self.ctx.num_classes)
        if feature not in channels:
            raise ValueError(f"'method.gskd.feature' = '{feature}' is not a {who} feature; valid: "
                             f"logits, {', '.join(sorted(channels))}")
        return int(channels[feature])

    def group_size_for(self, classes_in_image: int) -> int:
        """S for an image with `classes_in_image` sampled classes."""
        s = self.group_size
        return -s * classes_in_image if s < 0 else s

    def _feature(self, out) -> torch.Tensor:
        return out.logits if self.cfg["feature"] == "logits" else out.features[self.cfg["feature"]]

    def terms(self, student, teacher, batch, progress):
        s_feat = self._feature(student)
        t_feat = self._feature(teacher).detach()
        if self.projector is not None:
            s_feat = self.projector(s_feat)
        grid = tuple(s_feat.shape[-2:])
        t_feat = resized_like(t_feat, s_feat)
        labels = teacher_correct_labels(teacher.logits.detach(), batch.mask, self.ctx.ignore_index, grid)
        labels = labels.cpu()
        c = self.cfg
        tau, gen, device = float(c["tau"]), self.ctx.generator, s_feat.device
        picks, shuffles, sizes = [], [], []  # per taking-part image: (image, flat indices), row shuffle, S
        for i in range(s_feat.shape[0]):
            idx, classes = class_balanced_sample(labels[i], self.ctx.ignore_index, self.n_per_class, gen,
                                                 c["fill"], int(c["min_class_pixels"]), int(c["min_classes"]))
            if not classes:
                continue
            picks.append((torch.full_like(idx, i), idx))
            shuffles.append(row_shuffle_index(idx.numel(), gen))
            sizes.append(self.group_size_for(len(classes)))
        if not picks:  # no image with enough teacher-correct classes: exactly 0, still in the graph
            return {"gskd": s_feat.sum() * 0.0}
        # one gather for the whole batch (indexing image by image would back-propagate a full-size
        # zero map per image), rows = sampled pixels in (image, class block) order
        image = torch.cat([p[0] for p in picks]).to(device)
        pixel = torch.cat([p[1] for p in picks]).to(device)
        m_s = s_feat.flatten(2)[image, :, pixel]  # n x C_s'
        m_t = t_feat.flatten(2)[image, :, pixel]  # n x C_t
        counts = [p[1].numel() for p in picks]
        losses = [descriptor_kl(gssm(ms), gssm(mt), sh.to(device), size, tau, c["reduction"])
                  for ms, mt, sh, size in zip(m_s.split(counts), m_t.split(counts), shuffles, sizes)]
        return {"gskd": torch.stack(losses).mean()}
