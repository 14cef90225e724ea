"""DIST: inter- and intra-class correlation between student and teacher class probabilities.

Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022; spec section 8 (the
segmentation code `hunto/DIST_KD/segmentation/losses/dist_kd.py` and `train_kd.py`). Per-pixel class
probabilities Y = softmax(Z / tau) over classes, flattened to P x K rows, P = B*h*w (the local batch;
the pixel order does not matter):

    rho(u, v)  = (u - mean u) . (v - mean v) / ( ||u - mean u|| * ||v - mean v|| + 1e-8 )
    inter      = tau^2 * ( 1 - 1/P * sum_p rho(Y^s_{p,:}, Y^t_{p,:}) )   (rows: pixels, over classes)
    intra      = tau^2 * ( 1 - 1/K * sum_k rho(Y^s_{:,k}, Y^t_{:,k}) )   (columns: classes, over all
                                                                          P pixels of the batch)
    L_DIST     = beta * inter + gamma * intra
               + aux_weight * (beta * inter(aux_s, aux_t) + gamma * intra(aux_s, aux_t))

* Terms returned (unweighted): `inter`, `intra` on the main logits; `aux_inter`, `aux_intra` on the
  auxiliary-head logits. Weights: `inter_weight` (beta = 1), `intra_weight` (gamma = 1) and
  `aux_weight` (0.4) from the reference `kd_loss = L_DIST(main) + 0.4 * L_DIST(aux)`; the aux terms'
  weights are therefore aux_weight * inter_weight and aux_weight * intra_weight (as in the reference:
  the 0.4 multiplies the whole aux DIST, beta and gamma included). The reference's lambda_kd (1)
  is absorbed in these weights. Reference DIST **replaces** pixel KD.
* The aux terms use the student's AND the teacher's aux logits (the reference builds its teacher
  with an aux head for this). When either model has no aux head (`aux_logits` is None, e.g. a
  MobileNet/EfficientNet student, where the reference also turns aux off) the aux terms are absent
  from `terms` (not zero); with `aux_weight: 0` they are not computed either.
* Temperature: the segmentation reference has no temperature (tau = 1, no tau^2). `tau` is exposed in
  the classification form of DIST (paper / MMRazor `DISTLoss`): logits divided by tau and both terms
  multiplied by tau^2. The default tau = 1 reproduces the segmentation reference exactly.
* Pearson correlation exactly as the reference: centred cosine similarity with eps = 1e-8 added to
  the product of the norms (so identical inputs give ~1e-8 / ||u - mean u||^2, not exactly 0).
* No ignore mask: every pixel, ignored and padded ones included, counts (reference behaviour).
* The intra-class term depends on the batch composition (spec 8 / 13.3): the reference's local batch
  is 2 images per GPU; our batch is whatever `budget.batch_size` is, so a batch of 16 on one device
  changes this term relative to 8 x 2.
* Where teacher and student maps differ in spatial size (heterogeneous pairs) the teacher's logits
  are resized bilinearly (align_corners=False) to the student's size; the reference needs equal sizes.
* No randomness and no trainable parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.methods.base import Method, pixel_rows, resized_like
from harness.params import param

EPS = 1e-8


def pearson_rows(x: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Pearson correlation of matching rows of two M x D matrices (reference eps convention)."""
    xc = x - x.mean(dim=1, keepdim=True)
    yc = y - y.mean(dim=1, keepdim=True)
    return (xc * yc).sum(1) / (xc.norm(dim=1) * yc.norm(dim=1) + eps)


def _class_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float):
    """P x K softmax(Z / tau) for student and teacher (teacher resized to the student's size)."""
    teacher_logits = resized_like(teacher_logits, student_logits)
    y_s = torch.softmax(pixel_rows(student_logits) / tau, dim=1)
    y_t = torch.softmax(pixel_rows(teacher_logits) / tau, dim=1)
    return y_s, y_t


def dist_inter(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * (1 - mean over pixels of Pearson(Y^s_p, Y^t_p) over classes); logits B x K x h x w."""
    y_s, y_t = _class_probs(student_logits, teacher_logits, tau)
    return tau ** 2 * (1 - pearson_rows(y_s, y_t).mean())


def dist_intra(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * (1 - mean over classes of Pearson(Y^s_:k, Y^t_:k) over all B*h*w pixels)."""
    y_s, y_t = _class_probs(student_logits, teacher_logits, tau)
    return tau ** 2 * (1 - pearson_rows(y_s.t(), y_t.t()).mean())


class DIST(Method):
    name = "dist"

    @dataclass
    class Config:
        inter_weight: float = param(1.0, kind="weight", low=0, doc="β, inter-class (per-pixel) relation")
        intra_weight: float = param(1.0, kind="weight", low=0,
                                    doc="γ, intra-class (per-class, over the batch) relation")
        aux_weight: float = param(0.4, kind="aux_weight", low=0,
                                  doc="multiplies the whole aux-head DIST, β and γ included. The aux terms' "
                                      "weights are `aux_weight·inter_weight` and `aux_weight·intra_weight`")
        tau: float = param(1.0, kind="temperature", low=0, low_open=True, gate=("inter_weight", "intra_weight"),
                           doc="1 reproduces the segmentation reference (no temperature, no τ²)")

    def __init__(self, cfg: dict, ctx):
        super().__init__(cfg, ctx)
        get = lambda key: float(self.cfg[key])  # noqa: E731
        self.inter_weight, self.intra_weight = get("inter_weight"), get("intra_weight")
        self.aux_weight, self.tau = get("aux_weight"), get("tau")

    def weights(self):
        return {"inter": self.inter_weight, "intra": self.intra_weight,
                "aux_inter": self.aux_weight * self.inter_weight,
                "aux_intra": self.aux_weight * self.intra_weight}

    def terms(self, student, teacher, batch, progress):
        t = teacher.logits.detach()
        out = {"inter": dist_inter(student.logits, t, self.tau),
               "intra": dist_intra(student.logits, t, self.tau)}
        if self.aux_weight > 0 and student.aux_logits is not None and teacher.aux_logits is not None:
            ta = teacher.aux_logits.detach()
            out["aux_inter"] = dist_inter(student.aux_logits, ta, self.tau)
            out["aux_intra"] = dist_intra(student.aux_logits, ta, self.tau)
        return out
