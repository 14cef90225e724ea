"""Teacher converters: key maps from the checkpoints researchers have to a :class:`Segmenter`'s state dict.

``convert_state_dict(state, expected, fmt)`` renames the keys of a checkpoint written by another code
base to ours and checks the result against ``expected`` (the target model's ``state_dict()``): every
key mapped, none missing, every shape equal. It returns ``(state, detected_format)`` or raises
:class:`CheckpointLayoutError` naming the detected format, the first unmatched keys of the file and
of the model, and, where the file shows it, what the file holds (backbone, head, width, classes).

Formats (``teacher.checkpoint_format``; ``auto`` detects them by key patterns):

``harness``      our own ``state_dict()`` (``backbone.*``, ``head.*``, ``aux_head.*``): identity.
``torchvision``  ``torchvision.models.segmentation.deeplabv3_resnet50/101`` (``backbone.*`` in
                 torchvision's ResNet names, ``classifier.*`` = DeepLabHead, ``aux_classifier.*`` =
                 FCNHead on layer3). Same network as ours: dilated ResNet at output stride 8
                 (``replace_stride_with_dilation=[False, True, True]``), ASPP rates 12/24/36 with
                 a 1x1 projection, 3x3 conv, 1x1 classifier; aux 3x3 conv to 256, 1x1 classifier.
                 Refused: ``fcn_resnet*`` (FCN main head), ``deeplabv3_mobilenet_v3_large`` and
                 ``lraspp_mobilenet_v3_large`` (no MobileNetV3 backbone or LR-ASPP head here).
``mmseg``        mmsegmentation (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``; the
                 ``{"meta", "state_dict"}`` wrapper is removed by the loader). Supported: PSPNet
                 (``PSPHead``, pool scales 1/2/3/6, ``align_corners=False``) with ``FCNHead``
                 auxiliary (``num_convs=1``) on a ``ResNet`` backbone with torchvision's 7x7 stem
                 (mmseg's V1b layout) and ``contract_dilation=True`` (as mmseg's d8 configs set; the
                 weights cannot show it). Refused: ``ResNetV1c`` / ``ResNetV1d`` (3-conv deep stem,
                 avg-pool shortcuts: no such backbone here, so mmseg's own ``*_r50-d8`` checkpoints
                 do not load), ``ASPPHead`` (mmseg's DeepLabV3 has no 1x1 projection after ASPP and
                 puts image pooling first: another network than ours), DeepLabV3+ and FCN decode heads.
``cirkd``        CIRKD (github.com/winycg/CIRKD) ``DeepLabV3`` (``pretrained.*`` = ResNetV1b,
                 ``head.aspp.b0..b4``, ``head.block``, ``auxlayer.block``) on the ``*_original``
                 backbones (7x7 stem). Its ASPP is 512 wide: use ``teacher.head_channels=512``.
                 Refused: the ``resnet*_v1s`` deep-stem backbones (CIRKD's default, including its
                 released teachers) and CIRKD's ``PSPNet`` (pyramid pooling upsampled with
                 ``align_corners=True``; ours uses ``False``, so the same weights would compute
                 another function).

A ``module.`` prefix (DataParallel) is removed in every format. Missing ``num_batches_tracked``
buffers are taken from the model (they do not change an eval-mode forward pass).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple

import torch

FORMATS = ("auto", "harness", "torchvision", "mmseg", "cirkd")

Rule = Tuple[str, str]  # (regex over the file's key, replacement template for our key)


class CheckpointLayoutError(ValueError):
    """A checkpoint whose keys or shapes cannot be mapped exactly onto the configured model."""


# ------------------------------------------------------------------------------------ key maps
_RESNET = (r"(conv1|bn1|layer[1-4]\.\d+\.(?:conv[1-3]|bn[1-3]|downsample\.[01]))"
           r"\.(weight|bias|running_mean|running_var|num_batches_tracked)")

TORCHVISION_RULES: Tuple[Rule, ...] = (
    (rf"backbone\.{_RESNET}", r"backbone.\1.\2"),
    (r"classifier\.0\.convs\.([0-3])\.([01])\.(.+)", r"head.aspp.branches.\1.\2.\3"),
    (r"classifier\.0\.convs\.4\.1\.(.+)", r"head.aspp.image_pool.1.\1"),
    (r"classifier\.0\.convs\.4\.2\.(.+)", r"head.aspp.image_pool.2.\1"),
    (r"classifier\.0\.project\.([01])\.(.+)", r"head.aspp.project.\1.\2"),
    (r"classifier\.1\.(.+)", r"head.bottleneck.0.\1"),
    (r"classifier\.2\.(.+)", r"head.bottleneck.1.\1"),
    (r"classifier\.4\.(weight|bias)", r"head.classifier.\1"),
    (r"aux_classifier\.([01])\.(.+)", r"aux_head.block.\1.\2"),
    (r"aux_classifier\.4\.(weight|bias)", r"aux_head.classifier.\1"),
)

MMSEG_RULES: Tuple[Rule, ...] = (
    (rf"backbone\.{_RESNET}", r"backbone.\1.\2"),
    (r"decode_head\.psp_modules\.(\d)\.1\.conv\.(.+)", r"head.ppm.stages.\1.1.\2"),
    (r"decode_head\.psp_modules\.(\d)\.1\.bn\.(.+)", r"head.ppm.stages.\1.2.\2"),
    (r"decode_head\.bottleneck\.conv\.(.+)", r"head.bottleneck.0.\1"),
    (r"decode_head\.bottleneck\.bn\.(.+)", r"head.bottleneck.1.\1"),
    (r"decode_head\.conv_seg\.(weight|bias)", r"head.classifier.\1"),
    (r"auxiliary_head\.convs\.0\.conv\.(.+)", r"aux_head.block.0.\1"),
    (r"auxiliary_head\.convs\.0\.bn\.(.+)", r"aux_head.block.1.\1"),
    (r"auxiliary_head\.conv_seg\.(weight|bias)", r"aux_head.classifier.\1"),
)

CIRKD_RULES: Tuple[Rule, ...] = (
    (rf"pretrained\.{_RESNET}", r"backbone.\1.\2"),
    (r"head\.aspp\.b0\.([01])\.(.+)", r"head.aspp.branches.0.\1.\2"),
    (r"head\.aspp\.b([123])\.block\.([01])\.(.+)", r"head.aspp.branches.\1.\2.\3"),
    (r"head\.aspp\.b4\.gap\.([12])\.(.+)", r"head.aspp.image_pool.\1.\2"),
    (r"head\.aspp\.project\.([01])\.(.+)", r"head.aspp.project.\1.\2"),
    (r"head\.block\.([01])\.(.+)", r"head.bottleneck.\1.\2"),
    (r"head\.block\.4\.(weight|bias)", r"head.classifier.\1"),
    (r"auxlayer\.block\.([01])\.(.+)", r"aux_head.block.\1.\2"),
    (r"auxlayer\.block\.4\.(weight|bias)", r"aux_head.classifier.\1"),
)

RULES: Dict[str, Tuple[Rule, ...]] = {"torchvision": TORCHVISION_RULES, "mmseg": MMSEG_RULES, "cirkd": CIRKD_RULES}

# (format, regex that any key of the file matches, why the layout cannot be mapped exactly)
REFUSALS: Tuple[Tuple[str, str, str], ...] = (
    ("torchvision", r"backbone\.\d+\.",
     "torchvision's MobileNetV3 segmentation models (deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large) "
     "have a backbone the harness does not build; supported torchvision models: deeplabv3_resnet50, "
     "deeplabv3_resnet101"),
    ("torchvision", r"classifier\.(cbr|scale|low_classifier|high_classifier)\.",
     "torchvision's LR-ASPP head is not a harness head; supported torchvision models: deeplabv3_resnet50, "
     "deeplabv3_resnet101"),
    ("torchvision", r"classifier\.0\.weight$",
     "torchvision's fcn_resnet50/101 have an FCN main head (3x3 conv, BN, ReLU, 1x1), which the harness does "
     "not build (heads: pspnet, deeplabv3); supported torchvision models: deeplabv3_resnet50, deeplabv3_resnet101"),
    ("mmseg", r"backbone\.stem\.",
     "mmsegmentation ResNetV1c/V1d backbones have a 3-conv deep stem (backbone.stem.*) and the harness's "
     "ResNets have torchvision's 7x7 stem, so the weights cannot be mapped exactly; supported mmseg layout: "
     "PSPHead (+ FCNHead auxiliary) on type='ResNet' (the V1b stem: backbone.conv1/bn1)"),
    ("mmseg", r"backbone\.layer\d\.\d+\.downsample\.2\.",
     "mmsegmentation ResNetV1d shortcuts (avg-pool + 1x1 conv) differ from torchvision's; supported mmseg "
     "layout: PSPHead (+ FCNHead auxiliary) on type='ResNet' (the V1b stem: backbone.conv1/bn1)"),
    ("mmseg", r"decode_head\.aspp_modules\.",
     "mmsegmentation's ASPPHead (DeepLabV3) concatenates image pooling first and applies one 3x3 conv to the "
     "concatenation, where the harness's DeepLabV3 (as torchvision's and CIRKD's) projects with a 1x1 conv "
     "and then applies a 3x3 conv: another network; supported mmseg decode head: PSPHead"),
    ("mmseg", r"decode_head\.(c1_bottleneck|sep_bottleneck|c1_)",
     "mmsegmentation's DeepLabV3+ head is not a harness head; supported mmseg decode head: PSPHead"),
    ("mmseg", r"decode_head\.convs\.",
     "mmsegmentation's FCNHead as decode head is not a harness head; supported mmseg decode head: PSPHead"),
    ("cirkd", r"pretrained\.(conv2|conv3|bn2|bn3)\.",
     "CIRKD's resnet*_v1s backbones (its default, including its released teachers) have a 3-conv deep stem "
     "(pretrained.conv1/conv2/conv3) and the harness's ResNets have torchvision's 7x7 stem, so the weights "
     "cannot be mapped exactly; supported CIRKD layout: DeepLabV3 on the resnet*_original (ResNetV1b) "
     "backbones, with teacher.head_channels=512"),
    ("cirkd", r"head\.psp\.",
     "CIRKD's PSPNet upsamples its pyramid pooling with align_corners=True and the harness's PSPNet with "
     "align_corners=False, so the same weights would compute another function; supported CIRKD layout: "
     "DeepLabV3 on the resnet*_original (ResNetV1b) backbones, with teacher.head_channels=512"),
)

# (format, regex of a key that only that format has); checked in this order
SIGNATURES: Tuple[Tuple[str, str], ...] = (
    ("mmseg", r"(decode_head|auxiliary_head)\."),
    ("cirkd", r"(pretrained|auxlayer)\."),
    ("torchvision", r"(aux_)?classifier\."),
    ("harness", r"(head|aux_head)\."),
)


# --------------------------------------------------------------------------------------- API
def detect_format(keys: Sequence[str]) -> Optional[str]:
    """The checkpoint format its keys show (see SIGNATURES), or None."""
    for fmt, pattern in SIGNATURES:
        if any(re.match(pattern, k) for k in keys):
            return fmt
    return None


def strip_wrapper_prefix(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove a ``module.`` prefix (DataParallel / DistributedDataParallel) shared by every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def map_keys(state: Mapping[str, torch.Tensor], fmt: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], List[str]]:
    """Rename by `fmt`'s rules: (renamed state, {our key: the file's key}, the file's keys no rule maps)."""
    if fmt == "harness":
        return dict(state), {k: k for k in state}, []
    compiled = [(re.compile(p + r"$"), r) for p, r in RULES[fmt]]
    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    unmatched: List[str] = []
    for key, value in state.items():
        for pattern, replacement in compiled:
            m = pattern.match(key)
            if m:
                new = m.expand(replacement)
                out[new], origin[new] = value, key
                break
        else:
            unmatched.append(key)
    return out, origin, unmatched


def convert_state_dict(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                       fmt: str = "auto") -> Tuple[Dict[str, torch.Tensor], str]:
    """`state` (a checkpoint in format `fmt`, or detected when "auto") renamed to the keys of `expected`
    (the target model's state dict), checked key by key and shape by shape; and the format used."""
    if fmt not in FORMATS:
        raise CheckpointLayoutError(f"unknown checkpoint format '{fmt}'; choose one of {', '.join(FORMATS)}")
    state = strip_wrapper_prefix(state)
    detected = detect_format(list(state))
    if fmt == "auto":
        if detected is None:
            raise CheckpointLayoutError(
                f"its keys match none of the known layouts ({', '.join(FORMATS[1:])}); first keys: "
                f"{_first(state)}. Give teacher.checkpoint_format=... to force one, or convert the file")
        fmt = detected
    label = f"format {fmt}" + (" (detected)" if fmt == detected else f" (given; its keys look like {detected})")
    for refused_fmt, pattern, why in REFUSALS:
        if refused_fmt == fmt and any(re.match(pattern, k) for k in state):
            raise CheckpointLayoutError(f"{label}: {why}")
    mapped, origin, unmatched = map_keys(state, fmt)
    for key, value in expected.items():  # an eval-mode forward pass never reads num_batches_tracked
        bn = key[: -len("num_batches_tracked")]
        if key.endswith("num_batches_tracked") and key not in mapped and bn + "running_mean" in mapped:
            mapped[key] = value.clone()
    _check_classes(mapped, expected, label)
    unexpected = sorted(unmatched + [origin[k] for k in mapped if k not in expected])
    missing = sorted(k for k in expected if k not in mapped)
    if unexpected or missing:
        raise CheckpointLayoutError(
            f"{label}: {len(unexpected)} key(s) of the file have no place in the model (first: "
            f"{_first(unexpected)}) and {len(missing)} key(s) of the model are not in the file (first: "
            f"{_first(missing)})" + _hint(mapped, expected, missing, unexpected))
    wrong = [f"'{origin[k]}' is {list(v.shape)} in the file, the model's '{k}' needs {list(expected[k].shape)}"
             for k, v in mapped.items() if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointLayoutError(f"{label}: " + "; ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else "")
                                    + _hint(mapped, expected, [], []))
    return mapped, fmt


def describe(state: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """What a state dict in our key names holds: backbone (by block counts), head, head width, aux, classes."""
    out: Dict[str, object] = {}
    blocks = [len({k.split(".")[2] for k in state if k.startswith(f"backbone.layer{i}.")}) for i in range(1, 5)]
    bottleneck = any(k.startswith("backbone.layer1.0.conv3.") for k in state)
    depths = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34",
              (3, 4, 6, 3, True): "resnet50", (3, 4, 23, 3, True): "resnet101"}
    if all(blocks):
        out["backbone"] = depths.get((*blocks, bottleneck), f"a ResNet with {blocks} blocks")
    if any(k.startswith("head.aspp.") for k in state):
        out["head"] = "deeplabv3"
    elif any(k.startswith("head.ppm.") for k in state):
        out["head"] = "pspnet"
    if "head.classifier.weight" in state:
        out["num_classes"], out["head_channels"] = (int(n) for n in state["head.classifier.weight"].shape[:2])
    out["aux"] = any(k.startswith("aux_head.") for k in state)
    return out


# ------------------------------------------------------------------------------------ helpers
def _first(keys, n: int = 4) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _check_classes(mapped: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], label: str) -> None:
    w, want = mapped.get("head.classifier.weight"), expected.get("head.classifier.weight")
    if w is not None and want is not None and w.dim() >= 1 and w.shape[0] != want.shape[0]:
        raise CheckpointLayoutError(
            f"{label}: the checkpoint predicts {w.shape[0]} classes but the model needs {want.shape[0]} "
            f"(the dataset's num_classes); a teacher must be trained on the dataset it distils on "
            f"(torchvision's released weights have 21 VOC classes)")


def _hint(mapped, expected, missing, unexpected) -> str:
    """What the file holds against what the model is, in config terms, where they differ."""
    have, want = describe(mapped), describe(expected)
    diffs = []
    for key in ("backbone", "head", "head_channels"):
        if key in have and key in want and have[key] != want[key]:
            diffs.append(f"teacher.{key}={have[key]}")
    if have.get("aux") != want.get("aux"):
        diffs.append(f"teacher.aux={str(have.get('aux')).lower()}")
    if not diffs:
        return ""
    return (f". The file holds {have.get('head', '?')} on {have.get('backbone', '?')}"
            f" (head width {have.get('head_channels', '?')}, aux head {'yes' if have.get('aux') else 'no'}); "
            f"to match it set " + " ".join(diffs))
