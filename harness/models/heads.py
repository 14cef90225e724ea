"""Segmentation heads: PSPNet, DeepLabV3 (ASPP) and the auxiliary FCN head.

A main head's ``forward(x)`` returns ``(feature, logits)``: ``feature`` is the
tensor just before the final 1x1 classifier conv (after the head's dropout),
``logits`` is ``classifier(feature)``, both at the input's resolution (the
backbone's output stride; nothing is upsampled here).  ``out_channels`` is the
channel count of ``feature`` (= ``head_channels``).

Constructors in :data:`HEADS` share the signature
``(in_channels, num_classes, head_channels, dropout, output_stride)``.

The pooled branches (PSP bins, ASPP image pooling) contain BatchNorm on 1x1
maps, so training in train mode needs a batch of at least 2 (eval mode works
at batch 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k - 1) // 2, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0; conv biases 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PyramidPooling(nn.Module):
    """PSPNet pyramid pooling module: the input concatenated with ``len(bins)``
    pooled-conv-upsampled branches of ``in_channels // len(bins)`` channels each
    (so ``2 * in_channels`` output channels for the paper's 4 bins)."""

    def __init__(self, in_channels: int, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        branch = max(1, in_channels // len(bins))
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *_conv_bn_relu(in_channels, branch, 1)) for b in self.bins
        )
        self.out_channels = in_channels + branch * len(self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [x]
        for stage in self.stages:
            outs.append(F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False))
        return torch.cat(outs, dim=1)


class PSPHead(nn.Module):
    """PSPNet head (Zhao et al., 2017): pyramid pooling with bins 1, 2, 3, 6
    (each branch a 1x1 conv to ``in_channels/4``, BN, ReLU), then 3x3 conv to
    ``head_channels``, BN, ReLU, Dropout(``dropout``), 1x1 classifier.
    Paper setting: ``head_channels=512``, ``dropout=0.1``."""

    def __init__(self, in_channels: int, num_classes: int, head_channels: int = 512, dropout: float = 0.1,
                 output_stride: int = 8):
        super().__init__()
        self.ppm = PyramidPooling(in_channels)
        self.bottleneck = _conv_bn_relu(self.ppm.out_channels, head_channels, 3)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.out_channels = head_channels
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.dropout(self.bottleneck(self.ppm(x)))
        return feat, self.classifier(feat)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): a 1x1 branch, three 3x3
    branches at ``rates``, and an image-pooling branch, each to
    ``out_channels`` with BN+ReLU; concatenated and projected by 1x1 conv, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, int, int]):
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in self.rates]
        )
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, out_channels, 1))
        self.project = _conv_bn_relu(out_channels * (len(self.rates) + 2), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        # bilinear from 1x1 is a broadcast; expand avoids interpolate's cost
        outs.append(self.image_pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(outs, dim=1))


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """DeepLabV3 rates: (6, 12, 18) at output stride 16, doubled at 8, halved at 32."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be one of (8, 16, 32), got {output_stride!r}")
    return {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}[output_stride]


class DeepLabV3Head(nn.Module):
    """DeepLabV3 head (Chen et al., 2017) as used by CIRKD: ASPP (rates 12/24/36
    at output stride 8, 6/12/18 at 16) projected to ``head_channels``, then
    3x3 conv, BN, ReLU, Dropout(``dropout``), 1x1 classifier.
    Paper setting: ``head_channels=256``, ``dropout=0.1``."""

    def __init__(self, in_channels: int, num_classes: int, head_channels: int = 256, dropout: float = 0.1,
                 output_stride: int = 8):
        super().__init__()
        self.aspp = ASPP(in_channels, head_channels, aspp_rates(output_stride))
        self.bottleneck = _conv_bn_relu(head_channels, head_channels, 3)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.out_channels = head_channels
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.dropout(self.bottleneck(self.aspp(x)))
        return feat, self.classifier(feat)


class AuxFCNHead(nn.Module):
    """Auxiliary FCN head on stage3 (CIRKD protocol): 3x3 conv to ``in_channels/4``,
    BN, ReLU, Dropout(0.1), 1x1 conv to ``num_classes``.  Its loss weight (0.4)
    is ``aux_weight`` in the model config and applied by the training loop."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        mid = max(1, in_channels // 4)
        self.block = _conv_bn_relu(in_channels, mid, 3)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(mid, num_classes, 1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.block(x)))


# name -> constructor(in_channels, num_classes, head_channels, dropout, output_stride)
HEADS: dict[str, Callable[..., nn.Module]] = {
    "pspnet": PSPHead,
    "deeplabv3": DeepLabV3Head,
}

# the papers' head widths, used when a config leaves head_channels unset
DEFAULT_HEAD_CHANNELS: dict[str, int] = {"pspnet": 512, "deeplabv3": 256}
