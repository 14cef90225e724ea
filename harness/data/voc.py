"""``voc``: PASCAL VOC 2012 segmentation, 21 classes incl. background (Everingham et al., IJCV 2010).

Layout (``VOCtrainval_11-May-2012.tar`` unpacked; ``dataset.root`` may be ``VOC2012`` itself, or a
folder holding ``VOC2012/`` or ``VOCdevkit/VOC2012/``)::

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png               palette PNGs
    <root>/ImageSets/Segmentation/{train,val}.txt   one id per line

``SegmentationClass`` PNGs are palette images: the stored palette *index* is the class id (0 =
background .. 20 = tvmonitor), 255 marks the void border -> ignore.  They are read as indices, never
as colours.  Any other index (not present in the official files) is ignore.

Augmented training set (``dataset.train_aug``), as used by CIRKD (10 582 images):

* ``none`` -- ``train.txt`` (1464 images) with ``SegmentationClass`` labels;
* ``SegmentationClassAug`` -- the widely shared conversion of SBD (Hariharan et al. 2011):
  ``<root>/SegmentationClassAug/<id>.png`` (8-bit ids, same meaning) and the id list
  ``dataset.aug_list`` (default ``ImageSets/Segmentation/train_aug.txt``, relative to the root);
* ``sbd`` -- SBD's own release, ``dataset.sbd_root`` = its ``dataset`` folder with
  ``cls/<id>.mat`` (``GTcls.Segmentation``, read with ``scipy.io.loadmat``) and ``train.txt`` /
  ``val.txt``.  Training list = VOC ``train`` + SBD ``train`` + SBD ``val``; the label of an id is
  VOC's ``SegmentationClass`` PNG where VOC has one (finer, with a void border), else SBD's ``.mat``;
  the image is VOC's ``JPEGImages/<id>.jpg``, else SBD's ``img/<id>.jpg``.

With either augmented set, every id of VOC's ``val.txt`` is removed from the training list, so
``val`` never leaks into ``train`` or ``tune`` (the standard ``train_aug`` list already excludes
them; a list that does not is corrected, not trusted).  Duplicates are dropped.

Splits: ``train`` (minus ``tune``), ``tune`` (carved from the training list), ``val`` (1449).
Images vary in size (at most 500 x 500): evaluation uses ``eval_mode: pad`` to 512 x 512, which
scores every image at its native resolution (see :mod:`harness.data.folder`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.errors import ConfigError

from .folder import FolderDataset, Sample, label_map, read_id_list, read_label_png

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
TRAIN_AUG = ("none", "SegmentationClassAug", "sbd")


def voc_palette(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The VOC colour map: the bits of the class id spread over the high bits of R, G and B."""
    colours = []
    for k in range(n):
        r = g = b = 0
        c = k
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


PALETTE = voc_palette(len(CLASS_NAMES))


class VOC(FolderDataset):
    """``ds[i] -> (float32 3 x H x W image, int64 H x W mask)``; see the module docstring."""

    NAME = "voc"
    CLASS_NAMES = CLASS_NAMES
    PALETTE = PALETTE
    LABEL_MAP = label_map([(k, k) for k in range(21)])  # 255 (void border) and any other index -> ignore
    LAYOUT = ("<root>/JPEGImages/<id>.jpg, <root>/SegmentationClass/<id>.png and "
              "<root>/ImageSets/Segmentation/{train,val}.txt (root may also hold VOC2012/ or VOCdevkit/VOC2012/); "
              "train_aug=SegmentationClassAug adds <root>/SegmentationClassAug/<id>.png and the list dataset.aug_list; "
              "train_aug=sbd needs dataset.sbd_root with cls/<id>.mat, img/<id>.jpg, train.txt, val.txt")

    @classmethod
    def locate(cls, cfg: dict) -> Path:
        root = Path(cls.root_of(cfg))
        for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
            if (candidate / "JPEGImages").is_dir():
                return candidate
        return root

    @classmethod
    def required_paths(cls, cfg: dict) -> list[str]:
        paths = ["JPEGImages/", "SegmentationClass/", "ImageSets/Segmentation/train.txt",
                 "ImageSets/Segmentation/val.txt"]
        if cfg.get("train_aug", "none") == "SegmentationClassAug":
            paths += ["SegmentationClassAug/", cfg.get("aug_list") or "ImageSets/Segmentation/train_aug.txt"]
        return paths

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        aug = cfg.get("train_aug", "none")
        if aug not in TRAIN_AUG:
            raise ConfigError(f"dataset.train_aug must be one of {', '.join(TRAIN_AUG)}, got '{aug}'")
        super().check_config(cfg)
        if aug == "sbd":
            sbd = cls.sbd_root(cfg)
            missing = [p for p in ("cls/", "train.txt", "val.txt") if not (sbd / p).exists()]
            if missing:
                raise cls.error(f"the SBD folder dataset.sbd_root={sbd} lacks {', '.join(missing)}")

    @classmethod
    def sbd_root(cls, cfg: dict) -> Path:
        if not cfg.get("sbd_root"):
            raise cls.error("dataset.train_aug=sbd needs dataset.sbd_root (SBD's 'dataset' folder)")
        return Path(cfg["sbd_root"]).expanduser()

    # ------------------------------------------------------------------------------ listing
    def list_source(self, source: str) -> list[Sample]:
        aug = self.cfg.get("train_aug", "none")
        if source == "train" and aug == "SegmentationClassAug":
            ids = read_id_list(self.base / (self.cfg.get("aug_list") or "ImageSets/Segmentation/train_aug.txt"))
            return self._samples(self._without_val(ids), "SegmentationClassAug")
        if source == "train" and aug == "sbd":
            return self._sbd_train()
        return self._samples(read_id_list(self.base / "ImageSets" / "Segmentation" / f"{source}.txt"),
                             "SegmentationClass")

    def _without_val(self, ids: list[str]) -> list[str]:
        val = set(read_id_list(self.base / "ImageSets" / "Segmentation" / "val.txt"))
        return sorted(set(ids) - val)

    def _samples(self, ids: list[str], label_folder: str) -> list[Sample]:
        ids = sorted(set(ids))
        if not ids:
            return []
        images = self._image_names()
        samples = []
        for i in ids:
            if i not in images:
                raise self.error(f"id '{i}' has no image {self.base / 'JPEGImages' / (i + '.jpg')}")
            samples.append(self._pair(i, self.base / "JPEGImages" / f"{i}.jpg", self.base / label_folder / f"{i}.png"))
        return samples

    def _image_names(self) -> set[str]:
        return {p.stem for p in (self.base / "JPEGImages").iterdir() if p.suffix == ".jpg"}

    def _sbd_train(self) -> list[Sample]:
        sbd = self.sbd_root(self.cfg)
        ids = set(read_id_list(self.base / "ImageSets" / "Segmentation" / "train.txt"))
        ids |= set(read_id_list(sbd / "train.txt")) | set(read_id_list(sbd / "val.txt"))
        voc_images = self._image_names()
        samples = []
        for i in self._without_val(ids):
            png = self.base / "SegmentationClass" / f"{i}.png"
            mat = sbd / "cls" / f"{i}.mat"
            label = png if png.is_file() else mat
            if not label.is_file():
                raise self.error(f"id '{i}' has neither {png} nor {mat}")
            image = self.base / "JPEGImages" / f"{i}.jpg" if i in voc_images else sbd / "img" / f"{i}.jpg"
            if not image.is_file():
                raise self.error(f"id '{i}' has no image in JPEGImages/ nor in {sbd / 'img'}")
            samples.append(Sample(i, str(image), str(label)))
        return samples

    def read_label(self, sample: Sample) -> np.ndarray:
        if sample.label.endswith(".mat"):
            return read_sbd_mat(sample.label)
        return read_label_png(sample.label)


def read_sbd_mat(path: str) -> np.ndarray:
    """The class-id map ``GTcls.Segmentation`` of an SBD ``cls/<id>.mat`` file."""
    from scipy.io import loadmat

    try:
        gt = loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"]
        return np.asarray(gt.Segmentation)
    except (KeyError, AttributeError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not an SBD class annotation (a .mat file with GTcls.Segmentation): {e}") from None
