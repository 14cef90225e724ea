"""Miniature copies of the real datasets, in their real on-disk layouts and file formats.

Each ``make_*`` writes a few small images per split under ``root`` (PNG / JPEG through PIL, label
PNGs as 8-bit grayscale or palette images like the originals, SBD labels as MATLAB ``.mat``) and
returns a :class:`Mini` describing what it wrote: the ``dataset.root`` to use and, for every image,
the raw label ids that were stored, so tests can derive the expected train ids independently.

Label maps are built so that every split holds every raw id of interest (the whole 0..255 range for
the 8-bit formats: class ids, void ids, the ignore value and ids outside the mapping), each in a
block of a few pixels, plus one large region per image so that training sees real structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# VOC colour map of the first indices (the bit-spread map every VOC palette PNG carries).
def _voc_colormap() -> list[int]:
    flat = []
    for k in range(256):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        flat += [r, g, b]
    return flat


@dataclass
class Mini:
    """What a builder wrote: ``root`` for ``dataset.root`` and ``labels[split][key] = raw ids``."""

    root: Path
    labels: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)  # split -> list of (h, w), in key order
    info: dict = field(default_factory=dict)

    def add(self, split: str, key: str, raw: np.ndarray) -> None:
        self.labels.setdefault(split, {})[key] = raw


def raw_label(rng: np.random.Generator, h: int, w: int, ids: np.ndarray, main: int) -> np.ndarray:
    """An ``h x w`` id map: ``main`` everywhere, then every id of ``ids`` in 2 x 2 blocks, row-major."""
    label = np.full((h, w), main, ids.dtype)
    order = rng.permutation(len(ids))
    per_row = w // 2
    if (len(ids) + per_row - 1) // per_row * 2 > h:
        raise ValueError(f"{h}x{w} is too small for {len(ids)} ids in 2x2 blocks")
    for n, i in enumerate(order):
        r, c = divmod(n, per_row)
        label[2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = ids[i]
    return label


def image_for(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """An RGB image that is a noisy function of the labels (so a model has something to learn)."""
    colours = rng.integers(0, 256, (int(label.max()) + 1, 3))
    img = colours[label.astype(np.int64)] * 0.8 + rng.integers(0, 50, (*label.shape, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save_png(path: Path, array: np.ndarray, mode: str | None = None, palette: list[int] | None = None) -> None:
    """RGB (H x W x 3 uint8), 'L' (uint8), 'P' (uint8 indices + ``palette``) or "I;16" (uint16) PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        im = Image.frombytes("P", (array.shape[1], array.shape[0]), np.ascontiguousarray(array, np.uint8).tobytes())
        im.putpalette(palette)
    else:
        im = Image.fromarray(array)
        assert mode is None or im.mode == mode, (im.mode, mode)
    im.save(path)


def _save_jpg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


ALL_8BIT = np.arange(256, dtype=np.uint8)


# --------------------------------------------------------------------------------------- cityscapes
def make_cityscapes(root, cities=None, size=(40, 80), seed=0) -> Mini:
    """``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``
    (plus the colour / instance / polygon files of the real release, which must be ignored)."""
    root = Path(root)
    cities = cities or {"train": {"aachen": 4, "bremen": 4}, "val": {"lindau": 3}}
    rng = np.random.default_rng(seed)
    mini = Mini(root)
    h, w = size
    for split, per_city in cities.items():
        for city, n in per_city.items():
            for i in range(n):
                stem = f"{city}_{i:06d}_{19 + i:06d}"
                raw = raw_label(rng, h, w, ALL_8BIT, main=int(rng.choice([7, 8, 11, 21, 23, 26])))
                _save_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image_for(rng, raw))
                gt = root / "gtFine" / split / city
                _save_png(gt / f"{stem}_gtFine_labelIds.png", raw, mode="L")
                _save_png(gt / f"{stem}_gtFine_color.png", image_for(rng, raw))
                _save_png(gt / f"{stem}_gtFine_instanceIds.png", raw.astype(np.uint16) * 100, mode="I;16")
                (gt / f"{stem}_gtFine_polygons.json").write_text("{}")
                mini.add(split, f"{city}/{stem}", raw)
    return mini


# --------------------------------------------------------------------------------------------- voc
VOC_TRAIN, VOC_VAL = 6, 3


def make_voc(root, seed=0, nested=False, aug=False, sbd=False) -> Mini:
    """``JPEGImages``, ``SegmentationClass`` palette PNGs, ``ImageSets/Segmentation/{train,val}.txt``;
    images of different sizes.  ``aug``: ``SegmentationClassAug`` (grayscale PNGs) and
    ``train_aug.txt`` (which, to test the guard, also lists a val id); ``sbd``: an SBD folder
    ``<root>/SBD/dataset`` with ``cls/*.mat``, ``img/*.jpg``, ``train.txt``, ``val.txt``.
    ``nested``: the files live in ``<root>/VOCdevkit/VOC2012``.  (With ``sbd``, one SBD-only image is
    moved to SBD's ``img/``, so do not combine ``sbd`` with ``aug``.)
    ``labels`` gets the splits ``train``, ``val`` and, with aug/sbd, ``train_aug`` / ``train_sbd``."""
    top = Path(root)
    base = top / "VOCdevkit" / "VOC2012" if nested else top
    rng = np.random.default_rng(seed)
    mini = Mini(top)
    palette = _voc_colormap()
    voc_ids = {"train": [f"2007_{i:06d}" for i in range(VOC_TRAIN)],
               "val": [f"2008_{i:06d}" for i in range(VOC_VAL)]}
    sizes = [(36, 40), (40, 36), (33, 41), (40, 40), (35, 38), (38, 34)]
    for split, ids in voc_ids.items():
        for n, i in enumerate(ids):
            h, w = sizes[n % len(sizes)]
            raw = raw_label(rng, h, w, ALL_8BIT, main=int(rng.integers(0, 21)))
            _save_jpg(base / "JPEGImages" / f"{i}.jpg", image_for(rng, raw))
            _save_png(base / "SegmentationClass" / f"{i}.png", raw, mode="P", palette=palette)
            mini.add(split, i, raw)
            mini.sizes.setdefault(split, []).append((h, w))
    (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for split, ids in voc_ids.items():
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    extra = [f"2011_{i:06d}" for i in range(4)]  # images only SBD annotates
    if aug or sbd:
        for i in extra:
            h, w = 34, 36
            raw = raw_label(rng, h, w, np.arange(22, dtype=np.uint8), main=int(rng.integers(0, 21)))
            _save_jpg(base / "JPEGImages" / f"{i}.jpg", image_for(rng, raw))
            mini.add("sbd_only", i, raw)
    if aug:
        aug_ids = voc_ids["train"] + extra + [voc_ids["val"][0]]  # a val id that must be dropped
        for i in aug_ids:
            raw = mini.labels["sbd_only"][i] if i in extra else _train_or_val(mini, i)
            _save_png(base / "SegmentationClassAug" / f"{i}.png", raw, mode="L")
            if i not in voc_ids["val"]:
                mini.add("train_aug", i, raw)
        (base / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("".join(i + "\n" for i in aug_ids))
    if sbd:
        from scipy.io import savemat

        sbd_dir = top / "SBD" / "dataset"
        (sbd_dir / "cls").mkdir(parents=True, exist_ok=True)
        (sbd_dir / "img").mkdir(parents=True, exist_ok=True)
        sbd_ids = {"train": extra[:2] + voc_ids["train"][:2], "val": extra[2:] + [voc_ids["val"][1]]}
        for i in sbd_ids["train"] + sbd_ids["val"]:
            if i in extra:
                raw = mini.labels["sbd_only"][i]
            else:  # SBD's own (different) annotation of a VOC image: VOC's PNG must win
                raw = np.zeros_like(_train_or_val(mini, i))
            seg = np.where(raw > 20, 0, raw).astype(np.uint8)  # SBD has no void label
            gt = {"Segmentation": seg, "Boundaries": np.zeros((1, 1)), "CategoriesPresent": np.unique(seg)}
            savemat(str(sbd_dir / "cls" / f"{i}.mat"), {"GTcls": gt})
            if i in extra:
                mini.add("sbd_mat", i, seg)
        # one SBD-only image is not in VOC's JPEGImages: it must be read from SBD's img/
        moved = extra[3]
        (base / "JPEGImages" / f"{moved}.jpg").rename(sbd_dir / "img" / f"{moved}.jpg")
        for split, ids in sbd_ids.items():
            (sbd_dir / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
        mini.info["sbd_root"] = sbd_dir
    return mini


def _train_or_val(mini: Mini, key: str) -> np.ndarray:
    return mini.labels["train"].get(key, mini.labels["val"].get(key))


# ------------------------------------------------------------------------------------------ ade20k
def make_ade20k(root, seed=0, n_train=6, n_val=3) -> Mini:
    """``<root>/ADEChallengeData2016/{images,annotations}/{training,validation}``, varying sizes."""
    base = Path(root) / "ADEChallengeData2016"
    rng = np.random.default_rng(seed)
    mini = Mini(Path(root))
    sizes = [(40, 36), (36, 44), (40, 40), (34, 46)]
    for split, folder, prefix, n in (("train", "training", "ADE_train", n_train),
                                     ("val", "validation", "ADE_val", n_val)):
        for k in range(n):
            key = f"{prefix}_{k + 1:08d}"
            h, w = sizes[k % len(sizes)]
            raw = raw_label(rng, h, w, ALL_8BIT, main=int(rng.integers(0, 151)))
            _save_jpg(base / "images" / folder / f"{key}.jpg", image_for(rng, raw))
            _save_png(base / "annotations" / folder / f"{key}.png", raw, mode="L")
            mini.add(split, key, raw)
            mini.sizes.setdefault(split, []).append((h, w))
    return mini


# ------------------------------------------------------------------------------------------ camvid
CAMVID_COUNTS = {"train": 5, "val": 3, "test": 2}


def make_camvid(root, seed=0, size=(36, 48)) -> Mini:
    """SegNet layout: ``{train,val,test}/*.png`` + ``{train,val,test}annot/*.png`` (same names)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    mini = Mini(root)
    h, w = size
    for split, n in CAMVID_COUNTS.items():
        for k in range(n):
            key = f"0001TP_{split}_{k:06d}"
            raw = raw_label(rng, h, w, ALL_8BIT, main=int(rng.integers(0, 12)))
            _save_png(root / split / f"{key}.png", image_for(rng, raw))
            _save_png(root / f"{split}annot" / f"{key}.png", raw, mode="L")
            mini.add(split, key, raw)
    return mini
