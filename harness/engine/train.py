"""One training run: data -> student (+ frozen teacher) -> method terms -> `fit` -> a `RunRecord`.

`run(cfg, teacher=...)` is the single training code path. `python -m harness train` calls it
directly, the sweep calls the same function inside a Ray Tune trial (passing `callback` to receive
each evaluation and to stop the run early), the teacher is trained by it, and `reproduce` re-runs a
stored configuration with it. It sets the run up, hands the loop to `harness.engine.loop.fit` and
returns the record; the caller stores it (`harness.engine.record.store_record`), so a run is never
lost to the database and never written twice.

A distilled run needs its teacher (`harness.engine.teacher.teacher_for(cfg)`); the caller gets it
first, so that training a missing teacher does not disturb this run's random state.

Around the loop (none of it changes what a run computes): checkpoints (`checkpoint.*`,
`harness.engine.checkpoint`: the final student in `<paths.results>/checkpoints/<run_id>/final.pt`, the
training state every `checkpoint.every` iterations and on Ctrl-C, and a resume from it when the same
run is started again), TensorBoard event files (`tensorboard: true`: every loss term, the total, lr,
each evaluation's mIoU and pixel accuracy, step = iteration, in
`<paths.results>/tensorboard/<label or arm>/<run_id>/`) and, with `progress: true`, one line per
evaluation (iteration, mIoU, elapsed, ETA) above the progress bar.

On a GPU: `precision` (bf16 autocast; losses in float32), `channels_last`, `cudnn_benchmark` (only
when `deterministic` is off), pinned memory and `num_workers` DataLoader processes.
"""
from __future__ import annotations

import math
import os
import random
import signal
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

from harness.config import arm_of, run_hash
from harness.data import build_dataset
from harness.energy import EnergyMeter
from harness.engine.checkpoint import (BatchStream, Checkpoints, deferred_interrupt, final_path, load_final,
                                       restore, resume_key, training_state)
from harness.engine.evaluate import evaluate, slide_window
from harness.engine.loop import EvalCallback, Fit, fit
from harness.engine.record import RunRecord
from harness.errors import Terminated
from harness.methods import MethodContext, build_methods
from harness.models import build_segmenter


@dataclass
class RunResult:
    record: RunRecord
    model: torch.nn.Module
    history: List[Dict[str, object]] = field(default_factory=list)


def run(cfg: dict, *, teacher=None, command: str = "", callback: Optional[EvalCallback] = None,
        run_id: Optional[str] = None, label: Optional[str] = None, resume: bool = True) -> RunResult:
    """Train and evaluate `cfg`. `teacher`: the `Teacher` of a distilled run (required when `cfg`
    selects a method). `label` names the progress bar and the TensorBoard folder (default: the arm).
    A saved training state of the same run (`harness.engine.checkpoint`) is resumed unless `resume`
    is false; without `run_id` the resumed run keeps the run id it had."""
    if cfg["method"] and teacher is None:
        raise ValueError("a distilled run needs its teacher: run(cfg, teacher=teacher_for(cfg))")
    started = time.time()
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

    # a run started again continues from its saved state (checkpoint.every, or Ctrl-C)
    ck_cfg = cfg.get("checkpoint") or {}
    key = resume_key(cfg, device)
    checkpoints, state = Checkpoints.open(cfg, key, run_id, uuid.uuid4().hex, ck_cfg.get("keep_last", 1), resume)
    run_id, start = checkpoints.run_id, None
    if state is not None:
        try:
            start = Fit(**restore(state, student, optimizer, methods, batches))
            print(f"[harness] resuming run {run_id} at iteration {start.iterations} from {checkpoints.dir}"
                  + (" (num_workers > 0: the augmentation's random stream is not restored exactly)"
                     if cfg["num_workers"] else ""), file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001 - a state that does not fit this run: from scratch
            print(f"[harness] the saved state of run {run_id} does not fit this run ({type(e).__name__}: "
                  f"{str(e)[:200]}); training from scratch", file=sys.stderr, flush=True)
            checkpoints.close(ended=False)
            return run(cfg, teacher=teacher, command=command, callback=callback, run_id=run_id, label=label,
                       resume=False)
    every, resumed_at = ck_cfg.get("every", 0), start.iterations if start else 0
    tb = tensorboard_writer(cfg, label or arm_of(cfg), run_id, resumed_at)

    # the loop
    ended = False
    try:
        with EnergyMeter(cfg["energy"], run_id, str(Path(cfg["paths"]["results"]) / "energy"),
                         gpu_used=device.type == "cuda") as energy, deferred_interrupt() as interrupt, \
                tqdm(total=budget["iterations"], initial=resumed_at, unit="it",
                     desc=f"{label or arm_of(cfg)}:{cfg['student']['name']}", file=sys.stderr,
                     disable=not cfg["progress"], dynamic_ncols=True, mininterval=0.5) as bar:
            def after_step(so_far: Fit) -> None:
                if (every and so_far.iterations % every == 0 and so_far.iterations < budget["iterations"]) \
                        or interrupt.requested:
                    checkpoints.save_state(training_state(key, run_id, so_far, student, optimizer, methods, batches))
                if interrupt.requested:
                    kind = Terminated if interrupt.signum == signal.SIGTERM else KeyboardInterrupt
                    raise kind(f"run {run_id} interrupted after iteration {so_far.iterations}; "
                               f"its state is in {checkpoints.dir}")

            on_eval = evaluation_printer(cfg, bar, budget["iterations"], resumed_at, callback)
            done = fit(student, optimizer, batches, iterations=budget["iterations"],
                       eval_every=budget["eval_interval"], evaluate=evaluate_student, lr=optim_cfg["lr"],
                       poly_power=optim_cfg["poly_power"], model_cfg=cfg["student"], ignore_index=ignore,
                       methods=methods, teacher=t_model, grad_clip_norm=optim_cfg["grad_clip_norm"],
                       device=device, amp_dtype=amp_dtype, memory_format=memory_format,
                       callback=on_eval if tb is None else tb.with_evaluations(on_eval), bar=bar,
                       log=tb.log if tb is not None else None, after_step=after_step, start=start)
        ended = True
        if ck_cfg.get("final", True) and done.status != "failed":
            checkpoints.save_final(student, run_hash(cfg))
    finally:
        checkpoints.close(ended)
        if tb is not None:
            tb.close()

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
        history_json=[{k: h[k] for k in ("iteration", "miou", "loss", "pixel_accuracy", "terms")} for h in history],
        iterations=done.iterations, wall_time_s=time.time() - started, train_time_s=done.train_time_s,
        energy_kwh=energy.result.get("energy_kwh"), co2_kg=energy.result.get("co2_kg"),
        carbon_intensity_g_per_kwh=energy.result.get("carbon_intensity_g_per_kwh"),
        energy_json=energy.result,
        extra_json={"teacher": teacher.info if teacher is not None else None, "device": str(device),
                    "last_loss_terms": done.last_terms,
                    **({"resumed_at_iteration": resumed_at} if start else {}),
                    "precision": str(amp_dtype or torch.float32).replace("torch.", "")})
    return RunResult(record=record, model=student, history=history)


def saved_student(cfg: dict, run_id: str, current: Optional[dict] = None) -> Optional[torch.nn.Module]:
    """The final student run `run_id` (trained with `cfg`) saved, on the CPU in eval mode; None when
    there is no final.pt under `current`'s (default `cfg`'s) `paths.results`. A file that cannot be
    used is a `CheckpointError`."""
    path = final_path(current or cfg, run_id)
    if not path.is_file():
        return None
    return load_final(path, build_segmenter(cfg["student"], cfg["dataset"]["num_classes"])).eval()


def evaluate_model(cfg: dict, model: torch.nn.Module) -> Dict[str, object]:
    """`model` measured as `run` measures its student: `cfg`'s eval split, evaluator and image limit."""
    device = resolve_device(cfg["device"])
    torch.set_num_threads(cfg["threads"])
    eval_set = build_dataset(cfg["dataset"], cfg["eval_split"], cache_dir=str(Path(cfg["paths"]["cache"]) / "data"))
    loader = DataLoader(eval_set, batch_size=cfg["budget"]["eval_batch_size"], shuffle=False,
                        num_workers=cfg["num_workers"], pin_memory=device.type == "cuda")
    return evaluate(model.to(device), loader, eval_set.num_classes, eval_set.ignore_index, device,
                    cfg["budget"]["max_eval_images"], eval_set.class_names, slide=slide_window(cfg["dataset"]))


# ----------------------------------------------------------------------------- progress and TensorBoard
def evaluation_printer(cfg: dict, bar, total: int, first: int, callback: Optional[EvalCallback]) -> Optional[EvalCallback]:
    """The callback `fit` calls: with `progress`, one line per evaluation (iteration, mIoU, pixel
    accuracy, elapsed, ETA) above the bar; then the caller's callback."""
    if not cfg["progress"]:
        return callback
    t0 = time.time()

    def on_eval(iteration: int, metrics: Dict[str, object]):
        elapsed = time.time() - t0
        eta = elapsed / (iteration - first) * (total - iteration) if iteration > first else 0.0
        bar.write(f"[{bar.desc}] iteration {iteration}/{total}  {cfg['eval_split']} mIoU {100 * metrics['miou']:.2f}  "
                  f"pixel acc {100 * metrics['pixel_accuracy']:.2f}  elapsed {clock(elapsed)}  ETA {clock(eta)}",
                  file=sys.stderr)
        return callback(iteration, metrics) if callback is not None else None
    return on_eval


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TensorBoard:
    """Scalars of one run: loss/<term>, loss/total, lr, method/<method>.<log> (every 10 iterations and
    at each evaluation) and eval/miou, eval/pixel_accuracy (each evaluation); step = iteration."""

    def __init__(self, writer):
        self.writer = writer

    def log(self, step: int, terms: Dict[str, float], scalars: Dict[str, float]) -> None:
        for name, value in terms.items():
            self.writer.add_scalar(f"loss/{name}", value, step)
        for name, value in scalars.items():
            tag = {"loss": "loss/total", "lr": "lr"}.get(name, f"method/{name}")
            self.writer.add_scalar(tag, float(value), step)

    def with_evaluations(self, callback: Optional[EvalCallback]) -> EvalCallback:
        def on_eval(iteration: int, metrics: Dict[str, object]):
            self.writer.add_scalar("eval/miou", float(metrics["miou"]), iteration)
            self.writer.add_scalar("eval/pixel_accuracy", float(metrics["pixel_accuracy"]), iteration)
            self.writer.flush()
            return callback(iteration, metrics) if callback is not None else None
        return on_eval

    def close(self) -> None:
        self.writer.close()


def tensorboard_dir(cfg: dict, label: str, run_id: str) -> Path:
    safe = lambda s: str(s).replace(":", "_").replace("/", "_")  # noqa: E731
    return Path(cfg["paths"]["results"]) / "tensorboard" / safe(label) / safe(run_id)


def tensorboard_writer(cfg: dict, label: str, run_id: str, start: int) -> Optional[TensorBoard]:
    """The run's TensorBoard writer, or None (`tensorboard: false`, or the package is missing: a
    warning). A resumed run purges the events past its saved state that the interrupted one wrote."""
    if not cfg.get("tensorboard", False):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        print(f"[harness] tensorboard: true, but TensorBoard cannot be imported ({e}); no event files "
              f"(pip install tensorboard)", file=sys.stderr, flush=True)
        return None
    return TensorBoard(SummaryWriter(str(tensorboard_dir(cfg, label, run_id)), purge_step=start or None))


# ----------------------------------------------------------------------------- the environment
def infinite_batches(dataset, batch_size: int, seed: int, workers: int, device: torch.device) -> BatchStream:
    """Reshuffled epochs forever; the order depends only on the seed; the position can be saved
    and restored (`BatchStream`)."""
    if len(dataset) < batch_size:
        raise ValueError(f"the training split has {len(dataset)} images, fewer than batch_size={batch_size}")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
                        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    return BatchStream(loader, generator)


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
