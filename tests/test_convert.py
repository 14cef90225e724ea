"""Teacher converters (harness/models/convert.py): checkpoints of torchvision, mmsegmentation and CIRKD
load as teacher.checkpoint=, compute what they computed there, or are refused with a message that names
the keys, the format and the numbers. Random weights only: nothing is downloaded."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50

from harness.cli import main
from harness.config import PROJECT_ROOT, TEACHER_CHECKPOINT_FORMATS, load_config
from harness.errors import ConfigError
from harness.engine.teacher import MODEL_KEYS, TeacherError, load_checkpoint
from harness.models import build_segmenter
from harness.models.convert import FORMATS, convert_state_dict, detect_format

K = 9  # the synthetic dataset's classes


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BN statistic random (BN's defaults would hide a swapped key)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tv_model():
    torch.manual_seed(0)
    model = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=K, aux_loss=True)
    return _randomise(model, 1)


@pytest.fixture(scope="module")
def cfg50():
    """A resolved config whose teacher is deeplabv3_resnet50 (load_checkpoint reads teacher and dataset)."""
    return load_config(["budget=smoke", "teacher=deeplabv3_resnet50", "progress=false"])


@pytest.fixture(scope="module")
def expected50(cfg50):
    return build_segmenter({k: cfg50["teacher"][k] for k in MODEL_KEYS}, K).state_dict()


def _same_function(ours, tv, size=(64, 64)):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = tv(x)
        out = ours.eval()(x)
    for mine, theirs in ((out.logits, want["out"]), (out.aux_logits, want["aux"])):
        mine = F.interpolate(mine, size=size, mode="bilinear", align_corners=False)
        scale = theirs.abs().max().item()
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * max(1.0, scale))


# ------------------------------------------------------------------------------- torchvision
def test_a_torchvision_deeplabv3_resnet50_loads_and_computes_the_same(cfg50, tmp_path, tv_model):
    path = tmp_path / "tv.pth"
    torch.save(tv_model.state_dict(), path)
    _same_function(load_checkpoint(cfg50, path), tv_model)


def test_the_format_can_be_forced_and_is_validated(cfg50, expected50, tv_model):
    state = tv_model.state_dict()
    assert convert_state_dict(state, expected50, "torchvision")[1] == "torchvision"
    with pytest.raises(ValueError, match=r"format cirkd \(given; its keys look like torchvision\)"):
        convert_state_dict(state, expected50, "cirkd")
    with pytest.raises(ConfigError, match="must be one of auto, harness, torchvision, mmseg, cirkd"):
        load_config(["budget=smoke", "teacher.checkpoint_format=detectron"])
    assert TEACHER_CHECKPOINT_FORMATS == FORMATS
    # the default stays out of the resolved config: run hashes from before the field are unchanged
    assert "checkpoint_format" not in cfg50["teacher"]


def test_an_extra_or_missing_key_is_named(cfg50, tmp_path, tv_model):
    state = dict(tv_model.state_dict())
    state["classifier.9.weight"] = torch.zeros(3)
    del state["aux_classifier.4.bias"]
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(TeacherError) as err:
        load_checkpoint(cfg50, path)
    msg = str(err.value)
    assert "format torchvision (detected)" in msg
    assert "classifier.9.weight" in msg and "aux_head.classifier.bias" in msg


def test_wrong_num_classes_names_both_numbers(cfg50, tmp_path):
    torch.manual_seed(0)
    voc = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    path = tmp_path / "voc.pth"
    torch.save(voc.state_dict(), path)
    with pytest.raises(TeacherError, match=r"predicts 21 classes but the model needs 9") as err:
        load_checkpoint(cfg50, path)
    assert "with 9 classes (dataset 'synthetic')" in str(err.value)


def test_a_checkpoint_without_aux_head_says_how_to_match_it(expected50):
    torch.manual_seed(0)
    no_aux = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=K, aux_loss=False).state_dict()
    with pytest.raises(ValueError, match="teacher.aux=false"):
        convert_state_dict(no_aux, expected50)
    without = {k: v for k, v in expected50.items() if not k.startswith("aux_head.")}
    assert convert_state_dict(no_aux, without)[1] == "torchvision"


@pytest.mark.parametrize("keys, why", [
    (["backbone.0.0.weight", "classifier.4.weight"], "MobileNetV3"),
    (["backbone.conv1.weight", "classifier.0.weight", "classifier.4.weight"], "fcn_resnet50/101"),
    (["backbone.0.0.weight", "classifier.cbr.0.weight"], "MobileNetV3"),
])
def test_torchvision_models_the_harness_does_not_build_are_refused(keys, why):
    with pytest.raises(ValueError, match=why):
        convert_state_dict({k: torch.zeros(1) for k in keys}, {}, "auto")


# ------------------------------------------------------------------------------------- CIRKD
# CIRKD's DeepLabV3 (models/deeplabv3.py, segbase.py) as module trees, to take its key names from real
# modules rather than from a list: pretrained = ResNetV1b (torchvision's names), head.aspp.b0..b4,
# head.block, auxlayer.block. Only the names matter here; the forward pass equals torchvision's.
def _cbr(cin, cout, k=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _CirkdASPP(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        self.b0 = _cbr(cin, c)
        self.b1, self.b2, self.b3 = (nn.Module() for _ in range(3))
        for b in (self.b1, self.b2, self.b3):
            b.block = _cbr(cin, c, 3)
        self.b4 = nn.Module()
        self.b4.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_cbr(cin, c))
        self.project = nn.Sequential(*_cbr(5 * c, c), nn.Dropout(0.5))


class _CirkdDeepLabV3(nn.Module):
    def __init__(self, pretrained, c, nclass):
        super().__init__()
        self.pretrained = pretrained
        self.head = nn.Module()
        self.head.aspp = _CirkdASPP(2048, c)
        self.head.block = nn.Sequential(*_cbr(c, c, 3), nn.Dropout(0.1), nn.Conv2d(c, nclass, 1))
        self.auxlayer = nn.Module()
        self.auxlayer.block = nn.Sequential(*_cbr(1024, 256, 3), nn.Dropout(0.1), nn.Conv2d(256, nclass, 1))


def _tv_to_cirkd(key: str) -> str:
    for old, new in (("backbone.", "pretrained."), ("classifier.0.convs.0.", "head.aspp.b0."),
                     ("classifier.0.convs.4.", "head.aspp.b4.gap."), ("classifier.0.project.", "head.aspp.project."),
                     ("classifier.1.", "head.block.0."), ("classifier.2.", "head.block.1."),
                     ("classifier.4.", "head.block.4."), ("aux_classifier.", "auxlayer.block.")):
        if key.startswith(old):
            return new + key[len(old):]
    i = key.split(".")[3]  # classifier.0.convs.{1,2,3}.j.*
    return f"head.aspp.b{i}.block." + ".".join(key.split(".")[4:])


def test_a_cirkd_deeplabv3_on_a_v1b_backbone_loads_and_computes_the_same(cfg50, tmp_path, tv_model):
    state = {_tv_to_cirkd(k): v for k, v in tv_model.state_dict().items()}
    tv_backbone = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=K).backbone
    assert set(state) == set(_CirkdDeepLabV3(tv_backbone, 256, K).state_dict())  # CIRKD's real names
    path = tmp_path / "cirkd.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # saved from DistributedDataParallel
    _same_function(load_checkpoint(cfg50, path), tv_model)


def test_cirkd_layouts_that_differ_are_refused_clearly(cfg50, tmp_path, tv_model):
    state = {_tv_to_cirkd(k): v for k, v in tv_model.state_dict().items()}
    state["pretrained.conv2.weight"] = torch.zeros(64, 64, 3, 3)  # resnet*_v1s deep stem
    path = tmp_path / "v1s.pth"
    torch.save(state, path)
    with pytest.raises(TeacherError, match="format cirkd.*deep stem.*supported CIRKD layout: DeepLabV3 on the "
                                           "resnet.*_original"):
        load_checkpoint(cfg50, path)
    with pytest.raises(ValueError, match="align_corners=True"):
        convert_state_dict({"pretrained.conv1.weight": torch.zeros(1), "head.psp.conv1.0.weight": torch.zeros(1)},
                           {}, "auto")


# -------------------------------------------------------------------------------- mmsegmentation
def _harness_to_mmseg(key: str) -> str:
    parts = key.split(".")
    if key.startswith("head.ppm.stages."):  # stages.i.{1: conv, 2: bn}.* -> psp_modules.i.1.{conv,bn}.*
        return f"decode_head.psp_modules.{parts[3]}.1.{'conv' if parts[4] == '1' else 'bn'}." + ".".join(parts[5:])
    for old, new in (("head.bottleneck.0.", "decode_head.bottleneck.conv."), ("head.bottleneck.1.", "decode_head.bottleneck.bn."),
                     ("head.classifier.", "decode_head.conv_seg."), ("aux_head.block.0.", "auxiliary_head.convs.0.conv."),
                     ("aux_head.block.1.", "auxiliary_head.convs.0.bn."), ("aux_head.classifier.", "auxiliary_head.conv_seg.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key  # backbone.*: mmseg's ResNet (V1b stem) uses torchvision's names


def test_an_mmseg_pspnet_on_a_v1b_resnet_loads_with_the_same_weights(cfg50, tmp_path):
    cfg = copy.deepcopy(cfg50)  # a small PSPNet keeps it fast; the key map does not depend on the depth
    cfg["teacher"].update(name="pspnet_small", backbone="resnet18", head="pspnet", head_channels=16, width=0.5)
    reference = _randomise(build_segmenter({k: cfg["teacher"][k] for k in MODEL_KEYS}, K), 3)
    state = {_harness_to_mmseg(k): v for k, v in reference.state_dict().items()}
    assert detect_format(list(state)) == "mmseg"
    path = tmp_path / "mmseg.pth"
    torch.save({"meta": {"CLASSES": ["c"] * K, "mmseg_version": "0.30.0"}, "state_dict": state}, path)
    loaded = load_checkpoint(cfg, path)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = reference(x), loaded.eval()(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.aux_logits, b.aux_logits, rtol=0, atol=0)


@pytest.mark.parametrize("key, why", [
    ("backbone.stem.0.weight", "ResNetV1c/V1d.*deep stem.*supported mmseg layout: PSPHead"),
    ("decode_head.aspp_modules.0.conv.weight", "ASPPHead.*another network.*supported mmseg decode head: PSPHead"),
])
def test_mmseg_layouts_that_differ_are_refused_clearly(cfg50, tmp_path, key, why):
    state = {"backbone.conv1.weight": torch.zeros(1), "decode_head.conv_seg.weight": torch.zeros(K, 256, 1, 1),
             key: torch.zeros(1)}
    path = tmp_path / "mm.pth"
    torch.save({"meta": {}, "state_dict": state}, path)
    with pytest.raises(TeacherError, match="format mmseg \\(detected\\): .*" + why):
        load_checkpoint(cfg50, path)


def test_a_checkpoint_of_unknown_layout_lists_its_keys():
    with pytest.raises(ValueError, match="none of the known layouts.*encoder.0.weight"):
        convert_state_dict({"encoder.0.weight": torch.zeros(1)}, {}, "auto")


# ------------------------------------------------------------------------------------ end to end
def test_python_m_harness_teacher_with_a_torchvision_checkpoint(tiny, tmp_path, tv_model, capsys):
    path = tmp_path / "tv.pth"
    torch.save(tv_model.state_dict(), path)
    overrides = [o for o in tiny() if not o.startswith("teacher")]
    overrides += ["teacher=deeplabv3_resnet50", f"teacher.checkpoint={path}", "device=cpu"]
    proc = subprocess.run([sys.executable, "-m", "harness", "teacher", *overrides], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"source      checkpoint: {path}" in proc.stdout and "val mIoU" in proc.stdout

    torch.manual_seed(0)
    voc = tmp_path / "voc.pth"
    torch.save(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21).state_dict(), voc)
    bad = [o for o in overrides if not o.startswith("teacher.checkpoint")] + [f"teacher.checkpoint={voc}"]
    assert main(["teacher", *bad]) == 2
    assert "predicts 21 classes but the model needs 9" in capsys.readouterr().err
