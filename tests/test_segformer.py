"""SegFormer (MiT encoder + all-MLP decoder): shapes on odd sizes, named features, attention and
Mix-FFN against float64 loop references, gradients, determinism, parameter counts, pretrained
loading and its errors, config validation, and end-to-end runs with CNN <-> SegFormer pairs."""
import math

import pytest
import torch
import torch.nn.functional as F

from harness.models import SegFormer, SegOutput, build_segmenter, count_parameters
from harness.engine.teacher import teacher_for
from harness.models.segformer import (
    MIT_SPECS,
    EfficientSelfAttention,
    MixFFN,
    MixTransformer,
    load_pretrained_encoder,
)

torch.set_num_threads(1)
K = 5
NAMES = {"stage1", "stage2", "stage3", "stage4", "head"}


def cfg(backbone="mit_b0", **kw):
    c = {"name": f"segformer_{backbone}", "backbone": backbone, "head": "segformer", "output_stride": 4,
         "head_channels": 16, "width": 0.25, "aux": False, "dropout": 0.1, "pretrained": None}
    c.update(kw)
    return c


def small(seed=0, **kw) -> SegFormer:
    torch.manual_seed(seed)
    return build_segmenter(cfg(**kw), K)


# ------------------------------------------------------------------------------ shapes, features
@pytest.mark.parametrize("backbone", sorted(MIT_SPECS))
@pytest.mark.parametrize("size", [(65, 97), (29, 40), (64, 64)])
def test_shapes_strides_and_named_features_on_odd_sizes(backbone, size):
    model = small(backbone=backbone).eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    assert isinstance(out, SegOutput) and out.aux_logits is None
    assert model.output_stride == 4 and model.num_classes == K
    assert model.feature_strides == {"stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32, "head": 4}
    assert set(out.features) == set(model.feature_channels) == NAMES
    for name, f in out.features.items():
        s = model.feature_strides[name]
        # overlapping patch embeddings (k 7 / s 4, then k 3 / s 2, padding k // 2) give ceil(H / s)
        assert f.shape == (2, model.feature_channels[name], math.ceil(h / s), math.ceil(w / s)), name
    assert out.logits.shape == (2, K, math.ceil(h / 4), math.ceil(w / 4))
    assert model.feature_channels["head"] == 16
    full = MIT_SPECS[backbone].widths
    assert [model.feature_channels[f"stage{i}"] for i in range(1, 5)] == [c // 4 for c in full]


def test_full_width_channels_and_paper_decoder_width():
    torch.manual_seed(0)
    b0 = build_segmenter({"backbone": "mit_b0", "head": "segformer", "aux": False}, K)
    assert [b0.feature_channels[f"stage{i}"] for i in range(1, 5)] == [32, 64, 160, 256]
    assert b0.feature_channels["head"] == 256  # head_channels unset -> the paper's decoder width
    assert [len(getattr(b0.backbone, f"block{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    heads = [getattr(b0.backbone, f"block{i}")[0].attn.heads for i in range(1, 5)]
    sr = [getattr(b0.backbone, f"block{i}")[0].attn.sr_ratio for i in range(1, 5)]
    assert heads == [1, 2, 5, 8] and sr == [8, 4, 2, 1]
    kernels = [getattr(b0.backbone, f"patch_embed{i}").proj.kernel_size for i in range(1, 5)]
    strides = [getattr(b0.backbone, f"patch_embed{i}").proj.stride for i in range(1, 5)]
    assert kernels == [(7, 7), (3, 3), (3, 3), (3, 3)] and strides == [(4, 4), (2, 2), (2, 2), (2, 2)]
    rates = [blk.drop_path.p for i in range(1, 5) for blk in getattr(b0.backbone, f"block{i}")]
    assert rates == pytest.approx([0.1 * j / 7 for j in range(8)])  # linear 0 .. 0.1 over the 8 blocks


def test_too_small_input_is_a_clear_error():
    model = small().eval()
    assert model.backbone.min_input_size == 29  # stage1 map (ceil(H/4)) must cover the 8x8 reduction
    with pytest.raises(ValueError, match="at least 29"):
        model(torch.randn(1, 3, 28, 64))
    model(torch.randn(1, 3, 29, 29))


# --------------------------------------------------------------------- float64 loop references
def reference_attention(m: EfficientSelfAttention, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Efficient self-attention written out: per image, head and query, softmax over the reduced keys."""
    b, n, c = x.shape
    d = c // m.heads
    q = x @ m.q.weight.T + m.q.bias
    src = x
    if m.sr_ratio > 1:
        r = m.sr_ratio
        grid = x.transpose(1, 2).reshape(b, c, h, w)
        hr, wr = h // r, w // r  # the strided conv floors
        red = torch.zeros(b, hr * wr, c, dtype=x.dtype)
        for i in range(hr):
            for j in range(wr):
                patch = grid[:, :, i * r:(i + 1) * r, j * r:(j + 1) * r]  # b x c x r x r
                red[:, i * wr + j] = torch.einsum("bcxy,ocxy->bo", patch, m.sr.weight) + m.sr.bias
        src = F.layer_norm(red, (c,), m.norm.weight, m.norm.bias, m.norm.eps)
    kv = src @ m.kv.weight.T + m.kv.bias
    k, v = kv[..., :c], kv[..., c:]  # the reference's reshape(B, N, 2, heads, d): keys first
    out = torch.zeros(b, n, c, dtype=x.dtype)
    for bi in range(b):
        for hd in range(m.heads):
            sl = slice(hd * d, (hd + 1) * d)
            for i in range(n):
                logits = torch.stack([(q[bi, i, sl] * k[bi, j, sl]).sum() for j in range(k.shape[1])]) / math.sqrt(d)
                p = torch.exp(logits - logits.max())
                p = p / p.sum()
                out[bi, i, sl] = (p[:, None] * v[bi, :, sl]).sum(0)
    return out @ m.proj.weight.T + m.proj.bias


@pytest.mark.parametrize("heads, sr, h, w", [(2, 2, 5, 7), (1, 4, 9, 6), (5, 1, 3, 4)])
def test_efficient_attention_matches_a_loop_reference(heads, sr, h, w):
    torch.manual_seed(1)
    m = EfficientSelfAttention(heads * 3, heads, sr).double()
    for p in m.parameters():  # non-trivial biases and norm affine
        torch.nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, h * w, heads * 3, dtype=torch.float64)
    assert torch.allclose(m(x, h, w), reference_attention(m, x, h, w), rtol=1e-6, atol=1e-10)


def test_mix_ffn_matches_a_loop_reference():
    torch.manual_seed(2)
    c, hid, h, w = 3, 12, 5, 4
    m = MixFFN(c, hid).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    x = torch.randn(2, h * w, c, dtype=torch.float64)
    a = (x @ m.fc1.weight.T + m.fc1.bias).reshape(2, h, w, hid)
    conv = torch.zeros_like(a)
    wt, bias = m.dwconv.dwconv.weight[:, 0], m.dwconv.dwconv.bias  # hid x 3 x 3
    for i in range(h):
        for j in range(w):
            acc = bias.clone().expand(2, hid).clone()
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:  # zero padding
                        acc = acc + a[:, i + di, j + dj] * wt[:, di + 1, dj + 1]
            conv[:, i, j] = acc
    gelu = 0.5 * conv * (1 + torch.erf(conv / math.sqrt(2)))  # exact GELU
    ref = gelu.reshape(2, h * w, hid) @ m.fc2.weight.T + m.fc2.bias
    assert torch.allclose(m(x, h, w), ref, rtol=1e-6, atol=1e-10)


def test_decoder_upsamples_concatenates_c4_to_c1_and_fuses():
    model = small().eval()
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        out = model(x)
        f, head = out.features, model.head
        size = f["stage1"].shape[-2:]
        parts = []
        for i in (4, 3, 2, 1):
            lin = getattr(head, f"linear_c{i}").proj
            m = torch.einsum("bchw,oc->bohw", f[f"stage{i}"], lin.weight) + lin.bias[:, None, None]
            parts.append(F.interpolate(m, size=size, mode="bilinear", align_corners=False))
        fuse = head.linear_fuse
        z = torch.einsum("bchw,oc->bohw", torch.cat(parts, 1), fuse.conv.weight[:, :, 0, 0])
        z = F.relu(F.batch_norm(z, fuse.bn.running_mean, fuse.bn.running_var, fuse.bn.weight, fuse.bn.bias,
                                False, 0.0, fuse.bn.eps))
        assert torch.allclose(out.features["head"], z, atol=1e-5)
        assert torch.allclose(out.logits, head.linear_pred(z), atol=1e-5)


# ------------------------------------------------------------------ gradients and determinism
def test_gradient_reaches_every_parameter():
    model = small(drop_path=0.0).train()  # no branch may be dropped for this check
    out = model(torch.randn(2, 3, 33, 41))
    (out.logits.square().mean() + out.features["head"].mean()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    head = {id(p) for p in model.decoder_parameters()}
    assert head == {id(p) for p in model.head.parameters()} and head.isdisjoint(
        id(p) for p in model.backbone.parameters())


def test_deterministic_with_a_seed_and_drop_path_only_in_training():
    a, b, c = small(seed=3), small(seed=3), small(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    x = torch.randn(4, 3, 40, 40)
    a.train(), b.train()
    torch.manual_seed(7)
    ya = a(x).logits
    torch.manual_seed(7)
    yb = b(x).logits
    assert torch.equal(ya, yb)  # drop path / dropout masks come from the seeded global RNG
    torch.manual_seed(8)
    assert not torch.equal(a(x).logits, ya)  # ... and they are active in training
    a.eval()
    with torch.no_grad():
        assert torch.equal(a(x).logits, a(x).logits)


def test_width_multiplier_keeps_heads_and_scales_head_dims():
    enc = MixTransformer("mit_b1", width=0.5)
    assert enc.channels == {"stage1": 32, "stage2": 64, "stage3": 160, "stage4": 256}
    assert MixTransformer("mit_b0", width=0.1).channels == {"stage1": 4, "stage2": 8, "stage3": 20, "stage4": 32}
    with pytest.raises(ValueError, match="width"):
        MixTransformer("mit_b0", width=1.5)


def test_parameter_counts_match_the_paper():
    """Measured: MiT-B0 encoder 3,319,392 (task's ~3.3M; paper Table 1: 3.4M), MiT-B1 13,151,424
    (paper 13.1M); decoder D = 256 at 19 classes 0.40M (B0) / 0.53M (B1) (paper: B0 total 3.8M at
    150 classes)."""
    b0, b1 = MixTransformer("mit_b0"), MixTransformer("mit_b1")
    assert count_parameters(b0) == 3_319_392 and abs(count_parameters(b0) / 3.3e6 - 1) < 0.01
    assert count_parameters(b1) == 13_151_424 and abs(count_parameters(b1) / 13.1e6 - 1) < 0.01
    ade = build_segmenter({"backbone": "mit_b0", "head": "segformer", "aux": False}, 150)
    assert round(count_parameters(ade) / 1e6, 1) == 3.8  # SegFormer-B0 on ADE20K, paper Table 1


@pytest.mark.parametrize("backbone, gmacs", [("mit_b0", 8.4), ("mit_b1", 15.9)])
def test_multiply_adds_match_the_paper_on_ade20k(backbone, gmacs):
    """Paper Table 1 (ADE20K, 512 x 512, 150 classes; mmcv counts multiply-adds): B0 8.4G, B1 15.9G.
    Built on the meta device (as the sweep planner does), so nothing is allocated."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_segmenter({"backbone": backbone, "head": "segformer", "aux": False}, 150).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 512, 512))
    assert round(counter.get_total_flops() / 2e9, 1) == gmacs


# ------------------------------------------------------------------------------- pretrained
def test_loads_a_local_state_dict_in_the_authors_layout(tmp_path):
    src = MixTransformer("mit_b0", width=0.25)
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in src.state_dict().items()}
    assert "patch_embed1.proj.weight" in state and "block1.0.attn.q.weight" in state and "norm4.weight" in state
    state["head.weight"], state["head.bias"] = torch.randn(1000, 64), torch.randn(1000)  # ImageNet classifier
    path = tmp_path / "mit_b0_quarter.pth"
    torch.save({"state_dict": state}, path)
    torch.manual_seed(0)
    model = build_segmenter(cfg(pretrained=str(path)), K)
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in got)


def test_missing_or_mismatched_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_segmenter(cfg(pretrained=str(tmp_path / "absent.pth")), K)
    b0 = tmp_path / "b0.pth"
    torch.save(MixTransformer("mit_b0", width=0.25).state_dict(), b0)
    with pytest.raises(ValueError, match=r"mit_b1 encoder \(stage widths 16/32/80/128\): shape mismatches: "
                                         r"block1.0.attn.kv.bias: file \(16,\) vs model \(32,\)"):
        build_segmenter(cfg("mit_b1", pretrained=str(b0)), K)
    partial = tmp_path / "partial.pth"
    state = MixTransformer("mit_b0", width=0.25).state_dict()
    state.pop("norm4.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, partial)
    with pytest.raises(ValueError, match="missing keys: norm4.weight.*unexpected keys: extra.weight"):
        load_pretrained_encoder(MixTransformer("mit_b0", width=0.25), partial)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_pretrained_encoder(MixTransformer("mit_b0", width=0.25), junk)


# ------------------------------------------------------------------------- config validation
def test_presets_validate_and_bad_pairs_are_config_errors():
    from harness.config import load_config
    from harness.errors import ConfigError

    c = load_config(["student=segformer_b0_small", "teacher=segformer_b1_small"])
    assert (c["student"]["backbone"], c["teacher"]["backbone"]) == ("mit_b0", "mit_b1")
    for preset in ("segformer_b0", "segformer_b0_small"):
        s = load_config([f"student={preset}"])["student"]
        assert s["head"] == "segformer" and not s["aux"]
    assert load_config(["teacher=segformer_b1"])["teacher"]["head_channels"] == 256
    for bad, match in ((["student=segformer_b0_small", "student.aux=true"], "no auxiliary head"),
                       (["student=segformer_b0_small", "student.head=pspnet"], "goes with head 'segformer'"),
                       (["student.head=segformer"], "needs a Mix Transformer backbone"),
                       (["teacher=segformer_b1_small", "teacher.output_stride=16"], "stride 4"),
                       (["student.backbone=mit_b7"], "mit_b0, mit_b1")):
        with pytest.raises(ConfigError, match=match):
            load_config(bad)


# ---------------------------------------------------------------- methods on heterogeneous pairs
def test_cwd_feature_term_between_a_cnn_teacher_and_a_segformer_student():
    """Different strides (head 4 vs 8) and channels (16 vs 24): the teacher map is resized, the
    student's projected; the gradient reaches every student parameter and the projector."""
    from harness.methods import Batch, MethodContext, Progress
    from harness.methods.cwd import ChannelWiseKD

    student = small(drop_path=0.0).train()
    torch.manual_seed(1)
    teacher = build_segmenter({"backbone": "resnet18", "head": "pspnet", "head_channels": 24, "width": 0.25,
                               "aux": True}, K).eval()
    ctx = MethodContext(K, 255, student.feature_channels, student.feature_strides, teacher.feature_channels,
                        teacher.feature_strides, torch.Generator().manual_seed(0))
    method = ChannelWiseKD({"weight": 3.0, "tau": 4.0, "feature_weight": 50.0}, ctx)
    x = torch.randn(2, 3, 40, 56)
    s_out = student(x)
    with torch.no_grad():
        t_out = teacher(x)
    assert s_out.logits.shape[-2:] != t_out.logits.shape[-2:]
    terms = method.terms(s_out, t_out, Batch(x, None), Progress(0, 1))
    assert set(terms) == {"logits", "feature"} and all(torch.isfinite(v) and v > 0 for v in terms.values())
    sum(method.weights()[k] * v for k, v in terms.items()).backward()
    dead = [n for n, p in [*student.named_parameters(), *method.named_parameters()]
            if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


def _finite_run(cfg):
    from harness.engine.train import run

    record = run(cfg, teacher=teacher_for(cfg)).record
    assert record["status"] == "completed", record["failure_reason"]
    terms = record["extra_json"]["last_loss_terms"]
    assert terms and all(math.isfinite(v) for v in terms.values()), terms
    assert record["final_miou"] is not None and math.isfinite(record["final_miou"])
    return record, terms


def test_segformer_student_alone_end_to_end(tiny):
    from harness.config import load_config

    record, terms = _finite_run(load_config(tiny("student=segformer_b0_small", "threads=1")))
    assert set(terms) == {"ce"}  # no aux head, no aux term
    assert record["student"] == "segformer_b0_small" and record["iterations"] == 4


def test_cnn_teacher_to_segformer_student_with_kd(tiny):
    from harness.config import load_config

    cfg = load_config(tiny("+method=kd", "student=segformer_b0_small", "teacher=deeplabv3_resnet18_small",
                           "teacher.width=0.25", "threads=1"))
    assert cfg["teacher"]["backbone"] == "resnet18" and cfg["student"]["head_channels"] == 16
    record, terms = _finite_run(cfg)
    assert terms["kd.kd"] > 0 and record["teacher"] == "deeplabv3_resnet18_small"


def test_segformer_teacher_to_cnn_student_with_cwd(tiny):
    from harness.config import load_config

    cfg = load_config(tiny("+method=cwd", "method.cwd.feature_weight=50", "teacher=segformer_b1_small",
                           "teacher.width=0.25", "threads=1"))
    assert cfg["student"]["backbone"] == "resnet18" and cfg["teacher"]["head_channels"] == 16
    record, terms = _finite_run(cfg)
    assert terms["cwd.logits"] > 0 and terms["cwd.feature"] > 0
    assert record["extra_json"]["teacher"]["source"] == "trained"  # the SegFormer teacher trained itself
