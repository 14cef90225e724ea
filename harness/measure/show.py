"""`python -m harness show [dataset=...] [student=...] [teacher=...] [+method=...]`: the qualitative grid.

Writes ``reports/show_<block>_<method>.png``: one line per val image (the first `N_IMAGES`), columns
input, ground truth, teacher, tuned student-only arm, distilled arm, every label map coloured with
the dataset's palette (`dataset.palette`; ignore pixels black) and a legend of the classes, like the
papers' qualitative figures. The filters select rows by name as in `leaderboard`; without
`+method=` the distilled arm with the best mean val mIoU of the block is shown.

**Where the students' weights come from.** Every run saves its final student
(`<paths.results>/checkpoints/<run_id>/final.pt`, `checkpoint.final`); `show` loads the one of each
arm's first (lowest) seed rerun row, found by its run id. Only when that file is missing (a database
from before, `checkpoint.final=false`, another results folder) -- it says so -- or with
`show.retrain=true` does it retrain the row's configuration through `harness.reproduce` (the stored
config, `harness.engine.train.run`): deterministic, so on the recording device the retrained student
*is* the one behind the stored number, which the figure checks and states ("identical to the stored
run: yes/no"). Retrained weights are cached in ``<paths.cache>/show/`` (keyed by config hash and
seed), so a second `show` costs only the forward passes. The teacher comes from the teacher cache (the
distilled run just used it) or `teacher.checkpoint`.

A missing arm or teacher gives a panel saying why instead of predictions, never a crash.

This module runs the models (training through `reproduce`, predictions) and returns a `Grid` of
plain label-map images and texts; `harness.report.figures.qualitative_grid` draws it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness.report.blocks import MISSING, STUDENT_ONLY, Arm, Block, load_blocks
from harness.report.filters import Filters

N_IMAGES = 4
IGNORE_COLOUR = (0, 0, 0)


@dataclass
class Grid:
    """What the qualitative figure shows: images (H x W x 3 uint8 arrays) and texts, no model."""
    name: str                                     # file name, show_<block>_<method>.png
    title: str                                    # the figure's title
    panels: List[List[Tuple[str, Any]]]           # per val image: (column title, image, or why it is missing)
    legend: List[Tuple[str, Tuple[int, int, int]]]  # (class name, colour), `ignore` last
    rows: List[Dict[str, Any]] = field(default_factory=list)   # the database rows behind the students
    notes: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- models
def first_seed_row(arm: Arm) -> Dict[str, Any]:
    return min(arm.rows, key=lambda r: (r["seed"] if r["seed"] is not None else 1 << 30, r["created_at"] or ""))


def trained_student(row: Dict[str, Any], cfg: dict) -> Tuple[Any, Dict[str, Any]]:
    """(student model, info) for a rerun row: its run's saved final.pt, else cached or retrained weights."""
    import torch

    from harness.engine.checkpoint import CheckpointError, final_path
    from harness.engine.teacher import MODEL_KEYS
    from harness.engine.train import saved_student
    from harness.models import build_segmenter
    from harness.reproduce import reproduce

    if not (cfg.get("show") or {}).get("retrain"):
        try:
            model = saved_student(row["config_json"], row["run_id"], current=cfg)
        except CheckpointError as e:
            print(f"[show] {e}; retraining instead", flush=True)
            model = None
        if model is not None:
            return model, {"run_id": row["run_id"], "seed": row["seed"], "stored_miou": row["final_miou"],
                           "retrained_miou": None, "identical": True, "saved": True}
        print(f"[show] run {row['run_id']} saved no final student ({final_path(cfg, row['run_id'])} is missing)",
              flush=True)
    folder = Path(cfg["paths"]["cache"]) / "show"
    stem = folder / f"{row['config_hash']}-seed{row['seed']}"
    weights, meta = stem.with_suffix(".pt"), stem.with_suffix(".json")
    rcfg = row["config_json"]
    if weights.is_file() and meta.is_file() and not (cfg.get("show") or {}).get("retrain"):
        model = build_segmenter({k: rcfg["student"][k] for k in MODEL_KEYS}, rcfg["dataset"]["num_classes"])
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval(), json.loads(meta.read_text())
    print(f"[show] retraining {row['arm']} {row['methods'] or ''} seed {row['seed']} (run {row['run_id']}) "
          f"for its weights; cached in {folder}", flush=True)
    result = reproduce(row, cfg, command="python -m harness show")
    info = {"run_id": row["run_id"], "seed": row["seed"], "stored_miou": row["final_miou"],
            "retrained_miou": result["new"]["final_miou"], "identical": all(result["same"].values()),
            "device": result["config"]["device"]}
    folder.mkdir(parents=True, exist_ok=True)
    model = result["model"].cpu().eval()
    torch.save(model.state_dict(), weights)
    meta.write_text(json.dumps(info, indent=2))
    return model, info


# -------------------------------------------------------------------------------------- grid
def colourise(labels, palette: Sequence[Sequence[int]], ignore_index: int):
    """H x W class ids -> H x W x 3 uint8; ignore (and out-of-range) pixels IGNORE_COLOUR."""
    import numpy as np

    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = IGNORE_COLOUR
    for k, rgb in enumerate(palette[:256]):
        lut[k] = rgb
    ids = np.asarray(labels, dtype=np.int64)
    out = lut[np.clip(ids, 0, 255)]
    out[(ids == ignore_index) | (ids < 0) | (ids >= len(palette))] = IGNORE_COLOUR
    return out


def palette_of(ds, num_classes: int) -> List[Tuple[int, int, int]]:
    palette = list(getattr(ds, "palette", None) or [])
    if len(palette) >= num_classes:
        return [tuple(int(c) for c in rgb) for rgb in palette]
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [tuple(int(255 * c) for c in cmap(k % 20)[:3]) for k in range(num_classes)]


def choose(blocks: Sequence[Block], filters: Filters) -> Tuple[Optional[Block], Optional[Arm], List[str]]:
    """The block and distilled arm to show, plus notes (several blocks, arm chosen by mean)."""
    notes: List[str] = []
    if not blocks:
        return None, None, notes
    # the first block that shows a distilled arm (a +method= filter hides the others' arms)
    candidates = [b for b in blocks if any(l != STUDENT_ONLY and a.n for l, a in b.arms.items())] or list(blocks)
    block = candidates[0]
    if len(candidates) > 1:
        notes.append(f"{len(candidates)} blocks match; showing '{block.title}' (narrow it with dataset= student= "
                     f"teacher= budget= +method=)")
    distilled = [a for label, a in block.arms.items() if label != STUDENT_ONLY and a.n]
    if not distilled:
        return block, None, notes
    if filters.methods:
        return block, distilled[0], notes
    best = max(distilled, key=lambda a: a.mean)
    if len(distilled) > 1:
        notes.append(f"distilled arm with the best mean val mIoU: {best.label} (choose one with +method=NAME)")
    return block, best, notes


def predict_grid(cfg: dict, store, filters: Filters = Filters(), images: int = N_IMAGES) -> Grid:
    """Retrain (or load) the students, predict the first `images` val images; returns the grid."""
    import torch

    from harness.data import build_dataset
    from harness.engine.evaluate import predict
    from harness.measure.entropy import cached_teacher
    from harness.report.figures import block_slug, slug

    selection = filters.selection()
    block, dist_arm, notes = choose(load_blocks(store, **selection), filters)
    if block is None:
        notes.append(f"no completed rerun rows{' matching ' + str(selection) if selection else ''} in {store.url}: "
                     f"only the input and ground truth can be shown (run python -m harness sweep +method=NAME)")
    base = block.baseline if block else None
    any_row = next(iter(block.rows), None) if block else None
    if block is not None:
        from harness.reproduce import load_run_plugins

        for row in block.rows:
            load_run_plugins(row)  # the shown runs' plug-in dataset or methods, before anything is rebuilt
    rcfg = {**(any_row["config_json"] if any_row else cfg), "paths": cfg["paths"]}
    ds = build_dataset(rcfg["dataset"], "val", cache_dir=str(Path(cfg["paths"]["cache"]) / "data"))
    k, ignore = ds.num_classes, ds.ignore_index
    palette = palette_of(ds, k)

    used_rows: List[Dict[str, Any]] = []
    # the distilled arm first: retraining it puts the teacher in the cache
    dist_col, base_col = None, None
    if dist_arm is not None:
        row = first_seed_row(dist_arm)
        model, info = trained_student(row, cfg)
        used_rows += dist_arm.rows
        dist_col = (_title(f"distilled ({dist_arm.label})", dist_arm, info), model)
    else:
        dist_col = ("distilled", "no distilled rerun rows for this block" if block else "no runs")
    if base is not None:
        row = first_seed_row(base)
        model, info = trained_student(row, cfg)
        used_rows += base.rows
        base_col = (_title("student-only (tuned)", base, info), model)
    else:
        base_col = ("student-only (tuned)", "no student-only rerun rows for this block" if block else "no runs")
    tcfg = {**(first_seed_row(dist_arm)["config_json"] if dist_arm else rcfg), "paths": cfg["paths"]}
    teacher, why = cached_teacher(tcfg)
    t_title = f"teacher {tcfg['teacher']['name']}"
    if teacher is not None:
        meta = next(((r.get("extra_json") or {}).get("teacher") for r in (dist_arm.rows if dist_arm else [])), None)
        if meta and meta.get("val_miou") is not None:
            t_title += f"\nval mIoU {100 * meta['val_miou']:.2f}\n(re-measured, whole val split)"
    teacher_col = (t_title, teacher if teacher is not None else why)
    columns: List[Tuple[str, Any]] = [teacher_col, base_col, dist_col]  # (title, model or why not)

    n = min(images, len(ds))
    mean = torch.as_tensor(rcfg["dataset"]["mean"]).view(3, 1, 1)
    std = torch.as_tensor(rcfg["dataset"]["std"]).view(3, 1, 1)
    panels: List[List[Tuple[str, Any]]] = []
    for i in range(n):
        image, mask = ds[i]
        shown = (image * std + mean).clamp(0, 255).byte().permute(1, 2, 0).numpy()
        line = [("input", shown), ("ground truth", colourise(mask.numpy(), palette, ignore))]
        for title, model in columns:
            if isinstance(model, str) or model is None:
                line.append((title, model or MISSING))
            else:
                model.eval()
                pred = predict(model, image.unsqueeze(0).to(next(model.parameters()).device))[0].cpu().numpy()
                line.append((title, colourise(pred, palette, ignore)))
        panels.append(line)
    names = list(getattr(ds, "class_names", [str(c) for c in range(k)]))
    legend = [(names[c], tuple(palette[c])) for c in range(k)] + [("ignore", IGNORE_COLOUR)]
    head = f"{block.title}" if block else f"{rcfg['dataset']['name']} (no runs)"
    label = dist_arm.label if dist_arm else "none"
    name = f"show_{block_slug(block) if block else slug(rcfg['dataset']['name'])}_{slug(label)}.png"
    return Grid(name, f"Qualitative results, first {n} val images -- {head}", panels, legend, used_rows, notes)


def _title(name: str, arm: Arm, info: Dict[str, Any]) -> str:
    def pct(v: Optional[float]) -> str:
        return MISSING if v is None else f"{100 * v:.2f}"

    if info.get("saved"):
        return f"{name}\nseed {info['seed']}: val mIoU {pct(info['stored_miou'])}\n(the run's saved weights)"
    same = "yes" if info.get("identical") else "no"
    return (f"{name}\nseed {info['seed']}: val mIoU {pct(info['retrained_miou'])}\n"
            f"(stored {pct(info['stored_miou'])}, identical: {same})")
