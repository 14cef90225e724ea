"""The teachers' output entropy for `python -m harness report` (paper 003, Figure 1).

For every distinct teacher of the distilled rerun rows (or the configured one): the share of pixels
per Shannon entropy (nats, 0 .. ln K) of the teacher's softmax(z / tau) for tau in `TEMPERATURES`,
over the logits of the first `ENTROPY_IMAGES` val images upsampled to the image size (every pixel,
like the paper). The teacher comes from the cache only (or `teacher.checkpoint`): a report never
trains one. `measure_entropy` returns plain numbers (`TeacherEntropy`) that
`harness.report.figures.entropy_histograms` draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from harness.report.blocks import STUDENT_ONLY

TEMPERATURES = (1, 2, 4, 8, 16)
ENTROPY_IMAGES = 32
ENTROPY_BINS = 30


@dataclass
class TeacherEntropy:
    teacher: str                        # model name
    dataset: str
    budget: str
    checkpoint: Optional[str]           # teacher.checkpoint, or None for the cache
    key: str                            # teacher cache key
    images: int                         # val images used
    classes: int
    pixels: int                         # pixels per temperature
    temperatures: List[float]
    shares: Dict[float, List[float]]    # tau -> share of pixels per bin
    edges: List[float]                  # bin edges on [0, ln K]


def teacher_configs(cfg: dict, blocks: Sequence[Any]) -> List[dict]:
    """Configs of the distinct teachers of the distilled rerun rows (paths from `cfg`); else cfg's."""
    from harness.engine.teacher import teacher_key

    found: Dict[str, dict] = {}
    for block in blocks:
        for label, arm in block.arms.items():
            if label == STUDENT_ONLY:
                continue
            for r in arm.rows:
                rcfg = {**r["config_json"], "paths": cfg["paths"]}
                found.setdefault(teacher_key(rcfg), rcfg)
    return list(found.values()) or [cfg]


def cached_teacher(tcfg: dict):
    """(model, None) from the teacher cache or teacher.checkpoint, or (None, why) -- never trains."""
    from harness.engine.teacher import load_checkpoint, teacher_dir

    if tcfg["teacher"].get("checkpoint"):
        return load_checkpoint(tcfg, Path(tcfg["teacher"]["checkpoint"])), None
    ckpt = teacher_dir(tcfg) / "teacher.pt"
    if not ckpt.is_file():
        return None, (f"teacher {tcfg['teacher']['name']} (budget {tcfg['budget']['name']}, dataset "
                      f"{tcfg['dataset']['name']}) is not trained yet: no {ckpt}. Train it with "
                      f"`python -m harness teacher teacher={tcfg['teacher']['name']} budget={tcfg['budget']['name']}` "
                      f"(or run a sweep), then rerun the report.")
    return load_checkpoint(tcfg, ckpt), None


def entropy_shares(logits, temperatures: Iterable[float] = TEMPERATURES, bins: int = ENTROPY_BINS):
    """{tau: share of pixels per entropy bin} of softmax(logits / tau) (B x K x H x W), bins on [0, ln K]."""
    import torch

    k = logits.shape[1]
    edges = torch.linspace(0.0, math.log(k), bins + 1, dtype=torch.float64)
    out = {}
    for tau in temperatures:
        logp = torch.log_softmax(logits.double() / tau, dim=1)
        h = (-(logp.exp() * logp).sum(dim=1)).flatten().clamp(0.0, math.log(k))
        counts = torch.histc(h, bins=bins, min=0.0, max=math.log(k))
        out[tau] = (counts / h.numel()).tolist()
    return out, edges.tolist()


def teacher_logits(model, tcfg: dict, images: int = ENTROPY_IMAGES):
    """Logits of the first `images` val images, upsampled to the image size (B x K x H x W)."""
    import torch
    import torch.nn.functional as F

    from harness.data import build_dataset

    ds = build_dataset(tcfg["dataset"], "val", cache_dir=str(Path(tcfg["paths"]["cache"]) / "data"))
    n = min(images, len(ds))
    x = torch.stack([ds[i][0] for i in range(n)])
    chunks = []
    with torch.no_grad():
        for start in range(0, n, 8):
            part = x[start:start + 8]
            z = model(part).logits
            chunks.append(F.interpolate(z, size=part.shape[-2:], mode="bilinear", align_corners=True))
    return torch.cat(chunks), n


def measure_entropy(cfg: dict, blocks: Sequence[Any], temperatures: Sequence[float] = TEMPERATURES,
                    images: int = ENTROPY_IMAGES) -> List[Union[TeacherEntropy, str]]:
    """One `TeacherEntropy` per teacher of `blocks` (see `teacher_configs`), or why it is missing."""
    from harness.engine.teacher import teacher_key

    out: List[Union[TeacherEntropy, str]] = []
    for tcfg in teacher_configs(cfg, blocks):
        if not cfg["report"]["measure"]:
            out.append(f"teacher {tcfg['teacher']['name']} not measured (report.measure=false)")
            continue
        model, why = cached_teacher(tcfg)
        if model is None:
            out.append(why)
            continue
        model.eval()
        logits, n = teacher_logits(model, tcfg, images)
        shares, edges = entropy_shares(logits, temperatures)
        out.append(TeacherEntropy(
            teacher=tcfg["teacher"]["name"], dataset=tcfg["dataset"]["name"], budget=tcfg["budget"]["name"],
            checkpoint=tcfg["teacher"].get("checkpoint"), key=teacher_key(tcfg), images=n,
            classes=int(logits.shape[1]), pixels=int(logits[:, 0].numel()), temperatures=list(temperatures),
            shares=shares, edges=edges))
    return out
