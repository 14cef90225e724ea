"""The one trial function: `engine.train.run` (the same as `harness train`) inside a Ray Tune trial.

Each evaluation on the tune split is reported to Tune (`miou`), which feeds ASHA. A non-finite loss
or a collapsing mIoU (below `collapse_fraction` of the trial's best so far) ends the trial as
failed with the reason; a failed trial reports mIoU 0 so that it never wins. The trial stores its
own record when it finishes; records of trials that ASHA stops or that crash are stored by the
driver (`runner.RecordCallback`), under the same deterministic run id, so no row is duplicated.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

SEARCH_KEY = "__point__"  # grid/rerun stages pass a whole parameter dict under this key


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial of one stage run needs besides the searched values (a plain, picklable
    object that Ray hands to every trial of the stage)."""
    base: Dict[str, Any]              # the arm's config
    fixed: Dict[str, Any]             # inherited winners: config path -> value
    arm_id: str
    stage: str                        # stored stage name (a sub-stage: `weights[method.kd.weight]`)
    stage_kind: str                   # the stage's search kind (tpe | grid | combine | rerun)
    split: str                        # where the trial is evaluated: tune, or val for reruns
    threads: int
    collapse_fraction: float
    command: str
    gpu_share: Optional[float] = None  # trials packed on one GPU: each counts its share of its energy
    param_kinds: Optional[Dict[str, str]] = None  # method path -> temperature | weight | ... (for reports)
    extra_fields: Optional[Dict[str, Any]] = None  # what the runner adds to extra_json (first cut, budgets)

    def params(self, config: Dict[str, Any]) -> Dict[str, Any]:
        """The trial's full parameter set: inherited winners, then what Tune chose for it."""
        searched = dict(config.get(SEARCH_KEY) or {})
        searched.update({k: v for k, v in config.items() if k != SEARCH_KEY})
        return {**self.fixed, **searched}

    def config(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """The run configuration of a trial with these parameters."""
        cfg = apply_params(self.base, params)
        cfg.update(eval_split=self.split, progress=False, threads=self.threads)
        if self.gpu_share:
            cfg["energy"] = {**cfg["energy"], "gpu_share": self.gpu_share}
        return cfg

    def run_id(self, trial_id: str) -> str:
        return f"{self.arm_id}:{self.stage}:{trial_id}"

    def record_fields(self, trial_id: str, params: Dict[str, Any]) -> Dict[str, Any]:
        """What a stored trial record says about where it belongs."""
        return {"run_id": self.run_id(trial_id), "sweep_id": self.arm_id, "stage": self.stage,
                "trial_id": trial_id, "params_json": params}

    def extra(self) -> Dict[str, Any]:
        """What a stored trial record keeps of its stage in `extra_json`: the stage's kind (reports find
        the rerun rows by it), what each method parameter is (reports read no method code), and what the
        runner adds: `first_cut` on search trials ({evaluation, iteration, pruning} or None); on rerun
        rows the comparison's budgets (`runner.compare`)."""
        return {**dict(self.extra_fields or {}), "stage_kind": self.stage_kind,
                "param_kinds": dict(self.param_kinds or {})}


def apply_params(cfg: Dict[str, Any], params: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of `cfg` with dotted config paths set to the given values."""
    out = copy.deepcopy(cfg)
    for path, value in params.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"'{path}' is not a config path")
        node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], (int, float)) and not isinstance(
            node[leaf], bool) and node[leaf] is not None else value
    return out


class CollapseRule:
    """Ends a trial whose tune mIoU collapsed: below `fraction` of its best so far (best above 0.05)
    on **two evaluations in a row**. One low evaluation is the evaluation noise of a small tune split
    (measured on the smoke budget: 8.66 -> 4.29 -> back up), not a diverged model; a collapse persists."""

    def __init__(self, fraction: float, patience: int = 2) -> None:
        self.fraction, self.patience = fraction, patience
        self.best, self.low, self.since = 0.0, 0, None

    def __call__(self, iteration: int, miou: float):
        if self.best > 0.05 and miou < self.fraction * self.best:
            self.low += 1
            self.since = self.since if self.since is not None else (iteration, self.best)
        else:
            self.low, self.since = 0, None
        self.best = max(self.best, miou)
        if self.low >= self.patience:
            it0, best = self.since
            return (f"tune mIoU collapsed from {best:.4f} to {miou:.4f} (below {self.fraction:g} x its best since "
                    f"iteration {it0}, {self.low} evaluations in a row) at iteration {iteration}")
        return None


def trainable(config: Dict[str, Any], spec: TrialSpec) -> None:
    from ray import tune

    from harness.engine.record import store_record
    from harness.engine.teacher import teacher_for
    from harness.engine.train import run
    from harness.plugins import load as load_plugins

    load_plugins(spec.base.get("plugins"))  # a Ray worker is a fresh process: the driver's plug-ins again
    params = spec.params(config)
    cfg = spec.config(params)
    trial_id = tune.get_context().get_trial_id()
    collapse = CollapseRule(spec.collapse_fraction)

    def on_eval(iteration: int, metrics: Dict[str, Any]):
        miou = 0.0 if math.isnan(metrics["miou"]) else float(metrics["miou"])
        reason = collapse(iteration, miou)
        tune.report({"miou": 0.0 if reason else miou, "iteration": iteration, "failed": reason or ""})
        return reason

    torch.set_num_threads(spec.threads)
    result = run(cfg, teacher=teacher_for(cfg, spec.command), command=spec.command, callback=on_eval,
                 run_id=spec.run_id(trial_id))
    record = result.record.replace(**spec.record_fields(trial_id, params),
                                   extra_json={**result.record.extra_json, **spec.extra()})
    store_record(cfg, record)
    if record.status == "failed" and not record.failure_reason.startswith("tune mIoU collapsed"):
        # diverged before (or between) evaluations: make sure Tune sees a losing, failed result
        tune.report({"miou": 0.0, "iteration": record.iterations, "failed": record.failure_reason})
