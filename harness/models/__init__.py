"""Segmentation models: dilated torchvision backbones, PSPNet / DeepLabV3 heads.

``build_segmenter(cfg, num_classes)`` turns a ``student`` / ``teacher`` config
group (a plain dict or an OmegaConf DictConfig) into a :class:`Segmenter`::

    {"name": "pspnet_resnet18", "backbone": "resnet18", "head": "pspnet",
     "output_stride": 8, "head_channels": 128, "aux": True, "aux_weight": 0.4,
     "dropout": 0.1, "pretrained": None, "width": 1.0}

Only ``backbone`` and ``head`` are required.  Defaults: ``output_stride`` 8,
``head_channels`` the paper's width (512 for pspnet, 256 for deeplabv3),
``aux`` True, ``aux_weight`` 0.4, ``dropout`` 0.1, ``pretrained`` None.
``pretrained`` is None or the path of a LOCAL torchvision-layout backbone
state dict; weights are never downloaded.

A Mix Transformer backbone (``mit_b0``, ``mit_b1``) with ``head: segformer`` builds a
:class:`SegFormer` instead (``harness/models/segformer.py``; ``head_channels`` is its decoder
width, logits at stride 4, no aux head). ``BACKBONES`` / ``HEADS`` stay the CNN registries (any
backbone there works with any head there); ``MODEL_BACKBONES`` / ``MODEL_HEADS`` list every name a
model config may use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .backbones import BACKBONES, STAGES, hub_weights, load_pretrained
from .heads import DEFAULT_HEAD_CHANNELS, HEADS, AuxFCNHead, DeepLabV3Head, PSPHead
from .segformer import MIT_SPECS, SegFormer, build_segformer, check_segformer_config, is_segformer_config
from .segmenter import Segmenter, SegOutput, count_parameters

# every backbone / head name a model config may use (the CNN registries plus SegFormer's)
MODEL_BACKBONES: tuple[str, ...] = (*BACKBONES, *MIT_SPECS)
MODEL_HEADS: tuple[str, ...] = (*HEADS, "segformer")

__all__ = [
    "BACKBONES",
    "HEADS",
    "MODEL_BACKBONES",
    "MODEL_HEADS",
    "STAGES",
    "AuxFCNHead",
    "DeepLabV3Head",
    "PSPHead",
    "SegFormer",
    "SegOutput",
    "Segmenter",
    "build_segmenter",
    "check_model_config",
    "count_parameters",
    "load_pretrained",
]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def check_model_config(cfg: Mapping[str, Any]) -> None:
    """Raise ValueError for a model config no model can be built from: unknown backbone or head,
    an output stride the backbone cannot give, a width outside (0, 1], or SegFormer parts that do
    not go together. The one home of these checks: config validation and `build_segmenter` call it."""
    backbone, head = _get(cfg, "backbone"), _get(cfg, "head")
    name = _get(cfg, "name")  # optional here (derived from the parts); config always sets it
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*", str(name)):
        raise ValueError(f"name {name!r} names cache folders: use letters, digits and _ . + - (not first '.')")
    if backbone not in MODEL_BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid choices: {', '.join(sorted(MODEL_BACKBONES))}")
    if head not in MODEL_HEADS:
        raise ValueError(f"unknown head {head!r}; valid choices: {', '.join(sorted(MODEL_HEADS))}")
    width = float(_get(cfg, "width", 1.0))
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width}")
    if is_segformer_config(cfg):
        check_segformer_config(cfg)
        return
    output_stride = int(_get(cfg, "output_stride", 8))
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")


def build_segmenter(cfg: Mapping[str, Any], num_classes: int) -> Segmenter:
    """Build the model a ``student`` / ``teacher`` config group describes.

    Raises ``ValueError`` for an unknown backbone or head (naming the valid
    choices), an invalid ``output_stride`` or ``num_classes``; and, through
    :func:`load_pretrained`, ``FileNotFoundError`` / ``ValueError`` for a
    missing or mismatching ``pretrained`` file.
    """
    check_model_config(cfg)
    if is_segformer_config(cfg):
        return build_segformer(cfg, num_classes)
    backbone_name, head_name = _get(cfg, "backbone"), _get(cfg, "head")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    output_stride = int(_get(cfg, "output_stride", 8))
    head_channels = int(_get(cfg, "head_channels", DEFAULT_HEAD_CHANNELS[head_name]))
    dropout = float(_get(cfg, "dropout", 0.1))
    aux = bool(_get(cfg, "aux", True))
    aux_weight = float(_get(cfg, "aux_weight", 0.4))
    name = str(_get(cfg, "name", f"{head_name}_{backbone_name}"))

    backbone = BACKBONES[backbone_name](output_stride, width=float(_get(cfg, "width", 1.0)))
    pretrained = _get(cfg, "pretrained")
    if pretrained in ("hub", "imagenet"):
        pretrained = hub_weights(backbone_name)
    if pretrained:
        load_pretrained(backbone, pretrained)
    head = HEADS[head_name](backbone.channels["stage4"], int(num_classes), head_channels, dropout, output_stride)
    return Segmenter(backbone, head, int(num_classes), aux=aux, aux_weight=aux_weight, name=name)
