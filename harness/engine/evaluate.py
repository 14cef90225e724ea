"""Evaluation: one confusion matrix over the whole split, then mIoU, per-class IoU, accuracy.

IoU_k = TP_k / (TP_k + FP_k + FN_k), accumulated over every pixel of the split (not averaged per
image), as the Cityscapes scripts, MMSeg and the CIRKD evaluator do. Pixels labelled
`ignore_index` are excluded. A class with an empty union over the whole split (absent from both
the ground truth and the predictions) has no IoU: it is reported as None and left out of the mean.
(The CIRKD evaluator counts it as 0 instead; on the papers' validation sets every class is present,
so the two agree there. `absent="zero"` reproduces the CIRKD behaviour.)

Prediction = argmax of the logits upsampled bilinearly to the label size (single scale, whole
image).
"""
from __future__ import annotations

from typing import Dict, List, Optional

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


@torch.no_grad()
def predict(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Class ids at the image's resolution (whole image, single scale)."""
    logits = model(image).logits
    logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=True)
    return logits.argmax(dim=1)


def evaluate(model: torch.nn.Module, loader, num_classes: int, ignore_index: int,
             device: torch.device, max_images: Optional[int] = None,
             class_names: Optional[List[str]] = None) -> Dict[str, object]:
    """Evaluate `model` on every batch of `loader` (up to `max_images`); restores train mode after."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    seen = 0
    for image, mask in loader:
        if max_images is not None and seen >= max_images:
            break
        if max_images is not None:
            image, mask = image[: max_images - seen], mask[: max_images - seen]
        pred = predict(model, image.to(device, non_blocking=True)).cpu()
        cm += confusion_matrix(pred, mask, num_classes, ignore_index)
        seen += image.shape[0]
    model.train(was_training)
    result = metrics_from_confusion(cm)
    result["images"] = seen
    if class_names is not None:
        result["per_class_iou"] = dict(zip(class_names, result["per_class_iou"]))
    return result
