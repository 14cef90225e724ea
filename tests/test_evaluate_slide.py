"""Sliding-window evaluation (dataset.eval_mode=slide): window grid, count normalisation, padding,
equality with whole-image inference where it must hold, config validation, and the wiring through
the folder datasets, `evaluate` and `engine.train.run`.

The reference here is a float64 loop written from mmseg's `slide_inference` description: every
pixel's logit is the mean over the windows covering it of that window's (upsampled) logit.
"""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness.config import load_config
from harness.errors import ConfigError
from harness.data import build_dataset
from harness.engine.evaluate import (SlideWindow, confusion_matrix, evaluate, metrics_from_confusion, predict,
                                     slide_logits, slide_window, window_starts)
from harness.models import SegOutput, build_segmenter

from miniature import make_cityscapes, make_voc
from harness.engine.teacher import teacher_for

torch.set_num_threads(1)
IGNORE = 255


class Pointwise(nn.Module):
    """1x1 convs only: translation-equivariant, each output pixel depends on its input pixel alone."""

    def __init__(self, k=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, k, 1))

    def forward(self, x):
        return SegOutput(logits=self.net(x))


class WindowIndex(nn.Module):
    """Logits constant over each window: channel 0 = the index of the call (1, 2, ...), channel 1 = `other`;
    at a quarter of the input's resolution (upsampling a constant keeps it). Records input shapes."""

    def __init__(self, other=0.0):
        super().__init__()
        self.shapes = []
        self.other = other

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        b, _, h, w = x.shape
        out = torch.full((b, 2, max(1, h // 4), max(1, w // 4)), self.other)
        out[:, 0] = len(self.shapes)
        return SegOutput(logits=out)


def reference_logits(model, image, crop, stride):
    """Float64 loop: windows from the formula, each window's logits upsampled to the crop, averaged."""
    b, c, h, w = image.shape
    ch, cw = crop
    sh, sw = stride
    padded = torch.zeros(b, c, max(h, ch), max(w, cw), dtype=image.dtype)
    padded[..., :h, :w] = image
    H, W = padded.shape[-2:]
    ny = -(-(H - ch) // sh) + 1  # ceil
    nx = -(-(W - cw) // sw) + 1
    acc = torch.zeros(b, model_classes(model, padded[..., :ch, :cw]), H, W, dtype=torch.float64)
    cnt = torch.zeros(H, W, dtype=torch.float64)
    for i in range(ny):
        for j in range(nx):
            y, x = min(i * sh, H - ch), min(j * sw, W - cw)
            out = model(padded[..., y:y + ch, x:x + cw]).logits
            out = nn.functional.interpolate(out, size=(ch, cw), mode="bilinear", align_corners=True)
            for yy in range(ch):
                for xx in range(cw):
                    acc[..., y + yy, x + xx] += out[..., yy, xx].double()
                    cnt[y + yy, x + xx] += 1
    return (acc / cnt)[..., :h, :w]


def model_classes(model, crop):
    with torch.no_grad():
        return model(crop).logits.shape[1]


# --- the window grid ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size, crop, stride, expected", [
    (7, 3, 2, [0, 2, 4]),          # fits exactly
    (7, 3, 3, [0, 3, 4]),          # last window moved back to end at the border
    (5, 5, 2, [0]),                # crop = size: one window
    (10, 4, 4, [0, 4, 6]),
    (1024, 512, 341, [0, 341, 512]),
    (2048, 1024, 683, [0, 683, 1024]),
])
def test_window_starts(size, crop, stride, expected):
    assert window_starts(size, crop, stride) == expected


def test_windows_cover_every_pixel():
    for size in range(3, 30):
        for crop in range(1, size + 1):
            for stride in range(1, crop + 1):
                starts = window_starts(size, crop, stride)
                covered = set()
                for s in starts:
                    assert 0 <= s <= size - crop
                    covered |= set(range(s, s + crop))
                assert covered == set(range(size))
                assert len(starts) == -(-(size - crop) // stride) + 1


# --- count normalisation on a hand-computed example ----------------------------------------------------


def test_count_normalisation_hand_computed():
    """5 x 7 image, crop 3 x 3, stride 2 x 3: rows [0, 2], columns [0, 3, 4]; windows called in
    row-major order with values 1..6; each pixel gets the mean of the values of its windows."""
    model = WindowIndex()
    logits = slide_logits(model, torch.zeros(1, 3, 5, 7), SlideWindow((3, 3), (2, 3)))
    # window values: (r0,c0)=1 (r0,c3)=2 (r0,c4)=3 (r2,c0)=4 (r2,c3)=5 (r2,c4)=6
    row_a = [1, 1, 1, 2, 2.5, 2.5, 3]          # rows 0, 1: row window 0 only
    row_b = [2.5, 2.5, 2.5, 3.5, 4, 4, 4.5]    # row 2: both row windows -> mean of (v, v + 3)
    row_c = [4, 4, 4, 5, 5.5, 5.5, 6]          # rows 3, 4: row window 2 only
    expected = torch.tensor([row_a, row_a, row_b, row_c, row_c])
    torch.testing.assert_close(logits[0, 0], expected, rtol=0, atol=1e-6)
    assert (logits[0, 1] == 0).all()
    assert model.shapes == [(1, 3, 3, 3)] * 6


@pytest.mark.parametrize("h, w, crop, stride", [(9, 13, (5, 6), (3, 4)), (11, 7, (4, 7), (2, 5)), (6, 6, (3, 3), (3, 3))])
def test_matches_float64_loop_reference_on_a_real_segmenter(h, w, crop, stride):
    """Odd sizes; a PSPNet with output stride 8 (logits smaller than the crop, upsampled per window)."""
    torch.manual_seed(0)
    model = build_segmenter({"name": "t", "backbone": "resnet18", "head": "pspnet", "output_stride": 8,
                             "head_channels": 8, "width": 0.125, "aux": False, "aux_weight": 0.4,
                             "dropout": 0.1, "pretrained": None}, 3).eval().double()
    image = torch.randn(2, 3, h, w, dtype=torch.float64)
    got = slide_logits(model, image, SlideWindow(crop, stride))
    assert got.shape == (2, 3, h, w) and got.dtype == torch.float64
    torch.testing.assert_close(got, reference_logits(model, image, crop, stride), rtol=1e-6, atol=1e-9)


# --- equality with whole-image inference -----------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(33, 47), (24, 32), (1, 9)])
def test_crop_equal_to_the_image_is_whole_image_inference(h, w):
    torch.manual_seed(1)
    model = build_segmenter({"name": "t", "backbone": "resnet18", "head": "pspnet", "output_stride": 8,
                             "head_channels": 8, "width": 0.125, "aux": True, "aux_weight": 0.4,
                             "dropout": 0.1, "pretrained": None}, 5).eval()
    image = torch.randn(3, 3, h, w)
    whole = nn.functional.interpolate(model(image).logits, size=(h, w), mode="bilinear", align_corners=True)
    slid = slide_logits(model, image, SlideWindow((h, w), (max(1, h // 2), max(1, w // 3))))
    assert torch.equal(slid, whole)
    assert torch.equal(predict(model, image, SlideWindow((h, w), (h, w))), predict(model, image))


@pytest.mark.parametrize("h, w, crop, stride", [(17, 23, (5, 7), (3, 4)), (16, 16, (8, 8), (4, 4)),
                                                 (9, 31, (9, 10), (1, 3))])
def test_overlapping_windows_on_a_pointwise_model_equal_whole_image(h, w, crop, stride):
    model = Pointwise().eval()
    image = torch.randn(2, 3, h, w)
    whole = model(image).logits
    slid = slide_logits(model, image, SlideWindow(crop, stride))
    torch.testing.assert_close(slid, whole, rtol=1e-6, atol=1e-6)
    assert torch.equal(predict(model, image, SlideWindow(crop, stride)), whole.argmax(1))


def test_image_smaller_than_the_crop_is_zero_padded():
    """The model sees crop-sized inputs: the image at the top left, zeros elsewhere; the padding's
    logits are cut off. A pointwise model is unaffected by the padding."""
    seen = []

    class Spy(Pointwise):
        def forward(self, x):
            seen.append(x.clone())
            return super().forward(x)

    model = Spy().eval()
    image = torch.randn(1, 3, 5, 7)
    slid = slide_logits(model, image, SlideWindow((8, 6), (4, 2)))  # taller than the image, narrower
    assert slid.shape == (1, 4, 5, 7)
    assert [tuple(x.shape) for x in seen] == [(1, 3, 8, 6)] * 2  # rows [0], columns [0, 1]
    assert torch.equal(seen[0][..., :5, :6], image[..., :6]) and (seen[0][..., 5:, :] == 0).all()
    assert torch.equal(seen[1][..., :5, :], image[..., 1:7]) and (seen[1][..., 5:, :] == 0).all()
    torch.testing.assert_close(slid, model(image).logits, rtol=1e-6, atol=1e-6)
    # a model that looks at its whole input: padding is context, matching the float64 loop
    torch.manual_seed(2)
    deep = build_segmenter({"name": "t", "backbone": "resnet18", "head": "pspnet", "output_stride": 8,
                            "head_channels": 8, "width": 0.125, "aux": False, "aux_weight": 0.4,
                            "dropout": 0.1, "pretrained": None}, 3).eval().double()
    image = torch.randn(1, 3, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(slide_logits(deep, image, SlideWindow((8, 8), (8, 8))),
                               reference_logits(deep, image, (8, 8), (8, 8)), rtol=1e-6, atol=1e-9)


# --- evaluate() and the config ------------------------------------------------------------------------------


def test_evaluate_with_slide_scores_the_slide_predictions():
    model = WindowIndex(other=3.2)
    torch.manual_seed(3)
    images = torch.randn(2, 3, 5, 7)
    masks = torch.randint(0, 2, (2, 5, 7))
    masks[0, 0, 0] = IGNORE
    window = SlideWindow((3, 3), (2, 3))
    # averaged channel 0 (test_count_normalisation_hand_computed) against 3.2: class 0 where above
    row_a, row_b, row_c = [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]
    expected_pred = torch.tensor([row_a, row_a, row_b, row_c, row_c]).expand(2, 5, 7)
    assert torch.equal(predict(WindowIndex(other=3.2), images, window), expected_pred)
    m = evaluate(model, [(images, masks)], 2, IGNORE, torch.device("cpu"), slide=window)
    expected = metrics_from_confusion(confusion_matrix(expected_pred, masks, 2, IGNORE))
    assert m["miou"] == expected["miou"] and m["per_class_iou"] == expected["per_class_iou"]
    assert model.shapes == [(2, 3, 3, 3)] * 6  # one call per window, on the whole batch
    # default: whole image (one call on the full image)
    whole = WindowIndex()
    evaluate(whole, [(images, masks)], 2, IGNORE, torch.device("cpu"))
    assert whole.shapes == [(2, 3, 5, 7)]


def test_slide_window_from_the_dataset_config():
    assert slide_window({"eval_mode": "whole", "eval_crop": None}) is None
    assert slide_window({"name": "synthetic"}) is None
    w = slide_window({"eval_mode": "slide", "eval_crop": [512, 1024], "eval_stride": [341, 683]})
    assert w == SlideWindow((512, 1024), (341, 683))
    with pytest.raises(ValueError, match="stride"):
        SlideWindow((4, 4), (5, 1))
    with pytest.raises(ValueError, match="positive"):
        SlideWindow((0, 4), (1, 1))


@pytest.fixture(scope="module")
def minis(tmp_path_factory):
    base = tmp_path_factory.mktemp("minis")
    return {"cityscapes": make_cityscapes(base / "cityscapes"), "voc": make_voc(base / "voc")}


def city(minis, *extra):
    return ["dataset=cityscapes", f"dataset.root={minis['cityscapes'].root}", *extra]


@pytest.mark.parametrize("extra, message", [
    (["dataset.eval_mode=slide"], "eval_mode=slide needs dataset.eval_crop"),
    (["dataset.eval_mode=slide", "dataset.eval_crop=[16,16]"], "eval_mode=slide needs dataset.eval_crop"),
    (["dataset.eval_mode=slide", "dataset.eval_crop=[16,0]", "dataset.eval_stride=[8,8]"],
     "eval_crop must be [height, width] with positive values"),
    (["dataset.eval_mode=slide", "dataset.eval_crop=[16,16]", "dataset.eval_stride=[8,-1]"],
     "eval_stride must be [height, width] with positive values"),
    (["dataset.eval_mode=slide", "dataset.eval_crop=[16,16]", "dataset.eval_stride=[8,8,8]"],
     "eval_stride must be [height, width]"),
    (["dataset.eval_mode=slide", "dataset.eval_crop=[16,16]", "dataset.eval_stride=[8,17]"],
     "eval_stride [8, 17] must not exceed dataset.eval_crop [16, 16]"),
    (["dataset.eval_crop=[16,16]", "dataset.eval_stride=[8,8]"], "used only by dataset.eval_mode=slide"),
    (["dataset.eval_mode=sliding"], "eval_mode must be one of whole, pad, resize, slide"),
])
def test_bad_slide_config_is_a_config_error(minis, extra, message):
    with pytest.raises(ConfigError) as info:
        load_config(city(minis, *extra))
    assert message in str(info.value)


def test_slide_items_whole_or_padded(minis):
    cfg = load_config(city(minis, "dataset.eval_mode=slide", "dataset.eval_size=null",
                           "dataset.eval_crop=[24,32]", "dataset.eval_stride=[16,24]"))["dataset"]
    ds = build_dataset(cfg, "val")
    assert tuple(ds[0][0].shape) == (3, 40, 80)  # native size (the miniature's frames are 40 x 80)
    # mixed sizes without eval_size: refused, pointing at eval_size
    voc = load_config(["dataset=voc", f"dataset.root={minis['voc'].root}", "dataset.eval_mode=slide",
                       "dataset.eval_crop=[24,24]", "dataset.eval_stride=[16,16]"])["dataset"]
    with pytest.raises(ConfigError, match="set dataset.eval_size"):
        build_dataset({**voc, "eval_size": None}, "val")
    # with eval_size: the pad items (batchable), windows over them
    ds = build_dataset({**voc, "eval_size": [48, 48]}, "val")
    items = [ds[i] for i in range(len(ds))]
    assert {tuple(img.shape) for img, _ in items} == {(3, 48, 48)}
    images, masks = next(iter(DataLoader(ds, batch_size=len(ds))))
    m = evaluate(Pointwise(k=21).eval(), [(images, masks)], 21, IGNORE, torch.device("cpu"),
                 slide=slide_window(voc))
    assert m["images"] == len(ds) and 0 <= m["pixel_accuracy"] <= 1


def test_train_run_evaluates_with_the_sliding_window(minis, tiny, monkeypatch):
    """run() passes the dataset's window to evaluate; the recorded mIoU is the slide mIoU."""
    import harness.engine.train as train_module

    calls = []
    real = train_module.evaluate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("slide"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", spy)
    overrides = [o for o in tiny() if not o.startswith(("dataset.", "threads="))] + ["threads=1"]
    cfg = load_config(city(minis, "dataset.eval_mode=slide", "dataset.eval_size=null", "dataset.eval_crop=[32,48]",
                           "dataset.eval_stride=[8,32]", *overrides))
    result = train_module.run(cfg, teacher=teacher_for(cfg))
    assert result.record["status"] == "completed"
    assert calls == [SlideWindow((32, 48), (8, 32))] * 2
    # the final mIoU is what slide inference of the returned model gives
    ds = build_dataset(cfg["dataset"], "val")
    loader = DataLoader(ds, batch_size=cfg["budget"]["eval_batch_size"])
    again = real(result.model, loader, ds.num_classes, ds.ignore_index, torch.device("cpu"),
                 cfg["budget"]["max_eval_images"], slide=SlideWindow((32, 48), (8, 32)))
    assert again["miou"] == pytest.approx(result.record["final_miou"], rel=1e-12)
