"""The training loop alone: `fit` steps a student and evaluates it, nothing else.

    for k in 0 .. iterations-1:
        lr_k = lr * (1 - k / iterations) ** poly_power              (set before the step)
        loss = CE(up(logits), y) + aux_weight * CE(up(aux), y)       (task, CIRKD protocol)
             + sum over methods, terms: weight * term(student, teacher, batch, progress)
        SGD step (momentum, weight decay); methods with their own optimiser step after it
        every 10 iterations and at each evaluation: log(iteration, loss terms, {total, lr, methods' step logs})
        every eval_interval iterations and at the end: evaluate -> history (+ the loss terms) -> callback
        after_step(fit so far): the caller may save the training state here

`start` continues a fit from a saved state (`harness.engine.checkpoint`): its iterations, history and
time; the caller has restored the models, optimisers, data position and RNGs. A non-finite loss ends the fit as `failed` with the reason. The callback may stop the fit early
(`True` -> "stopped") or end it as failed (a string: the reason). `fit` builds nothing, opens no
store and writes no record: `harness.engine.train.run` sets it up and turns its `Fit` into a record.

Precision: the forward passes run under `torch.autocast` with `amp_dtype` (bf16 on a GPU) and the
losses are computed in float32 from float32 copies of the outputs, so no loss scaling is needed.
The teacher is called in eval mode under `torch.no_grad()`, not `inference_mode()`: its outputs
enter terms whose backward saves them (KL, affinities), which inference tensors may not be.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

from harness.methods import Batch, Method, Progress

# callback(iteration, metrics) -> None to go on, True to stop the run early ("stopped"), or a
# string to end it as "failed" with that reason (the sweep's collapse rule)
EvalCallback = Callable[[int, Dict[str, object]], Optional[object]]
# log(iteration, {loss term: weighted value}, {"loss": total, "lr": lr, "<method>.<name>": its own step's logs})
LogHook = Callable[[int, Dict[str, float], Dict[str, float]], None]


@dataclass
class Fit:
    """What a fit did: its end, the evaluations (each with the loss terms at that iteration) and the
    last value of every loss term."""
    status: str = "completed"                 # completed | failed | stopped
    failure: Optional[str] = None
    iterations: int = 0                       # steps taken
    history: List[Dict[str, object]] = field(default_factory=list)  # one entry per evaluation
    last_terms: Dict[str, float] = field(default_factory=dict)
    train_time_s: float = 0.0


def fit(student: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator, *,
        iterations: int, eval_every: int, evaluate: Callable[[], Dict[str, object]],
        lr: float, poly_power: float, model_cfg: dict, ignore_index: int,
        methods: Sequence[Method] = (), teacher: Optional[torch.nn.Module] = None,
        grad_clip_norm: Optional[float] = None, device: torch.device = torch.device("cpu"),
        amp_dtype: Optional[torch.dtype] = None, memory_format=torch.contiguous_format,
        callback: Optional[EvalCallback] = None, bar=None, log: Optional[LogHook] = None,
        after_step: Optional[Callable[[Fit], None]] = None, start: Optional[Fit] = None) -> Fit:
    out = start or Fit()
    started = time.time() - out.train_time_s
    extras: Dict[str, float] = {}
    for k in range(out.iterations, iterations):
        step_lr = poly_lr(lr, k, iterations, poly_power)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
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
        terms = task_terms(s_out, batch.mask, ignore_index, model_cfg)
        for method in methods:
            weights = method.weights()
            for name, value in method.terms(s_out, t_out, batch, progress).items():
                terms[f"{method.name}.{name}"] = weights[name] * value
        loss = sum(terms.values())

        if not torch.isfinite(loss):
            out.status, out.failure = "failed", f"loss became {loss.item()} at iteration {k}"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip_norm)
        optimizer.step()
        for method in methods:
            logs = method.extra_step(s_out, t_out, batch, progress)
            extras.update({f"{method.name}.{name}": value for name, value in logs.items()})
        out.iterations = done = k + 1
        evaluating = done % eval_every == 0 or done == iterations

        if k % 10 == 0 or evaluating:  # each float() waits for the GPU: not every step
            out.last_terms = {name: float(v.detach()) for name, v in terms.items()}
            if log is not None:
                log(done, out.last_terms, {"loss": float(loss.detach()), "lr": step_lr, **extras})
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{step_lr:.2e}", refresh=False)
        if bar is not None:
            bar.update(1)
        if evaluating:
            metrics = evaluate()
            out.history.append({"iteration": done, "miou": metrics["miou"], "loss": float(loss.detach()),
                                "pixel_accuracy": metrics["pixel_accuracy"],
                                "per_class_iou": metrics["per_class_iou"], "terms": dict(out.last_terms)})
            decision = callback(done, metrics) if callback is not None else None
            if isinstance(decision, str):
                out.status, out.failure = "failed", decision
                break
            if decision:
                out.status, out.failure = "stopped", f"stopped by the caller after iteration {done}"
                break
        out.train_time_s = time.time() - started
        if after_step is not None:
            after_step(out)
    out.train_time_s = time.time() - started
    return out


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


def as_float32(out, features: bool = True):
    """A SegOutput whose tensors are float32 (the outputs of a bf16 forward, for the losses);
    `features=False` leaves the features alone (no method reads them in a student-only run)."""
    if out is None or out.logits.dtype == torch.float32:
        return out
    return type(out)(logits=out.logits.float(),
                     aux_logits=None if out.aux_logits is None else out.aux_logits.float(),
                     features={name: f.float() for name, f in out.features.items()} if features else out.features)
