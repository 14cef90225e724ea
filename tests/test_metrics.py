"""mIoU against confusion matrices computed by hand."""
import math

import numpy as np
import pytest
import torch

from harness.engine.evaluate import confusion_matrix, evaluate, metrics_from_confusion

IGNORE = 255


def test_confusion_matrix_by_hand_with_ignore_pixels():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, IGNORE, IGNORE]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, target, num_classes=3, ignore_index=IGNORE)
    # rows = truth, columns = prediction; the two ignore pixels are not counted at all
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_iou_values_by_hand():
    cm = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    m = metrics_from_confusion(cm)
    # class 0: tp 1, fp 1, fn 1 -> 1/3 ; class 1: tp 2, fp 1, fn 0 -> 2/3 ; class 2: tp 1, fn 1 -> 1/2
    assert m["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)
    assert m["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_absent_class_is_left_out_of_the_mean_or_counted_as_zero():
    # class 2 never appears in truth or prediction
    cm = np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
    m = metrics_from_confusion(cm)
    assert m["per_class_iou"][2] is None
    assert m["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    zero = metrics_from_confusion(cm, absent="zero")
    assert zero["miou"] == pytest.approx((3 / 4 + 4 / 5 + 0) / 3)


def test_class_predicted_but_absent_from_truth_scores_zero():
    cm = np.array([[2, 0, 1], [0, 2, 0], [0, 0, 0]])  # class 2 only predicted (a false positive)
    m = metrics_from_confusion(cm)
    assert m["per_class_iou"][2] == 0.0
    assert m["miou"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_perfect_prediction_and_empty_input():
    target = torch.randint(0, 4, (2, 5, 5))
    m = metrics_from_confusion(confusion_matrix(target, target, 4, IGNORE))
    assert m["miou"] == 1.0 and m["pixel_accuracy"] == 1.0
    everything_ignored = torch.full((1, 3, 3), IGNORE)
    empty = metrics_from_confusion(confusion_matrix(everything_ignored, everything_ignored, 4, IGNORE))
    assert math.isnan(empty["miou"]) and all(v is None for v in empty["per_class_iou"])


def test_labels_outside_the_class_range_are_an_error():
    with pytest.raises(ValueError, match="label ids outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3, IGNORE)


def test_evaluate_accumulates_over_the_split_not_per_image():
    """Two images whose per-image mIoU average differs from the split-level mIoU."""
    class Fixed(torch.nn.Module):
        def __init__(self, preds):
            super().__init__()
            self.preds = list(preds)

        def forward(self, x):
            from harness.models import SegOutput
            p = self.preds.pop(0)
            logits = torch.nn.functional.one_hot(p, 2).permute(0, 3, 1, 2).float()
            return SegOutput(logits=logits, aux_logits=None, features={})

    t1, p1 = torch.tensor([[[0, 0], [0, 1]]]), torch.tensor([[[0, 0], [0, 0]]])
    t2, p2 = torch.tensor([[[1, 1], [1, 1]]]), torch.tensor([[[1, 1], [1, 1]]])
    loader = [(torch.zeros(1, 3, 2, 2), t1), (torch.zeros(1, 3, 2, 2), t2)]
    m = evaluate(Fixed([p1, p2]), loader, 2, IGNORE, torch.device("cpu"), class_names=["a", "b"])
    # split-level: class 0 tp 3, fn 0, fp 1 -> 3/4 ; class 1 tp 4, fn 1 -> 4/5
    assert m["per_class_iou"] == pytest.approx({"a": 3 / 4, "b": 4 / 5})
    assert m["images"] == 2
