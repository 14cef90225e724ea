"""Pixel-wise knowledge distillation (L_PI / L_kd).

Hinton et al.'s temperature-softened KL applied independently at every pixel, as used by CIRKD
(Yang et al., CVPR 2022, Eq. 2), paper 003 (Niemann et al., Eq. 3) and every later paper as the
baseline term. Spec section 2.1 (the CIRKD reference behaviour):

    L_KD = tau^2 * 1/(B h w) * sum_{b, i} KL( softmax(Z^t_{b,:,i} / tau) || softmax(Z^s_{b,:,i} / tau) )

* softmax over classes per pixel; KL direction teacher || student; mean over all B*h*w pixels;
  tau^2 keeps the gradient scale independent of tau (spec 2.4:
  dL/dZ^s = tau * (softmax(Z^s/tau) - softmax(Z^t/tau)) / (B h w)).
* Computed on logits at the head's native resolution (output stride 8), no ignore mask: padded and
  ignored pixels count, as in the reference code.
* Where the teacher's logits have another spatial size than the student's (heterogeneous pairs),
  they are resized bilinearly to the student's size: the reference code requires equal sizes;
  adapting instead of failing is our choice.
* Other code bases use the same name with very different effective weights (spec 2.2: SKD sums over
  the batch, IFVD/CWD divide by K); the weight here is relative to the per-pixel mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.methods.base import Method, pixel_rows, resized_like
from harness.params import param


def pixel_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * mean over pixels of KL(softmax(t/tau) || softmax(s/tau)); inputs B x K x h x w."""
    teacher_logits = resized_like(teacher_logits, student_logits)
    log_p_s = F.log_softmax(pixel_rows(student_logits) / tau, dim=1)
    log_p_t = F.log_softmax(pixel_rows(teacher_logits) / tau, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * tau ** 2


class PixelKD(Method):
    name = "kd"

    @dataclass
    class Config:
        weight: float = param(1.0, kind="weight", low=0, doc="λ_kd")
        tau: float = param(1.0, kind="temperature", low=0, low_open=True, gate="weight", doc="temperature")

    def terms(self, student, teacher, batch, progress):
        return {"kd": pixel_kd(student.logits, teacher.logits.detach(), float(self.cfg["tau"]))}
