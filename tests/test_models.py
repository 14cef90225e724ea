"""Tests for harness.models: every backbone x head, strides, pretrained loading, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from harness.models import (
    BACKBONES,
    HEADS,
    SegOutput,
    Segmenter,
    build_segmenter,
    count_parameters,
)
from harness.models.heads import DeepLabV3Head, aspp_rates

NUM_CLASSES = 5
FEATURE_NAMES = {"stage1", "stage2", "stage3", "stage4", "head"}


def cfg(backbone="resnet18", head="pspnet", **kw):
    c = {
        "name": f"{head}_{backbone}",
        "backbone": backbone,
        "head": head,
        "output_stride": 8,
        "head_channels": 16,
        "aux": True,
        "aux_weight": 0.4,
        "dropout": 0.1,
        "pretrained": None,
    }
    c.update(kw)
    return c


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _check_output(model: Segmenter, out: SegOutput, x: torch.Tensor, os_: int, aux: bool):
    b, _, hgt, wid = x.shape
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (b, NUM_CLASSES, hgt // os_, wid // os_)
    if aux:
        s3 = model.feature_strides["stage3"]
        assert out.aux_logits is not None
        assert out.aux_logits.shape == (b, NUM_CLASSES, hgt // s3, wid // s3)
    else:
        assert out.aux_logits is None
    assert set(out.features) == FEATURE_NAMES
    assert set(model.feature_channels) == FEATURE_NAMES
    assert set(model.feature_strides) == FEATURE_NAMES
    for name, f in out.features.items():
        s = model.feature_strides[name]
        assert f.shape == (b, model.feature_channels[name], hgt // s, wid // s), name
    assert model.feature_strides["head"] == os_
    assert model.feature_channels["head"] == 16


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_combo_shapes_and_gradients(backbone, head):
    model = build_segmenter(cfg(backbone, head), NUM_CLASSES)
    assert model.num_classes == NUM_CLASSES
    assert model.feature_strides == {"stage1": 4, "stage2": 8, "stage3": 8, "stage4": 8, "head": 8}
    model.train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    _check_output(model, out, x, 8, aux=True)
    (out.logits.mean() + 0.4 * out.aux_logits.mean()).backward()
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None
    assert first_conv.weight.grad.abs().sum() > 0
    # every parameter takes part in the forward (no dead branches)
    dead = [n for n, p in model.named_parameters() if p.grad is None]
    assert not dead, dead


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_output_stride_16_and_no_aux(backbone):
    model = build_segmenter(cfg(backbone, "deeplabv3", output_stride=16, aux=False), NUM_CLASSES).eval()
    assert model.aux_head is None
    assert model.feature_strides == {"stage1": 4, "stage2": 8, "stage3": 16, "stage4": 16, "head": 16}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (1, NUM_CLASSES, 4, 4)
    _check_output(model, out, x, 16, aux=False)


def test_output_stride_32_pspnet():
    model = build_segmenter(cfg("mobilenetv2", "pspnet", output_stride=32), NUM_CLASSES).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (1, NUM_CLASSES, 2, 2)
    _check_output(model, out, x, 32, aux=True)


def test_non_square_input_and_eval_batch_one():
    model = build_segmenter(cfg("resnet18", "pspnet"), NUM_CLASSES).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
    _check_output(model, out, x, 8, aux=True)


def test_bottleneck_dilation_matches_torchvision():
    ours = BACKBONES["resnet50"](8)
    ref = tvm.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        a = [(m.stride, m.dilation, m.padding) for m in getattr(ours, layer).modules() if isinstance(m, nn.Conv2d)]
        b = [(m.stride, m.dilation, m.padding) for m in getattr(ref, layer).modules() if isinstance(m, nn.Conv2d)]
        assert a == b, layer


def test_basicblock_dilation():
    bb = BACKBONES["resnet18"](8)
    l3, l4 = bb.layer3, bb.layer4
    assert (l3[0].conv1.stride, l3[0].conv1.dilation) == ((1, 1), (1, 1))
    assert l3[0].downsample[0].stride == (1, 1)
    assert (l3[0].conv2.dilation, l3[1].conv1.dilation, l3[1].conv2.dilation) == ((2, 2),) * 3
    assert (l4[0].conv1.stride, l4[0].conv1.dilation) == ((1, 1), (2, 2))
    assert (l4[0].conv2.dilation, l4[1].conv1.dilation, l4[1].conv2.dilation) == ((4, 4),) * 3
    assert l4[1].conv2.padding == (4, 4)


def test_mobile_dilation():
    mb = BACKBONES["mobilenetv2"](8)
    dw = [m for m in mb.features.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]
    assert sum(m.stride == (2, 2) for m in dw) == 3  # stem, features[2], features[4]
    eff = BACKBONES["efficientnet_b0"](8)
    dil = {m.dilation for m in eff.features[6].modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1}
    assert dil == {(2, 2), (4, 4)}
    pads = {(m.kernel_size, m.dilation, m.padding) for m in eff.features[6:8].modules() if isinstance(m, nn.Conv2d)}
    for k, d, p in pads:
        assert p[0] == d[0] * (k[0] - 1) // 2


def test_aspp_rates_scale_with_output_stride():
    assert aspp_rates(8) == (12, 24, 36)
    assert aspp_rates(16) == (6, 12, 18)
    head = DeepLabV3Head(32, NUM_CLASSES, 16, 0.1, 16)
    assert head.aspp.rates == (6, 12, 18)


def test_head_feature_is_classifier_input():
    model = build_segmenter(cfg("mobilenetv2", "deeplabv3"), NUM_CLASSES).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
        again = model.head.classifier(out.features["head"])
    torch.testing.assert_close(again, out.logits)


def test_count_parameters_and_aux_toggle():
    with_aux = build_segmenter(cfg("resnet18", "pspnet"), NUM_CLASSES)
    no_aux = build_segmenter(cfg("resnet18", "pspnet", aux=False), NUM_CLASSES)
    n_aux = count_parameters(with_aux.aux_head)
    assert count_parameters(with_aux) == count_parameters(no_aux) + n_aux
    assert n_aux == 256 * 64 * 9 + 2 * 64 + 64 * NUM_CLASSES + NUM_CLASSES
    assert count_parameters(with_aux) == sum(p.numel() for p in with_aux.parameters())


def test_defaults_and_dictconfig():
    omegaconf = pytest.importorskip("omegaconf")
    model = build_segmenter(omegaconf.OmegaConf.create({"backbone": "mobilenetv2", "head": "pspnet"}), 3)
    assert model.feature_channels["head"] == 512
    assert model.aux_head is not None and model.aux_weight == 0.4
    assert model.feature_strides["head"] == 8


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv2", "efficientnet_b0"])
def test_pretrained_round_trip(tmp_path, backbone):
    # a full torchvision-layout checkpoint, classifier (and dropped last conv) included
    tv = {"resnet18": tvm.resnet18, "mobilenetv2": tvm.mobilenet_v2, "efficientnet_b0": tvm.efficientnet_b0}
    ref = tv[backbone](weights=None)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01)
        for name, buf in ref.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(0.5)
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    model = build_segmenter(cfg(backbone, "pspnet", pretrained=str(path)), NUM_CLASSES)
    ref_sd = ref.state_dict()
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, ref_sd[k], msg=k)

    # a backbone state dict saved from one model loads into a fresh one
    path2 = tmp_path / "bb.pth"
    torch.save(model.backbone.state_dict(), path2)
    again = build_segmenter(cfg(backbone, "deeplabv3", pretrained=str(path2)), NUM_CLASSES)
    for (k, a), (k2, b) in zip(model.backbone.state_dict().items(), again.backbone.state_dict().items()):
        assert k == k2
        assert torch.equal(a, b), k


def test_pretrained_without_num_batches_tracked(tmp_path):
    sd = {k: v for k, v in tvm.resnet18(weights=None).state_dict().items() if "num_batches_tracked" not in k}
    path = tmp_path / "old.pth"
    torch.save(sd, path)
    model = build_segmenter(cfg("resnet18", "pspnet", pretrained=str(path)), NUM_CLASSES)
    torch.testing.assert_close(model.backbone.conv1.weight, sd["conv1.weight"])


def test_pretrained_missing_file(tmp_path):
    path = tmp_path / "nope" / "weights.pth"
    with pytest.raises(FileNotFoundError) as err:
        build_segmenter(cfg(pretrained=str(path)), NUM_CLASSES)
    assert str(path) in str(err.value)
    assert "never downloaded" in str(err.value)


def test_pretrained_mismatched_keys(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(tvm.mobilenet_v2(weights=None).state_dict(), path)
    with pytest.raises(ValueError) as err:
        build_segmenter(cfg("resnet18", pretrained=str(path)), NUM_CLASSES)
    msg = str(err.value)
    assert "missing keys" in msg and "conv1.weight" in msg
    assert "unexpected keys" in msg and "features.0.0.weight" in msg


def test_pretrained_mismatched_shapes(tmp_path):
    path = tmp_path / "r34_vs_r50.pth"
    sd = tvm.resnet18(weights=None).state_dict()
    sd["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    torch.save(sd, path)
    with pytest.raises(ValueError, match="shape mismatches: conv1.weight"):
        build_segmenter(cfg("resnet18", pretrained=str(path)), NUM_CLASSES)


def test_unknown_backbone_and_head():
    with pytest.raises(ValueError, match="resnet18") as err:
        build_segmenter(cfg(backbone="vgg16"), NUM_CLASSES)
    assert "vgg16" in str(err.value) and "mobilenetv2" in str(err.value)
    with pytest.raises(ValueError, match="deeplabv3") as err:
        build_segmenter(cfg(head="unet"), NUM_CLASSES)
    assert "unet" in str(err.value) and "pspnet" in str(err.value)
    with pytest.raises(ValueError, match="output_stride"):
        build_segmenter(cfg(output_stride=4), NUM_CLASSES)


@pytest.mark.parametrize("backbone, full_stage4", [("resnet18", 512), ("resnet50", 2048), ("mobilenetv2", 320)])
def test_width_multiplier_narrows_every_stage_and_keeps_output_stride(backbone, full_stage4):
    from harness.models import build_segmenter, count_parameters
    cfg = {"backbone": backbone, "head": "pspnet", "head_channels": 16, "aux": False}
    full = build_segmenter(cfg, 5)
    half = build_segmenter({**cfg, "width": 0.5}, 5).eval()
    assert half.feature_channels["stage4"] == full_stage4 // 2
    assert count_parameters(half) < 0.5 * count_parameters(full)
    with torch.no_grad():
        out = half(torch.zeros(1, 3, 64, 64))
    assert out.logits.shape == (1, 5, 8, 8)
    assert {k: v.shape[1] for k, v in out.features.items()} == half.feature_channels


def test_width_out_of_range_is_an_error():
    from harness.models import build_segmenter
    with pytest.raises(ValueError, match="width"):
        build_segmenter({"backbone": "resnet18", "head": "pspnet", "width": 1.5}, 5)
    with pytest.raises(ValueError, match="width"):
        build_segmenter({"backbone": "efficientnet_b0", "head": "pspnet", "width": 0.5}, 5)


def test_pretrained_from_the_local_hub_cache_and_clear_errors(tmp_path, monkeypatch):
    """pretrained=hub loads torchvision's file from the local torch hub cache (never downloads);
    absent -> a ConfigError naming the file; pretrained=false -> random initialisation."""
    import torchvision

    from harness.config import load_config
    from harness.errors import ConfigError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError, match="resnet18-f37072fd.pth is in the torch hub cache"):
        load_config(["student=pspnet_resnet18", "student.pretrained=hub"])
    assert load_config(["student=pspnet_resnet18", "student.pretrained=false"])["student"]["pretrained"] is None

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(reference, hub / "resnet18-f37072fd.pth")
    cfg = load_config(["student=pspnet_resnet18", "student.pretrained=hub"])
    assert cfg["student"]["pretrained"] == "hub"
    model = build_segmenter(cfg["student"], 5)
    assert torch.equal(model.backbone.state_dict()["layer4.1.conv2.weight"] if "layer4.1.conv2.weight" in
                       model.backbone.state_dict() else next(v for k, v in model.backbone.state_dict().items()
                                                              if k.endswith("layer4.1.conv2.weight")),
                       reference["layer4.1.conv2.weight"])
