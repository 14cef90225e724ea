"""The method interface: what every distillation method is and may do.

A method turns (student output, teacher output, batch, training progress) into named, UNWEIGHTED
loss terms. Weights, temperatures and other hyperparameters come from its config section
(`method.<name>.*`), so a sweep can tune any of them by config path. Trainable extras
(projectors, discriminators) are submodules of the method: they join the student's optimiser
unless the method declares an optimiser of its own through `own_optimizer` and steps it in
`extra_step` (the adversarial methods); the train loop has no special cases.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from harness.params import check_section, defaults_of
from harness.models import SegOutput


@dataclass
class Batch:
    image: torch.Tensor  # B x 3 x H x W, normalised
    mask: torch.Tensor   # B x H x W, class ids, ignore_index where unlabelled


@dataclass
class Progress:
    iteration: int       # 0-based index of the current step
    total: int           # iterations in the run

    @property
    def fraction(self) -> float:
        return self.iteration / max(self.total, 1)


@dataclass
class MethodContext:
    """What a method may know about the run when it is built."""
    num_classes: int
    ignore_index: int
    student_channels: Dict[str, int]
    student_strides: Dict[str, int]
    teacher_channels: Dict[str, int]
    teacher_strides: Dict[str, int]
    generator: torch.Generator  # all randomness inside a method comes from here (replayable)


class Method(nn.Module):
    """Base class. Subclasses set `name`, `Config` (a dataclass schema whose fields are declared with
    `harness.params.param`) and implement `terms`."""

    name: ClassVar[str]
    Config: ClassVar[type]
    needs_teacher: ClassVar[bool] = True

    def __init__(self, cfg: dict, ctx: MethodContext):
        """`cfg` is the `method.<name>` section, or part of it (unit use): it is checked against the
        Config's metadata (`harness.params.check_section`, the check of config load) and
        completed with the Config's defaults."""
        super().__init__()
        schema = getattr(type(self), "Config", None)
        if dataclasses.is_dataclass(schema):
            check_section(self.name, schema, cfg)
            cfg = {**defaults_of(schema), **dict(cfg)}
        self.cfg = dict(cfg)
        self.ctx = ctx

    def weights(self) -> Dict[str, float]:
        """Weight of each term returned by `terms`; by default the single term `name` has `weight`."""
        return {self.name: float(self.cfg["weight"])}

    def terms(self, student: SegOutput, teacher: Optional[SegOutput], batch: Batch,
              progress: Progress) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def own_optimizer(self) -> Optional[torch.optim.Optimizer]:
        """An optimiser for parameters the student's optimiser must not touch (None: share it)."""
        return None

    def extra_step(self, student: SegOutput, teacher: Optional[SegOutput], batch: Batch,
                   progress: Progress) -> Dict[str, float]:
        """Called after the student's step, for methods with their own optimiser; returns logs."""
        return {}


def resized_like(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """The teacher's map at the student's spatial size (bilinear); unchanged when they agree.
    The reference code requires equal sizes; heterogeneous pairs are adapted instead of refused."""
    if teacher.shape[-2:] == student.shape[-2:]:
        return teacher
    return F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)


def pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """B x C x h x w -> (B*h*w) x C: one row per pixel."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
