"""Paper names for what the figures show: models, methods, datasets, searched settings.

One mapping, used by every figure (`harness.report.figures`, `tuning`, `across`): a figure says
"PSPNet-R18 (1/4 width)" and "CWD+GSKD" where the config says ``pspnet_resnet18_small`` and
``cwd+gskd``. Markdown tables keep the config keys (what a user types to select a row). A key the
mapping does not know is named by rule (head and backbone spelled as in the papers) or, failing that,
shown as it is: a figure never fails for a new model or method.
"""
from __future__ import annotations

import re
from typing import Any, Optional

# presets whose width is not the paper's (conf/student, conf/teacher: `width`)
MODELS = {
    "pspnet_resnet18_small": "PSPNet-R18 (¼ width)",
    "deeplabv3_resnet18_small": "DeepLabV3-R18 (½ width)",
    "segformer_b0_small": "SegFormer-B0 (½ width)",
    "segformer_b1_small": "SegFormer-B1 (½ width)",
}
HEADS = {"pspnet": "PSPNet", "deeplabv3": "DeepLabV3", "deeplabv3plus": "DeepLabV3+", "fcn": "FCN",
         "segformer": "SegFormer"}
BACKBONES = {"mobilenetv2": "MobileNetV2", "efficientnet_b0": "EfficientNet-B0"}
METHODS = {"student-only": "Student only", "kd": "KD", "skd": "SKD", "ifvd": "IFVD", "cwd": "CWD", "cirkd": "CIRKD",
           "dist": "DIST", "afdcd": "Af-DCD", "gskd": "GSKD", "brd": "BRD", "heteroakd": "HeteroAKD"}
DATASETS = {"synthetic": "Synthetic", "cityscapes": "Cityscapes", "voc": "Pascal VOC", "ade20k": "ADE20K",
            "camvid": "CamVid"}
PARAMS = {"tau": "temperature τ", "weight": "loss weight", "aux_weight": "aux. loss weight"}
OPTIM = {"optim.lr": "learning rate", "optim.weight_decay": "weight decay", "optim.wd": "weight decay"}
STAGES = {"lr_wd": "learning rate × weight decay", "together": "joint search", "reruns": "reruns (fresh seeds)",
          "rerun": "reruns (fresh seeds)"}


def model_name(key: Optional[str]) -> str:
    """``pspnet_resnet18_small`` -> 'PSPNet-R18 (¼ width)', ``deeplabv3_resnet101`` -> 'DeepLabV3-R101'."""
    if not key:
        return "none"
    key = str(key)
    if key in MODELS:
        return MODELS[key]
    base, small = (key[:-6], True) if key.endswith("_small") else (key, False)
    head, _, backbone = base.partition("_")
    if head not in HEADS:
        return key
    if head == "segformer":
        name = f"SegFormer-{backbone.upper()}" if backbone else "SegFormer"
    elif re.fullmatch(r"resnet\d+", backbone or ""):
        name = f"{HEADS[head]}-R{backbone[6:]}"
    elif backbone in BACKBONES:
        name = f"{HEADS[head]}-{BACKBONES[backbone]}"
    else:
        return key
    return f"{name} (reduced width)" if small else name


def method_name(label: Any) -> str:
    """A leaderboard label (``cwd+gskd``, ``student-only``) -> 'CWD+GSKD', 'Student only'."""
    text = str(label)
    if text in METHODS:
        return METHODS[text]
    return "+".join(METHODS.get(part, part.upper()) for part in text.replace(",", "+").split("+"))


def dataset_name(key: Optional[str]) -> str:
    return DATASETS.get(str(key), str(key)) if key else "unknown dataset"


def param_name(path: str) -> str:
    """A searched config path: ``method.cwd.tau`` -> 'CWD temperature τ', ``optim.lr`` -> 'learning rate'."""
    if path in OPTIM:
        return OPTIM[path]
    parts = str(path).split(".")
    if len(parts) >= 3 and parts[0] == "method":
        return f"{method_name(parts[1])} {PARAMS.get(parts[-1], parts[-1].replace('_', ' '))}"
    return str(path)


def stage_name(stage: str) -> str:
    """A protocol stage: ``temperature[method.cwd.tau]`` -> 'CWD temperature τ', ``lr_wd`` -> 'learning rate × weight decay'."""
    text = str(stage)
    m = re.fullmatch(r"([A-Za-z_]+)\[(.+)\]", text)
    if m:
        return param_name(m.group(2))
    return STAGES.get(text, text.replace("_", " "))


def pair_title(dataset: Optional[str], student: Optional[str], teacher: Optional[str], budget: Optional[str] = None) -> str:
    """'Synthetic: PSPNet-R18 (¼ width) ← DeepLabV3-R18 (½ width), quick budget'."""
    who = f"{model_name(student)} ← {model_name(teacher)}" if teacher else f"{model_name(student)} (no teacher)"
    return f"{dataset_name(dataset)}: {who}" + (f", {budget} budget" if budget else "")


def block_title(block: Any) -> str:
    """A leaderboard block (dataset, student, teacher, budget) as a figure title names it."""
    return pair_title(block.dataset, block.student, block.teacher, block.budget)
