"""Shared machinery of the datasets read from disk (``cityscapes``, ``voc``, ``ade20k``, ``camvid``).

Each dataset is a subclass of :class:`FolderDataset` that says three things: where its files are
(:meth:`~FolderDataset.list_source`, which pairs images with label files for one of the dataset's
own folders/lists), how raw label ids become train ids (:attr:`~FolderDataset.LABEL_MAP`, a
256-entry lookup table, 255 = ignore), and what the expected on-disk layout is
(:attr:`~FolderDataset.LAYOUT`, quoted in every error).  Nothing is ever downloaded: ``dataset.root``
must point at a copy the user already has.

Splits
------
``train`` and ``val`` come from the dataset's own split folders or lists.  ``tune`` is carved out
of the training list, deterministically: every training item gets the rank of
``sha1("<tune_seed>/<key>")`` (``key`` = its path relative to the split folder, without extension),
and the ``tune_size`` items of lowest rank are ``tune``; ``train`` is the rest.  So ``train`` and
``tune`` are disjoint and together are the whole training list; they do not depend on the order the
file system lists files in, and adding or removing other files moves an item only if its rank is
pushed past ``tune_size``.  ``tune_size`` is ``dataset.tune_size`` (a count) when set, else
``max(1, round(tune_fraction * N_train))``; at least one image stays in ``train``.

Labels
------
Label PNGs are read as single-channel ids (mode ``L``, ``P`` = palette indices, or 16-bit ``I``),
mapped through ``LABEL_MAP`` (ids >= 256 -> ignore) to train ids ``0..K-1`` and 255 = ignore;
``ignore_index`` other than 255 is written into the int64 mask afterwards.  An RGB label image (a
colour rendering instead of the id map) is refused with an error naming the file.

Training items
--------------
``augment`` given: :class:`~harness.data.transforms.SegTransform` on the image at its native size
(normalise, random scale, pad with ignore, random crop, flip), exactly as for ``synthetic``.

Evaluation items (``augment=None``): ``dataset.eval_mode``
------------------------------------------------------------
:func:`harness.engine.evaluate.evaluate` stacks ``budget.eval_batch_size`` items into one tensor,
so every item of an evaluation batch must have the same size.  Four policies:

* ``whole`` -- the image and its labels at their native size, untouched (the CIRKD protocol:
  Cityscapes val at 1024 x 2048, CamVid at 360 x 480).  Only for splits whose images all have one
  size: this is checked when the split is opened (image headers only), and a split of mixed sizes
  is a ``ConfigError`` that names two sizes and points to ``pad``.  ``eval_size`` is not used.
* ``pad`` -- for splits of varying sizes (VOC, ADE20K).  An image that fits inside ``eval_size``
  keeps its native size and labels, so its pixels are scored exactly as in whole-image evaluation;
  it is padded at the bottom/right to ``eval_size`` with 0 (= the mean colour after normalisation)
  and the padded labels are ``ignore``, so padding is never scored.  The network does see the padded
  border as extra context (as in CIRKD's training crops).  An image larger than ``eval_size`` is
  first scaled down, aspect ratio kept, until it fits (image bilinear, labels nearest), so its
  labels are scored at that reduced size.  Choose ``eval_size`` >= the largest image for exact
  native-resolution scoring.
* ``resize`` -- image (bilinear) and labels (nearest) resized to exactly ``eval_size``, aspect
  ratio not kept (the ``_val_sync_transform_resize`` convention of some KD code bases); scores are
  on the resized labels.

* ``slide`` -- sliding-window inference (:func:`harness.engine.evaluate.slide_logits`, mmseg's
  ``slide_inference``): windows of ``dataset.eval_crop`` [h, w] every ``dataset.eval_stride``
  [h, w] pixels (both required, positive, stride <= crop), logits averaged where windows overlap.
  The items are those of ``whole`` when ``eval_size`` is null (native size; one size per split) and
  those of ``pad`` when it is set (native size unless larger than ``eval_size``, padded to it with 0
  and ``ignore`` labels), and the windows slide over the item.  For a split of one size with
  ``eval_size`` = that size (the Cityscapes and CamVid yaml) this is exactly mmseg's protocol; for a
  split of mixed sizes the windows tile the padded ``eval_size`` canvas, not each image's own extent
  (mmseg evaluates one image at a time for that), so the padded border is context as in ``pad``.
  ``eval_crop`` / ``eval_stride`` set with another mode are refused rather than silently unused.

Resizing uses ``align_corners=False`` bilinear / ``nearest-exact``, without anti-aliasing, like the
training augmentation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from harness.errors import ConfigError

from .transforms import SegTransform, normalize, pad_to, to_tensors

IGNORE = 255
EVAL_MODES = ("whole", "pad", "resize", "slide")
# Bump when the label mapping or the tune carving changes: part of the class-frequency cache key.
FOLDER_VERSION = 1


@dataclass(frozen=True)
class Sample:
    """One image and its label file; ``key`` names it (relative path without extension)."""

    key: str
    image: str
    label: str


def label_map(pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """A 256-entry uint8 lookup table: ``raw id -> train id``, every id not listed -> 255."""
    lut = np.full(256, IGNORE, np.uint8)
    for raw, train in pairs:
        lut[raw] = train
    return lut


def apply_label_map(label: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``lut[label]`` as uint8; ids outside 0..255 (16-bit label files) map to ignore."""
    label = np.asarray(label)
    if label.dtype == np.uint8:
        return lut[label]
    out = np.full(label.shape, IGNORE, np.uint8)
    inside = (label >= 0) & (label < 256)
    out[inside] = lut[label[inside].astype(np.int64)]
    return out


def read_image(path: str) -> np.ndarray:
    """uint8 ``H x W x 3`` RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_label_png(path: str) -> np.ndarray:
    """The stored ids of a single-channel label PNG (palette PNGs: the palette *index*)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(
                f"label file {path} has image mode {im.mode}; expected single-channel class ids "
                f"(8-bit grayscale 'L' or palette 'P' PNG), not a colour rendering"
            )
        return np.array(im)


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` from the file header only."""
    with Image.open(path) as im:
        return im.size[1], im.size[0]


def tune_rank(seed: int, key: str) -> str:
    return hashlib.sha1(f"{int(seed)}/{key}".encode()).hexdigest()


def carve_tune(samples: Sequence[Sample], tune_size: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """``(train, tune)``: the ``tune_size`` samples of lowest ``sha1(seed/key)`` are ``tune``.

    Both keep the input order (which the datasets make sorted by key).
    """
    ranked = sorted(samples, key=lambda s: (tune_rank(seed, s.key), s.key))
    chosen = {s.key for s in ranked[:tune_size]}
    return [s for s in samples if s.key not in chosen], [s for s in samples if s.key in chosen]


class FolderDataset(Dataset):
    """A segmentation dataset stored as image + label files; see the module docstring.

    Subclasses set ``NAME``, ``CLASS_NAMES``, ``PALETTE``, ``LABEL_MAP``, ``LAYOUT``,
    ``SOURCES`` (``{"train": ..., "val": ...}``: which of the dataset's own folders or lists each
    harness split reads) and implement :meth:`list_source`; optionally :meth:`locate` (which folder
    under ``root`` holds the dataset), :meth:`required_paths`, :meth:`read_label`.
    """

    NAME: ClassVar[str] = ""
    CLASS_NAMES: ClassVar[tuple[str, ...]] = ()
    PALETTE: ClassVar[tuple[tuple[int, int, int], ...]] = ()
    LABEL_MAP: ClassVar[np.ndarray]
    LAYOUT: ClassVar[str] = ""
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "tune", "val")
    SOURCES: ClassVar[dict[str, str]] = {"train": "train", "val": "val"}

    # ---------------------------------------------------------------------------------- config
    @classmethod
    def error(cls, problem: str) -> ConfigError:
        return ConfigError(f"dataset '{cls.NAME}': {problem}. Expected layout under dataset.root: {cls.LAYOUT}")

    @classmethod
    def locate(cls, cfg: dict) -> Path:
        """The folder that holds the dataset (``dataset.root`` itself unless a subclass knows better)."""
        return Path(cls.root_of(cfg))

    @classmethod
    def root_of(cls, cfg: dict) -> str:
        root = cfg.get("root")
        if not root:
            raise cls.error("dataset.root is not set; give the folder of your copy (nothing is downloaded), "
                            f"e.g. python -m harness train dataset={cls.NAME} dataset.root=/data/{cls.NAME}")
        path = Path(root).expanduser()
        if not path.is_dir():
            raise cls.error(f"dataset.root={root} is not a directory")
        return str(path)

    @classmethod
    def required_paths(cls, cfg: dict) -> list[str]:
        """Paths relative to :meth:`locate` that must exist (folders end with ``/``)."""
        return []

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        """Cheap checks before any work: values, and that the layout's folders exist."""
        mode = cfg.get("eval_mode", "whole")
        if mode not in EVAL_MODES:
            raise ConfigError(f"dataset.eval_mode must be one of {', '.join(EVAL_MODES)}, got '{mode}'")
        for key in ("eval_size", "crop_size"):
            value = cfg.get(key)
            if value is not None and (len(value) != 2 or min(int(v) for v in value) < 1):
                raise ConfigError(f"dataset.{key} must be [height, width] with positive values, got {value}")
        if mode in ("pad", "resize") and cfg.get("eval_size") is None:
            raise ConfigError(f"dataset.eval_mode={mode} needs dataset.eval_size=[height, width]")
        check_slide(cfg, mode)
        fraction = float(cfg.get("tune_fraction", 0.1))
        if not 0 < fraction < 1:
            raise ConfigError(f"dataset.tune_fraction must be in (0, 1), got {fraction}")
        if cfg.get("tune_size") is not None and int(cfg["tune_size"]) < 1:
            raise ConfigError(f"dataset.tune_size must be >= 1 (or null to use tune_fraction), got {cfg['tune_size']}")
        ignore = int(cfg.get("ignore_index", IGNORE))
        if 0 <= ignore < len(cls.CLASS_NAMES):
            raise ConfigError(f"dataset.ignore_index={ignore} collides with a class id (0..{len(cls.CLASS_NAMES) - 1})")
        for key in ("mean", "std"):
            if key in cfg and len(cfg[key]) != 3:
                raise ConfigError(f"dataset.{key} needs 3 values (R, G, B in 0-255 units), got {cfg[key]}")
        if "std" in cfg and min(float(v) for v in cfg["std"]) <= 0:
            raise ConfigError(f"dataset.std must be positive, got {cfg['std']}")
        base = cls.locate(cfg)
        missing = [p for p in cls.required_paths(cfg) if not (base / p).exists()]
        if missing:
            raise cls.error(f"{base} lacks {', '.join(missing)}")

    # ------------------------------------------------------------------------------- listing
    def list_source(self, source: str) -> list[Sample]:
        """The samples of one of the dataset's own splits (folder or list), sorted by key."""
        raise NotImplementedError

    def read_label(self, sample: Sample) -> np.ndarray:
        """The raw ids of a sample's label file (before :attr:`LABEL_MAP`)."""
        return read_label_png(sample.label)

    def _pair(self, key: str, image: Path, label: Path) -> Sample:
        if not label.is_file():
            raise self.error(f"image {image} has no label file {label}")
        return Sample(key, str(image), str(label))

    # ---------------------------------------------------------------------------------- build
    def __init__(self, cfg: dict, split: str, augment: dict | None = None, cache_dir: str | None = None):
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r} for dataset {self.NAME!r}; valid: {', '.join(self.SPLITS)}")
        self.check_config(cfg)
        self.cfg = dict(cfg)
        self.base = self.locate(cfg)
        self.split = split
        self.num_classes = len(self.CLASS_NAMES)
        self.class_names = list(self.CLASS_NAMES)
        self.palette = [tuple(rgb) for rgb in self.PALETTE]
        self.ignore_index = int(cfg.get("ignore_index", IGNORE))
        self.eval_mode = cfg.get("eval_mode", "whole")
        self.eval_size = None if cfg.get("eval_size") is None else [int(v) for v in cfg["eval_size"]]
        # the items' geometry; slide: whole or pad (see the module docstring), the windows are the evaluator's
        self.geometry = ("whole" if self.eval_size is None else "pad") if self.eval_mode == "slide" else self.eval_mode
        self.transform = SegTransform(cfg["mean"], cfg["std"], self.ignore_index, augment)
        self.generator: torch.Generator | None = None  # augmentation RNG; None = torch's global one
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.samples = self._split_samples(split)
        if not self.samples:
            raise self.error(f"split '{split}' has no images under {self.base}")
        if augment is None and self.geometry == "whole":
            self._check_one_size()
        self._frequencies = None

    def _split_samples(self, split: str) -> list[Sample]:
        if split in ("train", "tune"):
            samples = self.list_source(self.SOURCES["train"])
            n = len(samples)
            size = self.tune_size(n)
            if size >= n:
                raise ConfigError(
                    f"dataset '{self.NAME}': the tune split ({size} images) would leave nothing of the "
                    f"{n} training images; lower dataset.tune_size or dataset.tune_fraction"
                )
            train, tune = carve_tune(samples, size, int(self.cfg.get("tune_seed", 0)))
            return train if split == "train" else tune
        return self.list_source(self.SOURCES.get(split, split))

    def tune_size(self, n_train: int) -> int:
        if self.cfg.get("tune_size") is not None:
            return int(self.cfg["tune_size"])
        return max(1, round(float(self.cfg.get("tune_fraction", 0.1)) * n_train))

    def _check_one_size(self) -> None:
        first = image_size(self.samples[0].image)
        for s in self.samples[1:]:
            size = image_size(s.image)
            if size != first:
                fix = ("set dataset.eval_size=[H, W] >= the largest image (items padded to it, windows slide over "
                       "them)" if self.eval_mode == "slide" else
                       "set dataset.eval_mode=pad with dataset.eval_size=[H, W] >= the largest image, or eval_mode=resize")
                raise ConfigError(
                    f"dataset '{self.NAME}': eval_mode={self.eval_mode} evaluates every image at its native size, but "
                    f"split '{self.split}' mixes sizes ({self.samples[0].image}: {first[0]}x{first[1]}, "
                    f"{s.image}: {size[0]}x{size[1]}), which cannot be batched; {fix}"
                )

    # ---------------------------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.samples)

    def raw(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 image ``H x W x 3`` and uint8 train-id mask ``H x W`` (255 = ignore) of ``index``."""
        sample = self.samples[index]
        image = read_image(sample.image)
        mask = apply_label_map(self.read_label(sample), self.LABEL_MAP)
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"dataset '{self.NAME}': image {sample.image} is {image.shape[0]}x{image.shape[1]} but its "
                f"label {sample.label} is {mask.shape[0]}x{mask.shape[1]}"
            )
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.raw(index)
        mask = torch.from_numpy(mask.astype(np.int64))
        if self.ignore_index != IGNORE:
            mask[mask == IGNORE] = self.ignore_index
        if self.transform.augment is not None:
            return self.transform(image, mask, self.generator)
        image, mask = to_tensors(image, mask)
        image = normalize(image, self.transform.mean, self.transform.std)
        image, mask = eval_geometry(image, mask, self.geometry, self.eval_size, self.ignore_index)
        return image.contiguous(), mask.contiguous()

    # ------------------------------------------------------------------------------ statistics
    def class_frequencies(self) -> np.ndarray:
        """Fraction of the split's labelled pixels in each class (ignore excluded); sums to 1.

        Reads every label file once; with a ``cache_dir`` the counts are kept in a JSON file keyed
        by the dataset, split and file list.
        """
        if self._frequencies is None:
            counts = self._cached_counts()
            if counts is None:
                counts = np.zeros(256, np.int64)
                for s in self.samples:
                    counts += np.bincount(apply_label_map(self.read_label(s), self.LABEL_MAP).ravel(), minlength=256)
                self._store_counts(counts)
            labelled = np.asarray(counts[: self.num_classes], np.float64)
            self._frequencies = labelled / max(labelled.sum(), 1.0)
        return self._frequencies.copy()

    def _counts_path(self) -> str | None:
        if self.cache_dir is None:
            return None
        key = {"dataset": self.NAME, "version": FOLDER_VERSION, "split": self.split,
               "labels": [s.label for s in self.samples]}
        digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]
        return os.path.join(self.cache_dir, f"{self.NAME}-{self.split}-{digest}-label-counts.json")

    def _cached_counts(self):
        path = self._counts_path()
        if path is None:
            return None
        try:
            with open(path) as f:
                counts = np.asarray(json.load(f), np.int64)
        except (OSError, ValueError):
            return None
        return counts if counts.shape == (256,) else None

    def _store_counts(self, counts: np.ndarray) -> None:
        path = self._counts_path()
        if path is None:
            return
        os.makedirs(self.cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(counts.tolist(), f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def __repr__(self):
        return (f"{type(self).__name__}(root={str(self.base)!r}, split={self.split!r}, size={len(self)}, "
                f"augment={self.transform.augment}, eval_mode={self.eval_mode!r}, eval_size={self.eval_size})")


def check_slide(cfg: dict, mode: str) -> None:
    """``eval_crop`` / ``eval_stride``: required by ``slide`` ([h, w], positive, stride <= crop), unused otherwise."""
    crop, stride = cfg.get("eval_crop"), cfg.get("eval_stride")
    if mode != "slide":
        if crop is not None or stride is not None:
            raise ConfigError(f"dataset.eval_crop / dataset.eval_stride are used only by dataset.eval_mode=slide, "
                              f"but eval_mode={mode}; set eval_mode=slide or leave them null")
        return
    if crop is None or stride is None:
        raise ConfigError("dataset.eval_mode=slide needs dataset.eval_crop=[height, width] (the window) and "
                          "dataset.eval_stride=[height, width] (its step, <= the crop), e.g. eval_crop=[512,1024] "
                          "eval_stride=[341,683]")
    for key, value in (("eval_crop", crop), ("eval_stride", stride)):
        if len(value) != 2 or min(int(v) for v in value) < 1:
            raise ConfigError(f"dataset.{key} must be [height, width] with positive values, got {list(value)}")
    if int(stride[0]) > int(crop[0]) or int(stride[1]) > int(crop[1]):
        raise ConfigError(f"dataset.eval_stride {list(stride)} must not exceed dataset.eval_crop {list(crop)} "
                          f"in either direction (pixels between windows would get no prediction)")


def eval_geometry(image: torch.Tensor, mask: torch.Tensor, mode: str, size, ignore_index: int):
    """Bring a normalised evaluation item to a batchable size; see ``eval_mode`` in the module docstring."""
    if mode == "whole":
        return image, mask
    th, tw = int(size[0]), int(size[1])
    h, w = mask.shape
    if mode == "resize":
        target = (th, tw)
    elif mode == "pad":
        s = min(th / h, tw / w, 1.0)
        target = (min(th, max(1, round(h * s))), min(tw, max(1, round(w * s))))
    else:
        raise ValueError(f"unknown eval_mode {mode!r}; valid: {', '.join(EVAL_MODES)}")
    if target != (h, w):
        image = F.interpolate(image[None], size=target, mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=target, mode="nearest-exact")[0, 0].long()
    if mode == "pad":
        image, mask = pad_to(image, mask, (th, tw), ignore_index)
    return image, mask


def existing(paths: Sequence[Path]) -> Path | None:
    """The first of ``paths`` that is a directory."""
    for p in paths:
        if p.is_dir():
            return p
    return None


def files_with_suffix(folder: Path, suffix: str) -> list[Path]:
    """Files in ``folder`` whose name ends with ``suffix``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(suffix) and p.is_file())


def read_id_list(path: Path) -> list[str]:
    """One id per line (the first whitespace-separated field; blank lines skipped)."""
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


# ------------------------------------------------------------------------- config-only datasets
class ConfigFolder(FolderDataset):
    """A dataset described by its yaml alone (``type: folder``; mmsegmentation's ``img_dir``,
    ``ann_dir``, ``classes``, ``palette``), e.g. ``<folder>/dataset/my_streets.yaml``::

        name: my_streets
        type: folder
        root: /data/my_streets          # img_dir, ann_dir and the lists are relative to it
        img_dir: images                 # images/train/*.png, images/val/*.png
        ann_dir: labels                 # labels/train/*.png, labels/val/*.png (same names)
        class_names: [road, car, sky]
        palette: [[128, 64, 128], [0, 0, 142], [70, 130, 180]]
        ignore_index: 255

    Splits: ``train_dir`` / ``val_dir`` name the sub-folders of ``img_dir`` and ``ann_dir`` (default
    ``train`` / ``val``; ``""`` = the folders themselves); or ``train_list`` / ``val_list`` name text
    files of keys (one per line: a path relative to ``img_dir`` without suffix, as mmsegmentation's
    ``ann_file``). ``tune`` is carved from ``train`` as for every folder dataset.  Label files hold
    class ids ``0..K-1`` and ``ignore_index`` (``reduce_zero_label: true``: ``0`` is ignore and ``k``
    is class ``k-1``, as ADE20K's files); any other value is an error naming the file.
    """

    NAME = "folder"
    CLASS_NAMES = None  # per yaml (set on the instance); None: harness.data checks no fixed list
    LABEL_MAP = label_map([])
    LAYOUT = "<root>/<img_dir>/<train_dir|val_dir>/*<img_suffix> and <root>/<ann_dir>/<train_dir|val_dir>/*<ann_suffix>"

    def __init__(self, cfg: dict, split: str, augment: dict | None = None, cache_dir: str | None = None):
        names = tuple(str(c) for c in cfg["class_names"])
        self.NAME = str(cfg.get("name", "folder"))
        self.CLASS_NAMES = names
        self.PALETTE = tuple(tuple(int(v) for v in rgb) for rgb in (cfg.get("palette") or default_palette(len(names))))
        self.reduce_zero_label = bool(cfg.get("reduce_zero_label", False))
        k, raw_ignore = len(names), int(cfg.get("ignore_index", IGNORE))
        self.LABEL_MAP = label_map([(i + 1, i) for i in range(k)] if self.reduce_zero_label else [(i, i) for i in range(k)])
        self.raw_ignore = raw_ignore
        super().__init__(cfg, split, augment=augment, cache_dir=cache_dir)

    @classmethod
    def fail(cls, cfg: dict, problem: str) -> ConfigError:
        return ConfigError(f"dataset '{cfg.get('name', 'folder')}' (type: folder): {problem}")

    @classmethod
    def path(cls, cfg: dict, value: str) -> Path:
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() or not cfg.get("root") else Path(cfg["root"]).expanduser() / p

    @classmethod
    def locate(cls, cfg: dict) -> Path:
        return Path(cfg["root"]).expanduser() if cfg.get("root") else Path.cwd()

    @classmethod
    def split_dir(cls, cfg: dict, which: str, split: str) -> Path:
        sub = cfg.get(f"{split}_dir")
        base = cls.path(cfg, cfg[which])
        return base / sub if sub else base

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        names = list(cfg.get("class_names") or [])
        if not names:
            raise cls.fail(cfg, "class_names must list the classes (label id i = class_names[i])")
        if cfg.get("type", "folder") != "folder":
            raise cls.fail(cfg, f"type must be 'folder' (a dataset described by its yaml), got '{cfg.get('type')}'")
        palette = cfg.get("palette")
        if palette is not None and (len(palette) != len(names) or any(len(c) != 3 or not all(0 <= int(v) <= 255 for v in c)
                                                                       for c in palette)):
            raise cls.fail(cfg, f"palette must give one [r, g, b] (0-255) per class ({len(names)}), got {palette}")
        ignore = int(cfg.get("ignore_index", IGNORE))
        if 0 <= ignore < len(names) + (1 if cfg.get("reduce_zero_label") else 0):
            raise cls.fail(cfg, f"ignore_index={ignore} collides with a class id (0..{len(names) - 1})")
        if cfg.get("root") and not Path(cfg["root"]).expanduser().is_dir():
            raise cls.fail(cfg, f"root={cfg['root']} is not a directory")
        for key in ("img_dir", "ann_dir"):
            if not cfg.get(key) and cfg.get(key) != "":
                raise cls.fail(cfg, f"{key} is required (the folder of the {'images' if key == 'img_dir' else 'label PNGs'})")
        # the shared value checks (eval_mode, sizes, tune split, mean/std); ignore_index is checked above
        FolderDataset.check_config.__func__(cls, {**cfg, "ignore_index": -1})
        for split in ("train", "val"):
            listed = cfg.get(f"{split}_list")
            if listed:
                if not cls.path(cfg, listed).is_file():
                    raise cls.fail(cfg, f"{split}_list {cls.path(cfg, listed)} does not exist")
                continue
            for which in ("img_dir", "ann_dir"):
                folder = cls.split_dir(cfg, which, split)
                if not folder.is_dir():
                    raise cls.fail(cfg, f"the {split} {'images' if which == 'img_dir' else 'labels'} folder {folder} "
                                        f"does not exist ({which}={cfg[which]}, {split}_dir={cfg.get(f'{split}_dir')!r})")

    @classmethod
    def required_paths(cls, cfg: dict) -> list[str]:
        return []

    def list_source(self, source: str) -> list[Sample]:
        cfg, img_suffix, ann_suffix = self.cfg, self.cfg.get("img_suffix", ".png"), self.cfg.get("ann_suffix", ".png")
        listed = cfg.get(f"{source}_list")
        if listed:
            images, labels = self.path(cfg, cfg["img_dir"]), self.path(cfg, cfg["ann_dir"])
            keys = read_id_list(self.path(cfg, listed))
            for key in keys:
                if not (images / f"{key}{img_suffix}").is_file():
                    raise self.fail(cfg, f"{source}_list names '{key}' but there is no image {images / (key + img_suffix)}")
            return [self._pair(key, images / f"{key}{img_suffix}", labels / f"{key}{ann_suffix}") for key in sorted(keys)]
        images, labels = self.split_dir(cfg, "img_dir", source), self.split_dir(cfg, "ann_dir", source)
        image_files = {p.name[: -len(img_suffix)]: p for p in files_with_suffix(images, img_suffix)}
        label_keys = {p.name[: -len(ann_suffix)] for p in files_with_suffix(labels, ann_suffix)}
        orphans = sorted(label_keys - set(image_files))
        if orphans:
            shown = ", ".join(str(labels / (k + ann_suffix)) for k in orphans[:3])
            raise self.fail(cfg, f"{len(orphans)} label file(s) have no image in {images} (img_suffix={img_suffix!r}): "
                                 f"{shown}{' ...' if len(orphans) > 3 else ''}")
        return [self._pair(key, image_files[key], labels / f"{key}{ann_suffix}") for key in sorted(image_files)]

    def _pair(self, key: str, image: Path, label: Path) -> Sample:
        if not label.is_file():
            raise self.fail(self.cfg, f"image {image} has no label file {label}")
        return Sample(key, str(image), str(label))

    def read_label(self, sample: Sample) -> np.ndarray:
        """The label ids, checked: every value is a class id or ``ignore_index``."""
        label = read_label_png(sample.label)
        k = len(self.CLASS_NAMES) + (1 if self.reduce_zero_label else 0)
        bad = (label >= k) & (label != self.raw_ignore)
        if bad.any():
            values = sorted(int(v) for v in np.unique(label[bad]))[:5]
            raise self.fail(self.cfg, f"label file {sample.label} holds value(s) {values}, but there are "
                                      f"{len(self.CLASS_NAMES)} classes (ids 0..{k - 1}"
                                      f"{', 0 = ignore' if self.reduce_zero_label else ''}) and ignore_index="
                                      f"{self.raw_ignore}; fix the file, add the class to class_names or set ignore_index")
        return label  # LABEL_MAP sends ignore_index (every id that is not a class) to 255


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """PASCAL VOC's bit-interleaved colour map (what mmsegmentation draws when no palette is given)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out
