"""IFVD: intra-class feature variation distillation (L_IFV).

Wang et al., "Intra-class Feature Variation Distillation for Semantic Segmentation", ECCV 2020.
Spec section 6.1: the reference behaviour of the official `CriterionIFV`, identical to CIRKD's
`losses/ifvd.py`. For student and teacher features F in R^{B x C x h x w} (C_s and C_t may differ;
nothing is projected, the loss compares one scalar per pixel):

1. The labels Y (B x H x W, full resolution) are brought to the feature size h x w with PyTorch
   `nearest` (pixel (i, j) takes label (floor(i H / h), floor(j W / w)), spec 0), as the reference.
2. Per image b and class k in 0..K-1, a prototype (per image, not per batch):
       mu_{b,k} = sum_{i: Y_{b,i} = k} F_{b,:,i} / (|{i: Y_{b,i} = k}| + 1e-6)
3. Centre of pixel i: mu_{b, Y_{b,i}}; a pixel whose label is not in 0..K-1 (ignore) is its own
   centre.
4. M_{b,i} = cos(F_{b,:,i}, centre_{b,i}) over channels, with the eps of `nn.CosineSimilarity`:
   x.y / (max(|x|, 1e-8) max(|y|, 1e-8)); likewise M^t from the teacher's features.
5.     L_IFV = 1 / (B h w) * sum_{b,i} (M^s_{b,i} - M^t_{b,i})^2
   Ignore pixels contribute (cos(F, F) - cos(F, F))^2 = 0 (exactly 0 unless a feature vector is
   shorter than 1e-8) but STAY in the denominator B h w, as in the reference (spec 6.1 step 5,
   spec 13.7): the loss is diluted by the ignored fraction of the image, not renormalised.

The gradient flows through the student's prototypes (the mean over its own class region); the teacher
is detached. The 1e-6 in the prototype's denominator is a positive scale of mu and so cannot change a
cosine; it is kept only to mirror the reference.

Properties (tested): 0 for identical maps (and for a student that is the teacher's features with
extra zero channels, or rotated by an orthogonal matrix over channels); invariant to a positive
scale per (image, class region) and per ignore pixel; NOT invariant to an arbitrary positive
per-pixel scale (it moves the prototype); an all-ignore map gives 0; a single-class map compares
each pixel to its image's mean feature.

Choices (ours; spec 6.1 leaves them to the codebase):
* Feature (`feature`): `head`, the feature just before the classifier (the student's after its
  dropout), as CIRKD's post-head feature; the official code uses the PSP-module output, which is
  what `head` is for PSPNet. A backbone stage may be chosen instead.
* Weight default 20 (CIRKD's script); the official code uses 200 (paper 003 tuned 1e-2 / 1e-3).
  Both use this same mean reduction, so only the recipe differs. The full "IFVD" baseline is a
  composite (spec 6.1, 13.5): CE + pixel KD + adversarial term + IFV; compose methods for it.
* Teacher maps of another spatial size are resized bilinearly to the student's (`resized_like`),
  so both share the one label map at the student's feature size; the reference requires equal sizes.
* Any label outside 0..K-1 counts as ignore (the reference loops over classes 0..K-1), so it does
  not matter whether the dataset's ignore_index is 255 or -1.

Cost (B = 8, 64 x 128 feature map, K = 19, C_s = 512, C_t = 2048, float32): no centre map is
materialised. The prototypes come from a one-hot matmul (B x hw x K one-hot, 5 MB; prototypes
B x K x C, 1.2 MB at C = 2048) and the cosines from <F_i, mu_k> for all k (B x K x hw, 5 MB) gathered
at each pixel's label, plus per-pixel norms (B x hw). Measured on CPU: forward + backward raise the
peak RSS by 0.30 GB over the inputs, of which 0.125 GB is the student feature's own gradient and most
of the rest are two gradient contributions of that same size (through the prototypes and through the
dot products); ~9 s on 2 cores. Nothing grows with (h w)^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.methods.base import Method, resized_like
from harness.params import FEATURES, param

PROTOTYPE_EPS = 1e-6  # added to a class's pixel count (reference)
COSINE_EPS = 1e-8     # nn.CosineSimilarity's default, clamping each norm


def labels_at(mask: torch.Tensor, size) -> torch.Tensor:
    """B x H x W labels -> B x h x w with PyTorch `nearest` (index floor(i H / h)), as the reference."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.long()
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def class_similarity_map(feat: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """B x h x w map of cos(F_i, mu_{b, y_i}) (spec 6.1 steps 2-4); ignore pixels: cos(F_i, F_i).

    `feat`: B x C x h x w; `labels`: B x h x w at the feature size, any value outside 0..K-1 = ignore.
    """
    b, c, h, w = feat.shape
    flat = feat.reshape(b, c, h * w)
    y = labels.reshape(b, h * w).to(feat.device)
    valid = (y >= 0) & (y < num_classes)
    idx = torch.where(valid, y, torch.full_like(y, num_classes))      # ignore -> a spare column
    one_hot = F.one_hot(idx, num_classes + 1)[..., :num_classes].to(feat.dtype)  # B x hw x K
    counts = one_hot.sum(1)                                            # B x K
    protos = torch.bmm(flat, one_hot).transpose(1, 2) / (counts + PROTOTYPE_EPS)[..., None]  # B x K x C
    dots = torch.bmm(protos, flat)                                     # B x K x hw: <mu_k, F_i>
    gather = idx.clamp(max=num_classes - 1)[:, None]                   # B x 1 x hw
    dot = dots.gather(1, gather)[:, 0]                                 # B x hw
    centre_norm = protos.norm(dim=2).gather(1, gather[:, 0])          # B x hw: |mu_{y_i}|
    norm = flat.norm(dim=1)                                            # B x hw
    # an ignore pixel is its own centre: dot = |F|^2, centre norm = |F|
    dot = torch.where(valid, dot, norm * norm)
    centre_norm = torch.where(valid, centre_norm, norm)
    sim = dot / (norm.clamp_min(COSINE_EPS) * centre_norm.clamp_min(COSINE_EPS))
    return sim.reshape(b, h, w)


def intra_class_variation_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                               num_classes: int) -> torch.Tensor:
    """L_IFV = mean over all B h w pixels of (M^s - M^t)^2 (ignore pixels count in the mean).

    `student` B x C_s x h x w, `teacher` B x C_t x h' x w' (resized to h x w if needed, not
    detached here), `mask` B x H x W full-resolution labels (nearest-resized to h x w).
    """
    teacher = resized_like(teacher, student)
    labels = labels_at(mask, student.shape[-2:])
    m_s = class_similarity_map(student, labels, num_classes)
    m_t = class_similarity_map(teacher, labels, num_classes)
    return (m_s - m_t).pow(2).mean()


class IFVD(Method):
    name = "ifvd"

    @dataclass
    class Config:
        weight: float = param(20.0, kind="weight", low=0, doc="λ_ifv (CIRKD script 20; official IFVD code 200; "
                              "paper 003 tuned 1e-2 / 1e-3)")
        feature: str = param("head", choices=FEATURES,
                             doc="`head` (for PSPNet, the PSP-module output) or `stage1`..`stage4`")

    def __init__(self, cfg: dict, ctx):
        super().__init__(cfg, ctx)
        feature = self.cfg["feature"]
        for who, channels in (("student", ctx.student_channels), ("teacher", ctx.teacher_channels)):
            if feature not in channels:
                raise ValueError(f"'method.ifvd.feature' = '{feature}' is not a {who} feature; valid: "
                                 f"{', '.join(sorted(channels))}")
        if ctx.num_classes < 1:
            raise ValueError(f"ifvd needs at least one class, got num_classes={ctx.num_classes}")

    def terms(self, student, teacher, batch, progress):
        feature = self.cfg["feature"]
        return {"ifvd": intra_class_variation_loss(student.features[feature],
                                                   teacher.features[feature].detach(),
                                                   batch.mask, self.ctx.num_classes)}
