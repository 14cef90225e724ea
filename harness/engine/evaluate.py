"""Evaluation: one confusion matrix over the whole split, then mIoU, per-class IoU, accuracy.

IoU_k = TP_k / (TP_k + FP_k + FN_k), accumulated over every pixel of the split (not averaged per
image), as the Cityscapes scripts, MMSeg and the CIRKD evaluator do. Pixels labelled
`ignore_index` are excluded. A class with an empty union over the whole split (absent from both
the ground truth and the predictions) has no IoU: it is reported as None and left out of the mean.
(The CIRKD evaluator counts it as 0 instead; on the papers' validation sets every class is present,
so the two agree there. `absent="zero"` reproduces the CIRKD behaviour.)

Prediction (single scale), one of two inference modes:

* whole image (the default; `dataset.eval_mode` whole | pad | resize, which only decide the geometry
  of the items the loader gives): argmax of the logits upsampled bilinearly (align_corners=True, as
  the training loss) to the item's size.
* sliding window (`dataset.eval_mode: slide`, `dataset.eval_crop` [h, w], `dataset.eval_stride`
  [h, w]), mmseg's `slide_inference`: where the item is smaller than the crop it is first padded at
  the bottom/right with zeros (= the mean colour, the item being normalised) up to the crop; windows
  of exactly `eval_crop` start every `eval_stride` pixels, the last one in each direction moved back
  so it ends at the border (n_windows = ceil((H - h_crop) / h_stride) + 1 rows, likewise columns);
  each window's logits are upsampled (bilinear, align_corners=True) to the window's size, summed
  into a full-size B x K x H x W float32 canvas and divided by the number of windows covering each
  pixel; argmax at full resolution (the padding cut off). All items of a batch share each window,
  so the model runs once per window on the whole batch. Crop = the item's size is exactly whole-
  image inference; a pointwise (1x1-conv) model gives the whole-image logits for any window grid.
  Memory: the model sees one crop-sized batch at a time; the canvas is as large as whole-image
  inference's upsampled logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int) -> torch.Tensor:
    """K x K int64 matrix, rows = ground truth, columns = prediction; ignore pixels dropped."""
    valid = target != ignore_index
    t = target[valid].to(torch.int64)
    p = pred[valid].to(torch.int64)
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"label ids outside 0..{num_classes - 1} (and not ignore={ignore_index}): "
                         f"found {sorted(set(t.unique().tolist()) - set(range(num_classes)))[:5]}")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted class ids outside 0..{num_classes - 1}: found "
                         f"{sorted(set(p.unique().tolist()) - set(range(num_classes)))[:5]} (a model with more "
                         f"output channels than the dataset's {num_classes} classes?)")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor | np.ndarray, absent: str = "exclude") -> Dict[str, object]:
    """mIoU, per-class IoU (None where undefined), pixel accuracy, mean class accuracy."""
    if absent not in ("exclude", "zero"):
        raise ValueError("absent must be 'exclude' or 'zero'")
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    if absent == "zero":
        iou = np.nan_to_num(iou, nan=0.0)
    present = ~np.isnan(iou)
    total = cm.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_accuracy": float(np.nanmean(acc)) if (gt > 0).any() else float("nan"),
    }


@dataclass(frozen=True)
class SlideWindow:
    """Sliding-window inference: windows of `crop` [h, w] every `stride` [h, w] pixels."""

    crop: Tuple[int, int]
    stride: Tuple[int, int]

    def __post_init__(self):
        crop, stride = tuple(int(v) for v in self.crop), tuple(int(v) for v in self.stride)
        if len(crop) != 2 or len(stride) != 2 or min(crop + stride) < 1:
            raise ValueError(f"sliding window: crop and stride must be [height, width] with positive values, "
                             f"got crop={list(self.crop)}, stride={list(self.stride)}")
        if stride[0] > crop[0] or stride[1] > crop[1]:
            raise ValueError(f"sliding window: stride {list(stride)} larger than crop {list(crop)} would "
                             f"leave pixels no window covers")
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "stride", stride)


def slide_window(dataset_cfg: Optional[dict]) -> Optional[SlideWindow]:
    """The sliding window of a dataset config (`eval_mode: slide`), or None for whole-image inference."""
    if not dataset_cfg or dataset_cfg.get("eval_mode", "whole") != "slide":
        return None
    return SlideWindow(tuple(dataset_cfg["eval_crop"]), tuple(dataset_cfg["eval_stride"]))


def window_starts(size: int, crop: int, stride: int) -> List[int]:
    """First index of each window along one axis of length `size` >= `crop` (mmseg's grid)."""
    if size < crop:
        raise ValueError(f"axis of {size} pixels is shorter than the crop ({crop}); pad it first")
    n = max(size - crop + stride - 1, 0) // stride + 1
    return [min(i * stride, size - crop) for i in range(n)]


@torch.no_grad()
def slide_logits(model: torch.nn.Module, image: torch.Tensor, window: SlideWindow) -> torch.Tensor:
    """B x K x H x W logits of `image` (B x C x H x W, normalised) averaged over the windows (float32,
    or float64 for a float64 model)."""
    (ch, cw), (sh, sw) = window.crop, window.stride
    height, width = image.shape[-2:]
    pad_h, pad_w = max(ch - height, 0), max(cw - width, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))  # zeros = the mean colour after normalisation
    full_h, full_w = image.shape[-2:]
    total = count = None
    for y in window_starts(full_h, ch, sh):
        for x in window_starts(full_w, cw, sw):
            logits = model(image[..., y:y + ch, x:x + cw]).logits
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> float32 sums
            logits = F.interpolate(logits, size=(ch, cw), mode="bilinear", align_corners=True)
            if total is None:
                total = logits.new_zeros(image.shape[0], logits.shape[1], full_h, full_w)
                count = logits.new_zeros(1, 1, full_h, full_w)
            total[..., y:y + ch, x:x + cw] += logits
            count[..., y:y + ch, x:x + cw] += 1
    return (total / count)[..., :height, :width]


@torch.no_grad()
def predict(model: torch.nn.Module, image: torch.Tensor, slide: Optional[SlideWindow] = None) -> torch.Tensor:
    """Class ids at the image's resolution: whole image, or sliding windows when `slide` is given."""
    if slide is not None:
        return slide_logits(model, image, slide).argmax(dim=1)
    logits = model(image).logits
    logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=True)
    return logits.argmax(dim=1)


def evaluate(model: torch.nn.Module, loader, num_classes: int, ignore_index: int,
             device: torch.device, max_images: Optional[int] = None,
             class_names: Optional[List[str]] = None, slide: Optional[SlideWindow] = None) -> Dict[str, object]:
    """Evaluate `model` on every batch of `loader` (up to `max_images`); restores train mode after.
    `slide`: sliding-window inference (see `slide_window(cfg["dataset"])`); None = whole image."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    seen = 0
    for image, mask in loader:
        if max_images is not None and seen >= max_images:
            break
        if max_images is not None:
            image, mask = image[: max_images - seen], mask[: max_images - seen]
        pred = predict(model, image.to(device, non_blocking=True), slide).cpu()
        cm += confusion_matrix(pred, mask, num_classes, ignore_index)
        seen += image.shape[0]
    model.train(was_training)
    result = metrics_from_confusion(cm)
    result["images"] = seen
    if class_names is not None:
        result["per_class_iou"] = dict(zip(class_names, result["per_class_iou"]))
    return result
