"""Dilated torchvision backbones that return their features by name.

Every backbone here is an ``nn.Module`` whose ``forward(x)`` returns an
``OrderedDict`` with the keys ``"stage1"`` .. ``"stage4"``, and which carries

* ``channels``: ``{"stage1": C1, ..., "stage4": C4}``
* ``strides``:  ``{"stage1": 4, "stage2": 8, "stage3": s3, "stage4": s4}`` where
  ``(s3, s4)`` is ``(8, 8)`` at output stride 8, ``(16, 16)`` at 16 and ``(16, 32)`` at 32
* ``ignored_pretrained_prefixes``: key prefixes of a torchvision ImageNet
  state dict that this backbone does not use (the classifier, and for the
  mobile nets the final 1x1 conv to 1280 channels); :func:`load_pretrained`
  drops them before its strict key check.

The modules keep torchvision's attribute names (``conv1``, ``layer1`` ... for
ResNets, ``features`` for MobileNetV2 / EfficientNet), so ``state_dict()`` keys
are exactly torchvision's and an ImageNet checkpoint in torchvision's layout
loads without renaming.  The forward passes are written out over the stage
modules: features are taken by name, never by hooks into a model.

Networks are always constructed with ``weights=None``; nothing is ever
downloaded.  Pretrained weights come only from a local file
(:func:`load_pretrained`).

Dilation ("atrous") follows the dilated-network papers (DeepLab, PSPNet):
to reach output stride 8 the last two downsampling stages get stride 1 and
dilation 2 and 4 respectively; at output stride 16 only the last one, with
dilation 2.  Within a dilated stage the conv that used to have stride 2
keeps the previous stage's dilation and every later spatial conv of the
stage uses the new dilation (the convention of torchvision's
``replace_stride_with_dilation`` for Bottleneck ResNets, of PyTorch-Encoding /
CIRKD for BasicBlock ResNets, and of the TF DeepLab MobileNet code).  Padding
is set to ``dilation * (k - 1) // 2`` so spatial sizes are preserved.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models._utils import _make_divisible

STAGES = ("stage1", "stage2", "stage3", "stage4")
VALID_OUTPUT_STRIDES = (8, 16, 32)


def _check_output_stride(output_stride: int) -> int:
    if output_stride not in VALID_OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {VALID_OUTPUT_STRIDES}, got {output_stride!r}")
    return int(output_stride)


def _stage_dilations(output_stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((first, rest) for stage3, (first, rest) for stage4)`` dilations; (1, 1) = not dilated."""
    output_stride = _check_output_stride(output_stride)
    if output_stride == 8:
        return (1, 2), (2, 4)
    if output_stride == 16:
        return (1, 1), (1, 2)
    return (1, 1), (1, 1)


def _stage_strides(output_stride: int) -> dict[str, int]:
    output_stride = _check_output_stride(output_stride)
    return {
        "stage1": 4,
        "stage2": 8,
        "stage3": min(16, output_stride),
        "stage4": output_stride,
    }


def _dilate(modules: Iterable[nn.Module], first_dilation: int, dilation: int) -> None:
    """Turn one downsampling stage into a dilated stride-1 stage, in place.

    The (single) spatial conv with stride 2 becomes stride 1 with
    ``first_dilation``; every other spatial (k > 1) conv gets ``dilation``;
    1x1 convs with stride 2 (ResNet shortcut projections) become stride 1.
    Blocks' informative ``stride`` attributes are updated too.
    """
    if first_dilation == 1 and dilation == 1:
        return
    modules = list(modules)
    strided = 0
    for root in modules:
        for m in root.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0]
                if m.stride == (2, 2):
                    m.stride = (1, 1)
                    if k > 1:
                        strided += 1
                        m.dilation = (first_dilation, first_dilation)
                        m.padding = (first_dilation * (k - 1) // 2,) * 2
                elif k > 1:
                    m.dilation = (dilation, dilation)
                    m.padding = (dilation * (k - 1) // 2,) * 2
            elif getattr(m, "stride", None) == 2 and not isinstance(m, nn.Conv2d):
                m.stride = 1
    if strided != 1:  # pragma: no cover - guards against torchvision layout changes
        raise RuntimeError(f"expected exactly one strided spatial conv in the stage, found {strided}")


def _check_width(width: float, base: int) -> int:
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width!r}")
    return max(8, int(round(base * width)))


def _narrow_resnet(net: "tvm.ResNet", base: int) -> None:
    """Rebuild a torchvision ResNet with `base` stem channels (64 = the original) from its own
    block type and `_make_layer`, re-initialised as torchvision initialises a ResNet."""
    block = type(net.layer1[0])
    depths = [len(net.layer1), len(net.layer2), len(net.layer3), len(net.layer4)]
    net.inplanes = base
    net.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(base)
    net.layer1 = net._make_layer(block, base, depths[0])
    net.layer2 = net._make_layer(block, 2 * base, depths[1], stride=2)
    net.layer3 = net._make_layer(block, 4 * base, depths[2], stride=2)
    net.layer4 = net._make_layer(block, 8 * base, depths[3], stride=2)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetBackbone(nn.Module):
    """torchvision ResNet (18/34/50/101), dilated.

    stage1 = ``layer1`` (stride 4), stage2 = ``layer2`` (stride 8),
    stage3 = ``layer3``, stage4 = ``layer4``.  Channels are 64/128/256/512
    (BasicBlock) or 256/512/1024/2048 (Bottleneck).  The stem
    (``conv1, bn1, relu, maxpool``) runs before stage1; ``avgpool``/``fc`` are dropped.
    ``width`` < 1 scales every stage's channels (a CPU preset; no ImageNet weights exist for it).
    """

    def __init__(self, depth: int, output_stride: int = 8, width: float = 1.0):
        super().__init__()
        ctor = {18: tvm.resnet18, 34: tvm.resnet34, 50: tvm.resnet50, 101: tvm.resnet101}[depth]
        net = ctor(weights=None)
        base = _check_width(width, 64)
        if base != 64:
            _narrow_resnet(net, base)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        (d3f, d3), (d4f, d4) = _stage_dilations(output_stride)
        _dilate(self.layer3, d3f, d3)
        _dilate(self.layer4, d4f, d4)
        e = 1 if depth < 50 else 4
        self.channels = {"stage1": base * e, "stage2": 2 * base * e, "stage3": 4 * base * e, "stage4": 8 * base * e}
        self.strides = _stage_strides(output_stride)
        self.output_stride = output_stride
        self.ignored_pretrained_prefixes = ("fc.",)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        out["stage1"] = x = self.layer1(x)
        out["stage2"] = x = self.layer2(x)
        out["stage3"] = x = self.layer3(x)
        out["stage4"] = self.layer4(x)
        return out


class _IndexedFeaturesBackbone(nn.Module):
    """A torchvision ``features`` Sequential cut into four stages by index ranges."""

    # (start, stop) index ranges into ``features`` for stage1..stage4; set by subclasses
    stage_slices: tuple[tuple[int, int], ...] = ()

    def __init__(self, features: nn.Sequential, channels: dict[str, int], output_stride: int, ignored: tuple[str, ...]):
        super().__init__()
        last = self.stage_slices[-1][1]
        # keep only the modules we use, under the torchvision name ``features`` (same state-dict keys)
        self.features = nn.Sequential(*list(features.children())[:last])
        (d3f, d3), (d4f, d4) = _stage_dilations(output_stride)
        s3, s4 = self.stage_slices[2], self.stage_slices[3]
        _dilate(self.features[s3[0] : s3[1]], d3f, d3)
        _dilate(self.features[s4[0] : s4[1]], d4f, d4)
        self.channels = dict(channels)
        self.strides = _stage_strides(output_stride)
        self.output_stride = output_stride
        self.ignored_pretrained_prefixes = ignored

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, (start, stop) in zip(STAGES, self.stage_slices):
            for i in range(start, stop):
                x = self.features[i](x)
            out[name] = x
        return out


class MobileNetV2Backbone(_IndexedFeaturesBackbone):
    """torchvision MobileNetV2, dilated.

    Stages over ``features`` indices (torchvision numbering):

    * stage1 = ``features[0:4]``   stem + 16-ch block + 24-ch blocks, 24 ch, stride 4
    * stage2 = ``features[4:7]``   32-ch blocks, 32 ch, stride 8
    * stage3 = ``features[7:14]``  64-ch and 96-ch blocks, 96 ch, stride 16 (8 when dilated; ``features[7]`` is the strided one)
    * stage4 = ``features[14:18]`` 160-ch and 320-ch blocks, 320 ch, stride 32 (8/16 when dilated; ``features[14]`` is strided)

    The final 1x1 conv to 1280 channels (``features[18]``) and the classifier are
    dropped, as in the DeepLabV3/CIRKD MobileNetV2 students (head input 320 ch).
    """

    stage_slices = ((0, 4), (4, 7), (7, 14), (14, 18))

    def __init__(self, output_stride: int = 8, width: float = 1.0):
        _check_width(width, 64)
        net = tvm.mobilenet_v2(weights=None, width_mult=width)
        ch = lambda c: _make_divisible(c * width, 8)  # noqa: E731 - torchvision's channel rounding
        super().__init__(
            net.features,
            {"stage1": ch(24), "stage2": ch(32), "stage3": ch(96), "stage4": ch(320)},
            output_stride,
            ignored=("classifier.", "features.18."),
        )


class EfficientNetB0Backbone(_IndexedFeaturesBackbone):
    """torchvision EfficientNet-B0, dilated.

    Stages over ``features`` indices (torchvision numbering; each index >= 1 is a
    Sequential of MBConv blocks):

    * stage1 = ``features[0:3]`` stem + 16-ch + 24-ch stages, 24 ch, stride 4
    * stage2 = ``features[3:4]`` 40-ch stage (k5), 40 ch, stride 8
    * stage3 = ``features[4:6]`` 80-ch and 112-ch stages, 112 ch, stride 16 (8 when dilated; ``features[4][0]`` is strided)
    * stage4 = ``features[6:8]`` 192-ch and 320-ch stages, 320 ch, stride 32 (8/16 when dilated; ``features[6][0]`` is strided)

    The final 1x1 conv to 1280 channels (``features[8]``) and the classifier are dropped.
    Stochastic depth stays as torchvision builds it (active in train mode only).
    """

    stage_slices = ((0, 3), (3, 4), (4, 6), (6, 8))

    def __init__(self, output_stride: int = 8, width: float = 1.0):
        if width != 1.0:
            raise ValueError("efficientnet_b0 has no width multiplier here (it is a compound-scaled "
                             "family); use width=1.0")
        net = tvm.efficientnet_b0(weights=None)
        super().__init__(
            net.features,
            {"stage1": 24, "stage2": 40, "stage3": 112, "stage4": 320},
            output_stride,
            ignored=("classifier.", "features.8."),
        )


def resnet18(output_stride: int = 8, width: float = 1.0) -> ResNetBackbone:
    return ResNetBackbone(18, output_stride, width)


def resnet34(output_stride: int = 8, width: float = 1.0) -> ResNetBackbone:
    return ResNetBackbone(34, output_stride, width)


def resnet50(output_stride: int = 8, width: float = 1.0) -> ResNetBackbone:
    return ResNetBackbone(50, output_stride, width)


def resnet101(output_stride: int = 8, width: float = 1.0) -> ResNetBackbone:
    return ResNetBackbone(101, output_stride, width)


def mobilenetv2(output_stride: int = 8, width: float = 1.0) -> MobileNetV2Backbone:
    return MobileNetV2Backbone(output_stride, width)


def efficientnet_b0(output_stride: int = 8, width: float = 1.0) -> EfficientNetB0Backbone:
    return EfficientNetB0Backbone(output_stride, width)


# name -> constructor(output_stride) -> backbone module
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "mobilenetv2": mobilenetv2,
    "efficientnet_b0": efficientnet_b0,
}


def _first_keys(keys: Iterable[str], n: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# torchvision's ImageNet weight files per backbone (first = preferred), as they lie in the torch hub
# cache (`torch.hub.get_dir()/checkpoints`) once torchvision has downloaded them on some machine
HUB_FILES = {
    "resnet18": ("resnet18-f37072fd.pth",),
    "resnet34": ("resnet34-b627a593.pth",),
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
    "resnet101": ("resnet101-63fe2227.pth", "resnet101-cd907fc2.pth"),
    "mobilenetv2": ("mobilenet_v2-b0353104.pth", "mobilenet_v2-7ebf99e0.pth"),
    "efficientnet_b0": ("efficientnet_b0_rwightman-7f5810bc.pth",),
}


def hub_weights(backbone_name: str) -> Path:
    """The local torch hub cache's copy of torchvision's ImageNet weights for `backbone_name`;
    FileNotFoundError naming the expected files when there is none (nothing is downloaded)."""
    import torch.hub

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    names = HUB_FILES.get(backbone_name)
    if not names:
        raise FileNotFoundError(f"no ImageNet weights are known for backbone '{backbone_name}'; give a "
                                f"state-dict path as pretrained=/path/to/weights.pth")
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"pretrained=hub: none of {', '.join(names)} is in the torch hub cache {folder} (set TORCH_HOME to "
        f"move it). Weights are never downloaded: copy torchvision's file there, give its path as "
        f"pretrained=/path/to/file.pth, or set pretrained=false for random initialisation")


def load_pretrained(backbone: nn.Module, path: str | Path) -> None:
    """Load a LOCAL torchvision-layout state dict into ``backbone``, strictly.

    Keys under ``backbone.ignored_pretrained_prefixes`` (the ImageNet
    classifier ``fc.*`` / ``classifier.*`` and parts the backbone drops) are
    ignored; every other backbone key must be present with the right shape
    and no other keys may be present (``num_batches_tracked`` buffers may be
    absent, as in torchvision's own checkpoints).

    Raises ``FileNotFoundError`` when the file does not exist (weights are
    never downloaded) and ``ValueError`` when keys or shapes do not match.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"pretrained backbone weights not found: {str(p)!r}. Weights are never downloaded; "
            "place a torchvision-layout state dict at that path or set pretrained to null."
        )
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{str(p)!r} does not hold a state dict (got {type(state).__name__})")
    ignored = tuple(getattr(backbone, "ignored_pretrained_prefixes", ("fc.", "classifier.")))
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_first_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_first_keys(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_first_keys(mismatched, 3)}")
        raise ValueError(
            f"pretrained weights {str(p)!r} do not match backbone {type(backbone).__name__}: " + "; ".join(parts)
        )
    backbone.load_state_dict(state, strict=False)
