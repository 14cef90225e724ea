"""Datasets: one registry, one factory.

``build_dataset(cfg, split, augment, cache_dir)`` looks ``cfg["name"]`` up in :data:`DATASETS` and
returns a ``torch.utils.data.Dataset`` whose items are ``(float32 3 x H x W image, int64 H x W
mask)``, with attributes ``num_classes``, ``ignore_index``, ``class_names``, ``palette``, ``split``
and a ``class_frequencies()`` method.  Every dataset class is built with the same call,
``cls(cfg, split, augment=..., cache_dir=...)``, and lists its ``SPLITS`` (and, when fixed, its
``CLASS_NAMES``).
"""

from __future__ import annotations

from torch.utils.data import Dataset

from .ade20k import ADE20K
from .camvid import CamVid
from .cityscapes import Cityscapes
from .synthetic import SyntheticStreets
from .transforms import SegTransform
from .voc import VOC

DATASETS: dict[str, type] = {
    "synthetic": SyntheticStreets,
    "cityscapes": Cityscapes,
    "voc": VOC,
    "ade20k": ADE20K,
    "camvid": CamVid,
}


def build_dataset(cfg: dict, split: str, augment: dict | None = None, cache_dir: str | None = None) -> Dataset:
    """The ``split`` of the dataset described by ``cfg`` (the plain dict of the dataset config group).

    ``augment`` is ``None`` for evaluation (normalise only) or ``{"crop_size": [h, w],
    "scale_range": [lo, hi], "flip": bool}`` for training.  Raises ``ValueError`` for an unknown
    name or split, or when ``cfg``'s ``num_classes`` / ``class_names`` disagree with the dataset.
    """
    name = cfg.get("name")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    cls = DATASETS[name]
    splits = tuple(getattr(cls, "SPLITS", ()))
    if splits and split not in splits:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; valid: {', '.join(splits)}")
    check_config(cfg)
    return cls(cfg, split, augment=augment, cache_dir=cache_dir)


def check_config(cfg: dict, layout: bool = True) -> None:
    """Raise ValueError when a dataset config cannot describe its dataset (checked before any work).

    Datasets read from disk also check their values and that ``root`` has the expected layout
    (``ConfigError``, a ValueError, naming the expected sub-folders).
    """
    name = cfg.get("name")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    _check_classes(name, cfg, getattr(DATASETS[name], "CLASS_NAMES", None))
    own_check = getattr(DATASETS[name], "check_config", None)
    if own_check is not None and layout:  # layout=False: the files need not be on this machine (plans)
        own_check(cfg)


def _check_classes(name: str, cfg: dict, class_names) -> None:
    if class_names is None:
        return
    expected = list(class_names)
    if "num_classes" in cfg and int(cfg["num_classes"]) != len(expected):
        raise ValueError(
            f"dataset {name!r}: cfg num_classes={cfg['num_classes']} but the dataset has {len(expected)} classes "
            f"({', '.join(expected)})"
        )
    if "class_names" in cfg and list(cfg["class_names"]) != expected:
        raise ValueError(
            f"dataset {name!r}: cfg class_names {list(cfg['class_names'])} do not match the dataset's {expected}"
        )


__all__ = ["ADE20K", "DATASETS", "VOC", "CamVid", "Cityscapes", "SegTransform", "SyntheticStreets", "build_dataset",
           "check_config"]
