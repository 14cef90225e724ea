"""Distillation methods: one file each, registered by name (the `+method=NAME` of the CLI)."""
from __future__ import annotations

from typing import Dict, List

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
from harness.methods.skd import SKD

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


__all__ = ["Batch", "Method", "MethodContext", "Progress", "METHODS", "build_methods"]
