"""One training run: data -> student (+ frozen teacher) -> method terms -> SGD -> evaluation.

`run(cfg)` is the single training code path. `python -m harness train` calls it directly; the
sweep calls the same function inside a Ray Tune trial, passing `callback` to receive each
evaluation (and to stop the run early). The loop:

    for k in 0 .. iterations-1:
        lr_k = lr * (1 - k / iterations) ** poly_power              (set before the step)
        loss = CE(up(logits), y) + aux_weight * CE(up(aux), y)       (task, CIRKD protocol)
             + sum over methods, terms: weight * term(student, teacher, batch, progress)
        SGD step (momentum, weight decay); methods with their own optimiser step after it
        every eval_interval iterations and at the end: evaluate on eval_split -> callback

A non-finite loss ends the run as `failed` with the reason; the record is still written.

On a GPU: `precision` (bf16 autocast around the student's and the teacher's forward passes; the
losses are computed in float32 from float32 copies of the outputs, so no loss scaling is needed),
`channels_last`, `cudnn_benchmark` (only when `deterministic` is off), pinned memory and
`num_workers` DataLoader processes. The teacher runs in eval mode under `torch.no_grad()`, not
`inference_mode()`: its outputs enter terms whose backward saves them (KL, affinities), which
inference tensors may not be.
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
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from harness import provenance
from harness.config import arm_of, methods_of, run_hash
from harness.data import build_dataset
from harness.energy import EnergyMeter
from harness.engine.evaluate import evaluate, slide_window
from harness.methods import Batch, MethodContext, Progress, build_methods
from harness.models import build_segmenter
from harness.store import ResultsStore

# callback(iteration, metrics) -> None to go on, True to stop the run early ("stopped"), or a
# string to end it as "failed" with that reason (the sweep's collapse rule)
EvalCallback = Callable[[int, Dict[str, object]], Optional[object]]


@dataclass
class RunResult:
    record: Dict[str, object]
    model: torch.nn.Module
    history: List[Dict[str, object]] = field(default_factory=list)


def run(cfg: dict, *, command: str = "", callback: Optional[EvalCallback] = None,
        arm: Optional[str] = None, save_record: bool = True, extra: Optional[dict] = None,
        fields: Optional[dict] = None) -> RunResult:
    """Train and evaluate `cfg`; `fields` are record columns set by the caller (sweep, stage,
    trial, params, run_id)."""
    started = time.time()
    run_id = (fields or {}).get("run_id") or uuid.uuid4().hex
    arm = arm or arm_of(cfg)
    device = resolve_device(cfg["device"])
    teacher, teacher_info = None, None
    if cfg["method"]:  # first: training a missing teacher must not disturb this run's random state
        from harness.engine.teacher import get_teacher  # the teacher itself is trained by run()
        teacher, teacher_info = get_teacher(cfg, device=device)
    seed_everything(cfg["seed"], cfg["deterministic"], device)
    torch.set_num_threads(cfg["threads"])
    amp_dtype = autocast_dtype(cfg["precision"], device)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    if device.type == "cuda" and cfg["cudnn_benchmark"] and not cfg["deterministic"]:
        torch.backends.cudnn.benchmark = True
    if teacher is not None:
        teacher = teacher.to(memory_format=memory_format)
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

    # models and methods
    student = build_segmenter(cfg["student"], num_classes).to(device, memory_format=memory_format).train()
    methods = build_methods(cfg["method"], MethodContext(
        num_classes=num_classes, ignore_index=ignore,
        student_channels=student.feature_channels, student_strides=student.feature_strides,
        teacher_channels=teacher.feature_channels if teacher else {},
        teacher_strides=teacher.feature_strides if teacher else {},
        generator=torch.Generator().manual_seed(cfg["seed"] + 1)))
    methods = [m.to(device) for m in methods]
    shared = [p for m in methods if m.own_optimizer() is None for p in m.parameters()]
    optimizer = torch.optim.SGD(list(student.parameters()) + shared, lr=optim_cfg["lr"],
                                momentum=optim_cfg["momentum"], weight_decay=optim_cfg["weight_decay"],
                                nesterov=optim_cfg["nesterov"])

    # the loop
    iterations, eval_every = budget["iterations"], budget["eval_interval"]
    history: List[Dict[str, object]] = []
    status, failure, done, last_terms = "completed", None, 0, {}
    with EnergyMeter(cfg["energy"], run_id, str(Path(cfg["paths"]["results"]) / "energy"),
                     gpu_used=device.type == "cuda") as energy:
        bar = tqdm(total=iterations, desc=f"{arm}:{cfg['student']['name']}", unit="it", file=sys.stderr,
                   disable=not cfg["progress"], dynamic_ncols=True, mininterval=0.5)
        train_started = time.time()
        for k in range(iterations):
            lr = poly_lr(optim_cfg["lr"], k, iterations, optim_cfg["poly_power"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            image, mask = next(batches)
            batch = Batch(image.to(device, non_blocking=True).contiguous(memory_format=memory_format),
                          mask.to(device, non_blocking=True))
            progress = Progress(k, iterations)

            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                s_out = student(batch.image)
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(batch.image)
            s_out, t_out = as_float32(s_out, features=bool(methods)), as_float32(t_out)
            terms = task_terms(s_out, batch.mask, ignore, cfg["student"])
            for method in methods:
                weights = method.weights()
                for name, value in method.terms(s_out, t_out, batch, progress).items():
                    terms[f"{method.name}.{name}"] = weights[name] * value
            loss = sum(terms.values())

            if not torch.isfinite(loss):
                status, failure = "failed", f"loss became {loss.item()} at iteration {k}"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim_cfg["grad_clip_norm"]:
                torch.nn.utils.clip_grad_norm_(student.parameters(), optim_cfg["grad_clip_norm"])
            optimizer.step()
            for method in methods:
                method.extra_step(s_out, t_out, batch, progress)
            done = k + 1

            if k % 10 == 0 or done == iterations:  # each float() waits for the GPU: not every step
                last_terms = {name: float(v.detach()) for name, v in terms.items()}
            bar.update(1)
            if k % 10 == 0 or done == iterations:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", refresh=False)
            if done % eval_every == 0 or done == iterations:
                metrics = evaluate(student, eval_loader, num_classes, ignore, device,
                                   budget["max_eval_images"], train_set.class_names,
                                   slide=slide_window(cfg["dataset"]))
                history.append({"iteration": done, "miou": metrics["miou"], "loss": float(loss.detach()),
                                "pixel_accuracy": metrics["pixel_accuracy"],
                                "per_class_iou": metrics["per_class_iou"]})
                decision = callback(done, metrics) if callback is not None else None
                if isinstance(decision, str):
                    status, failure = "failed", decision
                    break
                if decision:
                    status, failure = "stopped", f"stopped by the caller after iteration {done}"
                    break
        train_time = time.time() - train_started
        bar.close()

    final = history[-1] if history else None
    best = max(history, key=lambda h: h["miou"] if not math.isnan(h["miou"]) else -1) if history else None
    record = {
        "run_id": run_id, "command": command, "config_json": cfg, "config_hash": run_hash(cfg),
        "arm": arm, "methods": ",".join(methods_of(cfg)), "dataset": cfg["dataset"]["name"],
        "student": cfg["student"]["name"], "teacher": cfg["teacher"]["name"] if teacher else None,
        "seed": cfg["seed"], "split": cfg["eval_split"], "status": status, "failure_reason": failure,
        "final_miou": final["miou"] if final else None, "best_miou": best["miou"] if best else None,
        "best_iteration": best["iteration"] if best else None,
        "pixel_accuracy": final["pixel_accuracy"] if final else None,
        "per_class_iou_json": final["per_class_iou"] if final else None,
        "history_json": [{k: h[k] for k in ("iteration", "miou", "loss", "pixel_accuracy")} for h in history],
        "iterations": done, "wall_time_s": time.time() - started, "train_time_s": train_time,
        "energy_kwh": energy.result.get("energy_kwh"), "co2_kg": energy.result.get("co2_kg"),
        "carbon_intensity_g_per_kwh": energy.result.get("carbon_intensity_g_per_kwh"),
        "energy_json": energy.result, "git_commit": provenance.git_commit(),
        "versions_json": provenance.versions(), "host": provenance.host(),
        "extra_json": {"teacher": teacher_info, "device": str(device), "last_loss_terms": last_terms,
                       "precision": str(amp_dtype or torch.float32).replace("torch.", ""),
                       **(extra or {})},
        **{k: v for k, v in (fields or {}).items() if k != "run_id"},
    }
    if save_record:
        ResultsStore(cfg["store"]["url"]).append(record)
    return RunResult(record=record, model=student, history=history)


def task_terms(out, mask: torch.Tensor, ignore: int, model_cfg: dict) -> Dict[str, torch.Tensor]:
    """Cross-entropy on logits upsampled to the label size (+ weighted aux head), ignore excluded."""
    size = mask.shape[-2:]
    terms = {"ce": F.cross_entropy(F.interpolate(out.logits, size=size, mode="bilinear", align_corners=True),
                                   mask, ignore_index=ignore)}
    if out.aux_logits is not None and model_cfg["aux"]:
        aux = F.interpolate(out.aux_logits, size=size, mode="bilinear", align_corners=True)
        terms["aux"] = model_cfg["aux_weight"] * F.cross_entropy(aux, mask, ignore_index=ignore)
    return terms


def poly_lr(base_lr: float, k: int, total: int, power: float) -> float:
    return base_lr * (1 - k / total) ** power


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


def as_float32(out, features: bool = True):
    """A SegOutput whose tensors are float32 (the outputs of a bf16 forward, for the losses);
    `features=False` leaves the features alone (no method reads them in a student-only run)."""
    if out is None or out.logits.dtype == torch.float32:
        return out
    return type(out)(logits=out.logits.float(),
                     aux_logits=None if out.aux_logits is None else out.aux_logits.float(),
                     features={name: f.float() for name, f in out.features.items()} if features else out.features)


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
