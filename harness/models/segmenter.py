"""``Segmenter``: backbone + main head (+ auxiliary FCN head) returning ``SegOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .backbones import STAGES
from .heads import AuxFCNHead


@dataclass
class SegOutput:
    """What a :class:`Segmenter` returns.

    ``logits``      B x K x h x w at the head's native resolution (input / output_stride,
                    e.g. 1/8 for dilated nets); NOT upsampled, the caller upsamples.
    ``aux_logits``  B x K x h' x w' from the auxiliary FCN head on stage3 (h' = input /
                    stride of stage3, equal to h at output stride 8 and 16), or None when aux is off.
    ``features``    ``"stage1"`` .. ``"stage4"`` from the backbone and ``"head"``, the
                    head's feature just before the classifier conv (after its dropout).
    """

    logits: torch.Tensor
    aux_logits: torch.Tensor | None = None
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class Segmenter(nn.Module):
    """A semantic segmentation network: ``backbone -> head (-> classifier)``, plus an
    optional auxiliary FCN head on ``stage3``.

    Attributes
    ----------
    num_classes:      K, the number of logit channels.
    feature_channels: channels of each named feature (``stage1``..``stage4``, ``head``).
    feature_strides:  stride of each named feature w.r.t. the input.
    output_stride:    stride of ``logits`` (= ``feature_strides["head"]``).
    name, aux_weight: copied from the config for the training loop's convenience.
    backbone, head, aux_head: the sub-modules (``aux_head`` is None when aux is off).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        num_classes: int,
        aux: bool = True,
        aux_weight: float = 0.4,
        name: str = "",
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = AuxFCNHead(backbone.channels["stage3"], num_classes) if aux else None
        self.num_classes = int(num_classes)
        self.aux_weight = float(aux_weight)
        self.name = name
        self.feature_channels: dict[str, int] = {**backbone.channels, "head": int(head.out_channels)}
        self.feature_strides: dict[str, int] = {**backbone.strides, "head": int(backbone.strides["stage4"])}
        self.output_stride = self.feature_strides["head"]

    def forward(self, x: torch.Tensor) -> SegOutput:
        feats = self.backbone(x)
        head_feat, logits = self.head(feats["stage4"])
        aux_logits = self.aux_head(feats["stage3"]) if self.aux_head is not None else None
        features = {name: feats[name] for name in STAGES}
        features["head"] = head_feat
        return SegOutput(logits=logits, aux_logits=aux_logits, features=features)

    def decoder_parameters(self):
        """Parameters outside the backbone (main and aux heads), e.g. for a 10x learning rate."""
        for module in (self.head, self.aux_head):
            if module is not None:
                yield from module.parameters()


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all of them, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
