"""Distillation methods: one file each, registered by name (the `+method=NAME` of the CLI).

The registry also answers what a setting of a registered method is (`kind_of`, `path_kind`) and
which settings of the selected methods are temperatures or loss weights (`paths_of_kind`, what the
protocol's `$temperatures` / `$weights` expand to), from each Config's field metadata
(`harness.params`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional

from harness.methods.afdcd import AfDCD
from harness.methods.base import Batch, Method, MethodContext, Progress
from harness.methods.brd import BRD
from harness.methods.cirkd import CIRKD
from harness.methods.cwd import ChannelWiseKD
from harness.methods.dist import DIST
from harness.methods.gskd import GSKD
from harness.methods.heteroakd import HeteroAKD
from harness.methods.ifvd import IFVD
from harness.methods.kd import PixelKD
from harness.params import KINDS, meta_of
from harness.methods.skd import SKD
from harness.errors import ConfigError

# One line per method; keep the list sorted by file name.
_ALL = (
    AfDCD,
    BRD,
    CIRKD,
    ChannelWiseKD,
    DIST,
    GSKD,
    HeteroAKD,
    IFVD,
    PixelKD,
    SKD,
)
METHODS: Dict[str, type] = {m.name: m for m in _ALL}


def build_methods(method_cfg: Dict[str, dict], ctx: MethodContext) -> List[Method]:
    """One module per selected method, in a stable (sorted) order."""
    unknown = sorted(set(method_cfg) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(sorted(METHODS))}")
    return [METHODS[name](method_cfg[name], ctx) for name in sorted(method_cfg)]



def config_of(method: str) -> type:
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'. Valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[method].Config


def kind_of(method: str, key: str) -> str:
    """`temperature`, `weight`, `aux_weight` or `structural` for `method.<method>.<key>`."""
    for f in dataclasses.fields(config_of(method)):
        if f.name == key:
            return meta_of(f).kind
    raise KeyError(f"method '{method}' has no setting '{key}'")


def path_kind(path: str) -> Optional[str]:
    """kind_of for a config path `method.<name>.<key>`; None for a path outside a method."""
    parts = path.split(".")
    if len(parts) != 3 or parts[0] != "method":
        return None
    return kind_of(parts[1], parts[2])


def paths_of_kind(method_section: Mapping[str, Mapping[str, Any]], kind: str) -> Dict[str, float]:
    """{config path: value} of the selected methods' settings of one kind (`temperature`, `weight`,
    ...), methods in sorted order, fields in declaration order. A temperature whose gate weights are
    all 0 (its term off) is left out."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got '{kind}' (the protocol maps its placeholders)")
    out: Dict[str, float] = {}
    for method, values in sorted((method_section or {}).items()):
        for f in dataclasses.fields(config_of(method)):
            m = meta_of(f)
            if m.kind != kind or f.name not in values:
                continue
            if m.gate and all(float(values.get(g, 0) or 0) == 0 for g in m.gate):
                continue
            out[f"method.{method}.{f.name}"] = float(values[f.name])
    return out


__all__ = ["Batch", "Method", "MethodContext", "Progress", "METHODS", "build_methods", "config_of", "kind_of",
           "path_kind", "paths_of_kind"]
