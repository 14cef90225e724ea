"""``cityscapes``: Cityscapes fine annotations, 19 train classes (Cordts et al., CVPR 2016).

Layout (the official ``leftImg8bit_trainvaltest.zip`` + ``gtFine_trainvaltest.zip``, unpacked
side by side into ``dataset.root``)::

    <root>/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

The ``*_gtFine_labelIds.png`` files (8-bit ids 0..33 of the full label set; the license plate,
id -1, and anything else outside the table -> ignore) are mapped to the 19 evaluation classes with
the official ``trainId`` table of ``cityscapesscripts/helpers/labels.py``; the 15 void / unused ids
(0-6, 9, 10, 14-16, 18, 29, 30) become ignore (255).  No ``createTrainIdLabelImgs`` step is needed.

Splits: ``train`` (2975 images, minus ``tune``), ``tune`` (carved from train, see
:mod:`harness.data.folder`), ``val`` (500).  All images are 1024 x 2048, so evaluation is on the
whole image at native size (``eval_mode: whole``, the CIRKD protocol).
"""

from __future__ import annotations

from .folder import FolderDataset, Sample, files_with_suffix, label_map

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# labelId -> trainId of the 19 evaluated classes (cityscapesscripts labels.py); the rest -> 255.
ID_TO_TRAIN_ID = (
    (7, 0), (8, 1), (11, 2), (12, 3), (13, 4), (17, 5), (19, 6), (20, 7), (21, 8), (22, 9),
    (23, 10), (24, 11), (25, 12), (26, 13), (27, 14), (28, 15), (31, 16), (32, 17), (33, 18),
)

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


class Cityscapes(FolderDataset):
    """``ds[i] -> (float32 3 x H x W image, int64 H x W mask)``; see the module docstring."""

    NAME = "cityscapes"
    CLASS_NAMES = CLASS_NAMES
    PALETTE = PALETTE
    LABEL_MAP = label_map(ID_TO_TRAIN_ID)
    LAYOUT = ("<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
              "<root>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png")

    @classmethod
    def required_paths(cls, cfg: dict) -> list[str]:
        return ["leftImg8bit/train/", "leftImg8bit/val/", "gtFine/train/", "gtFine/val/"]

    def list_source(self, source: str) -> list[Sample]:
        images, labels = self.base / "leftImg8bit" / source, self.base / "gtFine" / source
        samples = []
        for city in sorted(p.name for p in images.iterdir() if p.is_dir()):
            for image in files_with_suffix(images / city, IMAGE_SUFFIX):
                stem = image.name[: -len(IMAGE_SUFFIX)]
                samples.append(self._pair(f"{city}/{stem}", image, labels / city / (stem + LABEL_SUFFIX)))
        return samples
