"""SegFormer: a Mix Transformer (MiT) encoder with the all-MLP decoder, as a :class:`Segmenter`.

Xie, Wang, Yu, Anandkumar, Alvarez, Luo, "SegFormer: Simple and Efficient Design for Semantic
Segmentation with Transformers", NeurIPS 2021. Written in plain PyTorch after the paper and the
authors' code (NVlabs/SegFormer: ``mmseg/models/backbones/mix_transformer.py``,
``mmseg/models/decode_heads/segformer_head.py``), so a heterogeneous pair (a CNN teacher and a
transformer student, or the reverse) can be distilled with the same methods and features.

Encoder (MiT), four stages i = 1..4, each ``patch_embed{i} -> block{i} (depth_i blocks) -> norm{i}``:

* overlapping patch embedding: conv k x k / stride s, padding k // 2, then LayerNorm;
  (k, s) = (7, 4) for stage1, (3, 2) for stages 2-4, so the strides are 4/8/16/32 and a map is
  ceil(H / stride) x ceil(W / stride) for any input size (65 x 97 -> 17x25, 9x13, 5x7, 3x4);
* block:  x = x + DropPath(Attn(LN(x)));  x = x + DropPath(MixFFN(LN(x)))   (pre-norm);
* efficient self-attention: queries from every token, keys / values from the map reduced by a
  conv with kernel = stride = R_i (sequence reduction 8/4/2/1) and a LayerNorm;
  softmax(q k^T / sqrt(d_head)) v over ``heads_i`` heads, then a linear projection;
* Mix-FFN: Linear(C -> 4C) -> depthwise 3x3 conv (the positional information, no position
  embedding) -> GELU -> Linear(4C -> C);
* after each stage a LayerNorm; its output (B x C_i x h_i x w_i) is the feature ``stage{i}``.

  ==========  ===================  ========  =========  ========
  arch        widths C_1..C_4      depths    heads      decoder
  ==========  ===================  ========  =========  ========
  ``mit_b0``  32 / 64 / 160 / 256  2/2/2/2   1/2/5/8    256
  ``mit_b1``  64 / 128 / 320 / 512 2/2/2/2   1/2/5/8    256
  ==========  ===================  ========  =========  ========

Decoder (all-MLP): per stage a Linear C_i -> D (``linear_c{i}``), the stage2-4 maps upsampled
bilinearly (align_corners=False) to the stage1 size (stride 4), concatenated in the order
c4, c3, c2, c1, fused by a 1x1 conv (no bias) + BatchNorm + ReLU (``linear_fuse``), Dropout2d,
and a 1x1 classifier conv (``linear_pred``). The fused map after the dropout is the feature
``head`` (D channels, stride 4), as the CNN heads give theirs after their dropout.

Interface (the same as :class:`~harness.models.segmenter.Segmenter`, which :class:`SegFormer`
subclasses): ``logits`` at the decoder's native resolution (stride 4, NOT upsampled),
``aux_logits`` None (SegFormer has no auxiliary head), features ``stage1..stage4`` (strides
4/8/16/32) and ``head``; ``feature_channels``, ``feature_strides``, ``output_stride`` (4),
``num_classes``, ``aux_weight``, ``name``, ``decoder_parameters()`` (the decoder's parameters).

Parameter counts (ours, asserted by the tests): MiT-B0 encoder 3,319,392 (paper Table 1: 3.4M),
MiT-B1 encoder 13,151,424 (paper: 13.1M); the decoder at D = 256 adds 0.40M (B0) / 0.53M (B1) at
19 classes; SegFormer-B0 with 150 classes has 3.75M (paper: 3.8M).

Choices (where paper and code leave room, or the harness differs):

* Config keys: ``backbone: mit_b0 | mit_b1`` with ``head: segformer`` (the pair is required).
  ``head_channels`` is the decoder width D (the paper's "C" / the code's ``embed_dim``; it is the
  channel count of the ``head`` feature, which is what ``head_channels`` means for every head), so
  no new config key is needed. ``dropout`` is the decoder's Dropout2d rate (0.1 in the reference).
  ``width`` scales every stage's width by keeping the head count and scaling the per-head dim
  (32 for B0, 64 for B1) to max(4, round(d_head * width)); a CPU preset, no ImageNet weights.
  ``output_stride`` is fixed by the architecture (logits at 4): the presets say 4; 8 (the schema's
  default, for a config that omits the key) is accepted too, anything else is an error.
  ``aux`` must be false.
* Drop path (stochastic depth) 0.1, linearly increasing from 0 over the 8 blocks, as the
  reference; ``drop_path`` in a plain-dict model config overrides it (the yaml schema does not
  carry it). Dropout inside attention / FFN is 0 in every SegFormer config and is not built.
  DropPath draws its per-sample masks from the global torch RNG (as timm), which the train loop
  seeds, so a run replays.
* Initialisation as the reference: Linear trunc-normal(0.02) with zero bias, LayerNorm 1 / 0,
  encoder convs normal(0, sqrt(2 / fan_out)); the decoder keeps PyTorch's default Linear /
  classifier init (as the reference), its fuse conv is kaiming-normal (fan_out, ReLU) as mmcv's
  ConvModule, BatchNorm 1 / 0.
* Attention is computed by ``F.scaled_dot_product_attention`` (the same math, scale
  d_head^-1/2; memory-efficient kernels on GPU). Keys / values come from a map reduced by the
  stride-R conv, which floors: a map smaller than R (inputs under ``min_input_size`` = 29 px)
  cannot be reduced, and the forward raises a ValueError naming the minimum (the reference
  crashes inside the conv).
* ``pretrained``: a LOCAL state dict of the encoder in the authors' ImageNet layout
  (``mit_b0.pth``: keys ``patch_embed1.proj.weight``, ``block1.0.attn.q.weight``, ...; the
  module names here are the reference's, so it loads without renaming), optionally wrapped in
  ``{"state_dict": ...}`` or ``{"model": ...}``; its ``head.*`` classifier keys are ignored; every
  other key must match in name and shape. Never downloaded.
* Optimiser: the paper trains with AdamW (lr 6e-5, decoder lr x10); the harness has SGD only
  (``decoder_parameters()`` is there for a 10x decoder rate). The teacher presets' SGD lr 0.01 was
  the best of 0.002 / 0.01 / 0.05 for ``segformer_b0_small`` on the synthetic data (yaml comments).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import STAGES
from .segmenter import Segmenter, SegOutput


@dataclass(frozen=True)
class MiTSpec:
    """One member of the MiT family (the paper's Table 6 / the reference's ``mit_b*`` classes)."""

    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    decoder_dim: int = 256  # the paper's decoder width C for this encoder


MIT_SPECS: dict[str, MiTSpec] = {
    "mit_b0": MiTSpec(widths=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "mit_b1": MiTSpec(widths=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
}
PATCH_KERNELS, PATCH_STRIDES = (7, 3, 3, 3), (4, 2, 2, 2)
DEFAULT_DROP_PATH = 0.1
HEAD_NAME = "segformer"


def _init_encoder_module(m: nn.Module) -> None:
    """The reference's ``_init_weights`` (applied to every encoder module)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p`` and
    scale the kept ones by 1 / (1 - p); the identity in eval mode or at p = 0."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class OverlapPatchEmbed(nn.Module):
    """Conv k x k / stride s (padding k // 2) -> tokens B x (h w) x C -> LayerNorm."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head attention whose keys / values come from the map reduced R x R by a strided conv
    (+ LayerNorm); R = 1 is plain multi-head self-attention."""

    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.sr_ratio = heads, sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(x).reshape(b, n, self.heads, d).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.sr(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        k, v = self.kv(x).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    """Linear C -> hidden, depthwise 3x3 conv on the h x w map, GELU, Linear hidden -> C."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class DWConv(nn.Module):
    """Depthwise 3x3 conv applied to tokens laid out as their h x w map (the reference's name)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN x)), then x + DropPath(MixFFN(LN x))."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


def stage_widths(spec: MiTSpec, width: float = 1.0) -> tuple[int, ...]:
    """Stage widths at channel multiplier ``width``: heads kept, per-head dim scaled (>= 4)."""
    if not 0 < width <= 1:
        raise ValueError(f"width must be in (0, 1], got {width!r}")
    return tuple(h * max(4, round(c // h * width)) for c, h in zip(spec.widths, spec.heads))


class MixTransformer(nn.Module):
    """The hierarchical MiT encoder; ``forward(x)`` returns ``stage1..stage4`` by name.

    Attributes like the CNN backbones: ``channels``, ``strides`` (4/8/16/32), ``output_stride``
    (32), ``ignored_pretrained_prefixes`` (the ImageNet classifier ``head.``), and
    ``min_input_size`` (the smallest H, W whose stage maps are at least as large as the
    sequence-reduction kernels). Module names follow the reference (``patch_embed1``,
    ``block1``, ``norm1``, ...) so the authors' ImageNet state dicts load unchanged.
    """

    def __init__(self, arch: str = "mit_b0", width: float = 1.0, drop_path: float = DEFAULT_DROP_PATH):
        super().__init__()
        if arch not in MIT_SPECS:
            raise ValueError(f"unknown MiT encoder {arch!r}; valid choices: {sorted(MIT_SPECS)}")
        if not 0 <= drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
        spec = MIT_SPECS[arch]
        self.arch, self.spec = arch, spec
        widths = stage_widths(spec, width)
        n = sum(spec.depths)  # the reference's decay rule, linspace(0, drop_path, n) (plain floats: meta-safe)
        rates = [drop_path * j / (n - 1) for j in range(n)]
        cin, first = 3, 0
        for i in range(4):
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(cin, widths[i], PATCH_KERNELS[i], PATCH_STRIDES[i]))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(widths[i], spec.heads[i], spec.sr_ratios[i], spec.mlp_ratio, rates[first + j])
                for j in range(spec.depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(widths[i], eps=1e-6))
            cin, first = widths[i], first + spec.depths[i]
        self.channels = dict(zip(STAGES, widths))
        self.strides = dict(zip(STAGES, (4, 8, 16, 32)))
        self.output_stride = 32
        self.ignored_pretrained_prefixes = ("head.",)
        self.min_input_size = _min_input_size(spec.sr_ratios)
        self.apply(_init_encoder_module)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"{self.arch} needs inputs of at least {self.min_input_size} x "
                             f"{self.min_input_size} pixels (its stage maps must cover the sequence-"
                             f"reduction kernels {self.spec.sr_ratios}), got {tuple(x.shape[-2:])}")
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, name in enumerate(STAGES, start=1):
            tokens, h, w = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                tokens = block(tokens, h, w)
            tokens = getattr(self, f"norm{i}")(tokens)
            out[name] = x = tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return out


def _min_input_size(sr_ratios: tuple[int, ...]) -> int:
    """Smallest n with ceil-chain(n) >= R_i at every stage (maps: ceil(n/4), then ceil(./2) ...)."""
    n = 1
    while True:
        size, ok = n, True
        for kernel, stride, r in zip(PATCH_KERNELS, PATCH_STRIDES, sr_ratios):
            size = (size + 2 * (kernel // 2) - kernel) // stride + 1
            ok = ok and size >= r
        if ok:
            return n
        n += 1


class MLP(nn.Module):
    """The decoder's per-stage "linear embedding": a Linear over channels (the reference's name)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)


class ConvBNReLU(nn.Module):
    """1x1 conv (no bias) + BatchNorm + ReLU; attribute names as mmcv's ConvModule."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """The all-MLP decoder. ``forward(features)`` takes the encoder's ``stage1..stage4`` dict and
    returns ``(feature, logits)`` at the stage1 resolution, like the CNN heads; ``out_channels`` = D."""

    def __init__(self, in_channels: Mapping[str, int], num_classes: int, decoder_dim: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        for i, name in enumerate(STAGES, start=1):
            setattr(self, f"linear_c{i}", MLP(in_channels[name], decoder_dim))
        self.linear_fuse = ConvBNReLU(4 * decoder_dim, decoder_dim)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.linear_pred = nn.Conv2d(decoder_dim, num_classes, 1)
        self.out_channels = decoder_dim

    def forward(self, feats: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        size = feats["stage1"].shape[-2:]
        maps = []
        for i in (4, 3, 2, 1):  # the reference's concatenation order
            m = getattr(self, f"linear_c{i}")(feats[f"stage{i}"])
            maps.append(m if i == 1 else F.interpolate(m, size=size, mode="bilinear", align_corners=False))
        feat = self.dropout(self.linear_fuse(torch.cat(maps, dim=1)))
        return feat, self.linear_pred(feat)


class SegFormer(Segmenter):
    """MiT encoder (``backbone``) + all-MLP decoder (``head``); no auxiliary head.

    Same attributes and output as :class:`Segmenter`; ``feature_strides["head"]`` and
    ``output_stride`` are 4 (the decoder predicts at the stage1 resolution)."""

    def __init__(self, encoder: MixTransformer, decoder: SegFormerHead, num_classes: int,
                 aux_weight: float = 0.4, name: str = ""):
        super().__init__(encoder, decoder, num_classes, aux=False, aux_weight=aux_weight, name=name)
        self.feature_strides["head"] = encoder.strides["stage1"]
        self.output_stride = self.feature_strides["head"]

    def forward(self, x: torch.Tensor) -> SegOutput:
        feats = self.backbone(x)
        head_feat, logits = self.head(feats)
        features = {name: feats[name] for name in STAGES}
        features["head"] = head_feat
        return SegOutput(logits=logits, aux_logits=None, features=features)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def is_segformer_config(cfg: Any) -> bool:
    """Whether a model config names a MiT encoder or the SegFormer head."""
    return _get(cfg, "backbone") in MIT_SPECS or _get(cfg, "head") == HEAD_NAME


def check_segformer_config(cfg: Any) -> None:
    """Raise ValueError for a config no SegFormer can be built from (pairing, stride, aux)."""
    backbone, head = _get(cfg, "backbone"), _get(cfg, "head")
    if backbone not in MIT_SPECS:
        raise ValueError(f"head 'segformer' needs a Mix Transformer backbone ({', '.join(sorted(MIT_SPECS))}), "
                         f"got backbone {backbone!r}")
    if head != HEAD_NAME:
        raise ValueError(f"backbone {backbone!r} is a Mix Transformer and goes with head 'segformer' "
                         f"(its all-MLP decoder), got head {head!r}")
    output_stride = _get(cfg, "output_stride")
    if output_stride not in (None, 4, 8):  # 8: the schema default of a config that omits it
        raise ValueError(f"SegFormer predicts at stride 4 (its encoder cannot be dilated); set "
                         f"output_stride: 4, got {output_stride!r}")
    if _get(cfg, "aux", False):
        raise ValueError("SegFormer has no auxiliary head; set aux: false")
    if int(_get(cfg, "head_channels", 1)) < 1:
        raise ValueError(f"head_channels (the decoder width) must be >= 1, got {_get(cfg, 'head_channels')!r}")


def build_segformer(cfg: Any, num_classes: int) -> SegFormer:
    """A :class:`SegFormer` from a model config (keys as in the module docstring)."""
    check_segformer_config(cfg)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    arch = _get(cfg, "backbone")
    encoder = MixTransformer(arch, width=float(_get(cfg, "width", 1.0)),
                             drop_path=float(_get(cfg, "drop_path", DEFAULT_DROP_PATH)))
    pretrained = _get(cfg, "pretrained")
    if pretrained in ("hub", "imagenet"):
        raise FileNotFoundError(f"pretrained={pretrained}: torchvision has no {arch} weights; give the path of "
                                f"the authors' ImageNet file (e.g. {arch}.pth) or set pretrained to null")
    if pretrained:
        load_pretrained_encoder(encoder, pretrained)
    decoder = SegFormerHead(encoder.channels, int(num_classes),
                            int(_get(cfg, "head_channels", MIT_SPECS[arch].decoder_dim)),
                            float(_get(cfg, "dropout", 0.1)))
    return SegFormer(encoder, decoder, int(num_classes), aux_weight=float(_get(cfg, "aux_weight", 0.4)),
                     name=str(_get(cfg, "name", f"segformer_{arch}")))


def _first(keys, n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_pretrained_encoder(encoder: MixTransformer, path: str | Path) -> None:
    """Load a LOCAL MiT state dict (the authors' ImageNet layout) into ``encoder``, strictly.

    Raises ``FileNotFoundError`` when the file does not exist and ``ValueError`` when it is not a
    state dict or its keys / shapes do not match (missing, unexpected and mismatched keys named).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"pretrained MiT encoder weights not found: {str(p)!r}. Weights are never downloaded; "
            f"place a state dict of the {encoder.arch} encoder in the authors' layout (keys "
            "patch_embed1.proj.weight, block1.0.attn.q.weight, ...) at that path, or set pretrained to null.")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise ValueError(f"{str(p)!r} cannot be read as a torch state dict ({type(e).__name__})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(p)!r} does not hold a state dict (a dict of tensors)")
    state = {k: v for k, v in state.items() if not k.startswith(encoder.ignored_pretrained_prefixes)}
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        parts = ([f"missing keys: {_first(missing)}"] if missing else []) \
            + ([f"unexpected keys: {_first(unexpected)}"] if unexpected else []) \
            + ([f"shape mismatches: {_first(mismatched, 3)}"] if mismatched else [])
        widths = "/".join(str(c) for c in encoder.channels.values())
        raise ValueError(f"pretrained weights {str(p)!r} do not match the {encoder.arch} encoder "
                         f"(stage widths {widths}): " + "; ".join(parts))
    encoder.load_state_dict(state)
