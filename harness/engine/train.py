"""One training run: data -> student (+ frozen teacher) -> method terms -> `fit` -> a `RunRecord`.

`run(cfg, teacher=...)` is the single training code path. `python -m harness train` calls it
directly, the sweep calls the same function inside a Ray Tune trial (passing `callback` to receive
each evaluation and to stop the run early), the teacher is trained by it, and `reproduce` re-runs a
stored configuration with it. It sets the run up, hands the loop to `harness.engine.loop.fit` and
returns the record; the caller stores it (`harness.engine.record.store_record`), so a run is never
lost to the database and never written twice.

A distilled run needs its teacher (`harness.engine.teacher.teacher_for(cfg)`); the caller gets it
first, so that training a missing teacher does not disturb this run's random state.

On a GPU: `precision` (bf16 autocast; losses in float32), `channels_last`, `cudnn_benchmark` (only
when `deterministic` is off), pinned memory and `num_workers` DataLoader processes.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from harness.config import arm_of
from harness.data import build_dataset
from harness.energy import EnergyMeter
from harness.engine.evaluate import evaluate, slide_window
from harness.engine.loop import EvalCallback, fit
from harness.engine.record import RunRecord
from harness.methods import MethodContext, build_methods
from harness.models import build_segmenter


@dataclass
class RunResult:
    record: RunRecord
    model: torch.nn.Module
    history: List[Dict[str, object]] = field(default_factory=list)


def run(cfg: dict, *, teacher=None, command: str = "", callback: Optional[EvalCallback] = None,
        run_id: Optional[str] = None, label: Optional[str] = None) -> RunResult:
    """Train and evaluate `cfg`. `teacher`: the `Teacher` of a distilled run (required when `cfg`
    selects a method). `label` names the progress bar (default: the arm)."""
    if cfg["method"] and teacher is None:
        raise ValueError("a distilled run needs its teacher: run(cfg, teacher=teacher_for(cfg))")
    started = time.time()
    run_id = run_id or uuid.uuid4().hex
    device = resolve_device(cfg["device"])
    seed_everything(cfg["seed"], cfg["deterministic"], device)
    torch.set_num_threads(cfg["threads"])
    amp_dtype = autocast_dtype(cfg["precision"], device)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    if device.type == "cuda" and cfg["cudnn_benchmark"] and not cfg["deterministic"]:
        torch.backends.cudnn.benchmark = True
    t_model = teacher.model.to(memory_format=memory_format) if teacher is not None else None
    budget, optim_cfg = cfg["budget"], cfg["optim"]

    # data
    cache_dir = str(Path(cfg["paths"]["cache"]) / "data")
    train_set = build_dataset(cfg["dataset"], cfg["train_split"], cache_dir=cache_dir, augment={
        "crop_size": budget["crop_size"], "scale_range": budget["scale_range"], "flip": budget["flip"]})
    eval_set = build_dataset(cfg["dataset"], cfg["eval_split"], cache_dir=cache_dir)
    batches = infinite_batches(train_set, budget["batch_size"], cfg["seed"], cfg["num_workers"], device)
    eval_loader = DataLoader(eval_set, batch_size=budget["eval_batch_size"], shuffle=False,
                             num_workers=cfg["num_workers"], pin_memory=device.type == "cuda")
    num_classes, ignore = train_set.num_classes, train_set.ignore_index

    # models, methods, optimiser
    student = build_segmenter(cfg["student"], num_classes).to(device, memory_format=memory_format).train()
    methods = build_methods(cfg["method"], MethodContext(
        num_classes=num_classes, ignore_index=ignore,
        student_channels=student.feature_channels, student_strides=student.feature_strides,
        teacher_channels=t_model.feature_channels if t_model is not None else {},
        teacher_strides=t_model.feature_strides if t_model is not None else {},
        generator=torch.Generator().manual_seed(cfg["seed"] + 1)))
    methods = [m.to(device) for m in methods]
    shared = [p for m in methods if m.own_optimizer() is None for p in m.parameters()]
    optimizer = torch.optim.SGD(list(student.parameters()) + shared, lr=optim_cfg["lr"],
                                momentum=optim_cfg["momentum"], weight_decay=optim_cfg["weight_decay"],
                                nesterov=optim_cfg["nesterov"])

    def evaluate_student():
        return evaluate(student, eval_loader, num_classes, ignore, device, budget["max_eval_images"],
                        train_set.class_names, slide=slide_window(cfg["dataset"]))

    # the loop
    with EnergyMeter(cfg["energy"], run_id, str(Path(cfg["paths"]["results"]) / "energy"),
                     gpu_used=device.type == "cuda") as energy:
        with tqdm(total=budget["iterations"], desc=f"{label or arm_of(cfg)}:{cfg['student']['name']}", unit="it",
                  file=sys.stderr, disable=not cfg["progress"], dynamic_ncols=True, mininterval=0.5) as bar:
            done = fit(student, optimizer, batches, iterations=budget["iterations"],
                       eval_every=budget["eval_interval"], evaluate=evaluate_student, lr=optim_cfg["lr"],
                       poly_power=optim_cfg["poly_power"], model_cfg=cfg["student"], ignore_index=ignore,
                       methods=methods, teacher=t_model, grad_clip_norm=optim_cfg["grad_clip_norm"],
                       device=device, amp_dtype=amp_dtype, memory_format=memory_format,
                       callback=callback, bar=bar)

    # the record
    history = done.history
    final = history[-1] if history else None
    best = max(history, key=lambda h: h["miou"] if not math.isnan(h["miou"]) else -1) if history else None
    record = RunRecord.of(
        cfg, run_id, command, status=done.status, failure_reason=done.failure,
        final_miou=final["miou"] if final else None, best_miou=best["miou"] if best else None,
        best_iteration=best["iteration"] if best else None,
        pixel_accuracy=final["pixel_accuracy"] if final else None,
        per_class_iou_json=final["per_class_iou"] if final else None,
        history_json=[{k: h[k] for k in ("iteration", "miou", "loss", "pixel_accuracy")} for h in history],
        iterations=done.iterations, wall_time_s=time.time() - started, train_time_s=done.train_time_s,
        energy_kwh=energy.result.get("energy_kwh"), co2_kg=energy.result.get("co2_kg"),
        carbon_intensity_g_per_kwh=energy.result.get("carbon_intensity_g_per_kwh"),
        energy_json=energy.result,
        extra_json={"teacher": teacher.info if teacher is not None else None, "device": str(device),
                    "last_loss_terms": done.last_terms,
                    "precision": str(amp_dtype or torch.float32).replace("torch.", "")})
    return RunResult(record=record, model=student, history=history)


# ----------------------------------------------------------------------------- the environment
def infinite_batches(dataset, batch_size: int, seed: int, workers: int, device: torch.device) -> Iterator:
    """Reshuffled epochs forever; the order depends only on the seed."""
    if len(dataset) < batch_size:
        raise ValueError(f"the training split has {len(dataset)} images, fewer than batch_size={batch_size}")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
                        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    while True:
        yield from loader


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device; use device=cpu or auto")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a run, or None for plain float32. `auto`: bf16 on a CUDA device that
    supports it, float32 elsewhere (CPU runs stay bit-reproducible)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
