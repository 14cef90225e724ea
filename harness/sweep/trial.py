"""The one trial function: `engine.train.run` (the same as `harness train`) inside a Ray Tune trial.

Each evaluation on the tune split is reported to Tune (`miou`), which feeds ASHA. A non-finite loss
or a collapsing mIoU (below `collapse_fraction` of the trial's best so far) ends the trial as
failed with the reason; a failed trial reports mIoU 0 so that it never wins. The trial writes its
own database row when it finishes; rows of trials that ASHA stops or that crash are written by the
driver (`runner.RecordCallback`), under the same deterministic run id, so no row is duplicated.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict

import torch

SEARCH_KEY = "__point__"  # grid/rerun stages pass a whole parameter dict under this key


def run_id_for(arm_id: str, stage: str, trial_id: str) -> str:
    return f"{arm_id}:{stage}:{trial_id}"


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


def trial_params(config: Dict[str, Any], fixed: Dict[str, Any]) -> Dict[str, Any]:
    searched = dict(config.get(SEARCH_KEY) or {})
    searched.update({k: v for k, v in config.items() if k != SEARCH_KEY})
    return {**fixed, **searched}


def trainable(config: Dict[str, Any], spec: Dict[str, Any]) -> None:
    """`spec`: base config, fixed (inherited) params, arm id, stage, split, collapse rule, command."""
    from ray import tune

    from harness.engine.train import run

    params = trial_params(config, spec["fixed"])
    cfg = apply_params(spec["base"], params)
    cfg.update(eval_split=spec["split"], progress=False, threads=spec["threads"])
    if spec.get("gpu_share"):  # trials packed on one GPU: each counts its share of the device's energy
        cfg["energy"] = {**cfg["energy"], "gpu_share": spec["gpu_share"]}
    trial_id = tune.get_context().get_trial_id()
    best = {"miou": 0.0}

    def on_eval(iteration: int, metrics: Dict[str, Any]):
        miou = 0.0 if math.isnan(metrics["miou"]) else float(metrics["miou"])
        collapsed = best["miou"] > 0.05 and miou < spec["collapse_fraction"] * best["miou"]
        reason = (f"tune mIoU collapsed from {best['miou']:.4f} to {miou:.4f} at iteration {iteration}"
                  if collapsed else None)
        best["miou"] = max(best["miou"], miou)
        tune.report({"miou": 0.0 if collapsed else miou, "iteration": iteration,
                     "failed": reason or ""})
        return reason

    torch.set_num_threads(spec["threads"])
    result = run(cfg, command=spec["command"], callback=on_eval, fields={
        "run_id": run_id_for(spec["arm_id"], spec["stage"], trial_id), "sweep_id": spec["arm_id"],
        "stage": spec["stage"], "trial_id": trial_id, "params_json": params})
    record = result.record
    if record["status"] == "failed" and not record["failure_reason"].startswith("tune mIoU collapsed"):
        # diverged before (or between) evaluations: make sure Tune sees a losing, failed result
        tune.report({"miou": 0.0, "iteration": record["iterations"], "failed": record["failure_reason"]})
