"""`python -m harness reproduce <row-id> [--seed N] [--weights [--retrain]] [overrides]`: re-run what a number came from.

`<row-id>` is the id of a leaderboard row (`harness.report.blocks.row_id`, printed in every
leaderboard block) or the `run_id` of any row of the results database. The rows behind a leaderboard
id are the completed rerun runs of that arm; `--seed N` picks the run of seed N, otherwise the run of
the lowest seed is re-run.

The configuration is the stored one (`config_json`: the resolved config the run was trained with,
including its seed, split, threads and every tuned value), fed to `harness.engine.train.run`, the
same function that produced it. Only what does not change the computation comes from the current
command line: `paths.*` (data and teacher cache: a missing teacher is trained again, deterministically),
`store.url`, `energy.*` and `progress`. The device is the one the run recorded
(`extra_json.device`), unless `device=...` is given: on the same CPU and the same seed the result is
bit-identical (`deterministic: true`), on another device it is usually close, not equal.

The new value is printed next to the stored one, with whether final mIoU, per-class IoU and the
evaluation history are identical. The new run is not written to the database (it would count as a
second rerun of the same seed); exit status 0 when identical, 1 when not, 2 for a bad id or seed.

A run that did not finish (a sweep trial `pruned` by early stopping, or `failed`/`stopped`: the
run id of any such row) is replayed as far as it went: its stored configuration (a trial's: on its
own split, `tune`, with its own threads) to the iteration where it stopped (`iterations`), the
training otherwise unchanged (the learning-rate schedule still spans `budget.iterations`). The
mIoU at that iteration is compared with the stored one (its `history_json` entry, or for a row the
sweep's driver wrote, which has no history, the last reported value it stored as `final_miou`),
and so is the history up to there; a failed run that diverged must fail again with the same reason.
When there is nothing to replay or compare (a row without a stored config, a trial that crashed
before its first evaluation) it says why, exit 2.

`--weights` measures the run's saved final student instead (`<paths.results>/checkpoints/<run_id>/final.pt`,
found by the row's run id): the same evaluator on the stored config's split, seconds instead of a
training, and final mIoU and per-class IoU compared (a history needs the training). When the file
is missing it says so and retrains; `--retrain` always retrains (the default without `--weights`).
"""
from __future__ import annotations

import copy
import math
import shlex
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

KEEP_FROM_CURRENT = ("paths", "store", "energy", "progress")


def parse_args(args: Sequence[str]) -> Tuple[str, Optional[int], List[str]]:
    """(row id, seed or None, config overrides) from `<row-id> [--seed N] [key=value ...]`."""
    from harness.errors import UsageError

    args = list(args)
    seed: Optional[int] = None
    rest: List[str] = []
    ident: Optional[str] = None
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--seed" or a.startswith("--seed="):
            value = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in a else 2
            try:
                seed = int(value)
            except ValueError:
                raise UsageError(f"--seed needs an integer, got '{value}'") from None
            continue
        if a.startswith("-"):
            raise UsageError(f"unknown option {a}; reproduce takes <row-id> [--seed N] and Hydra overrides "
                             f"such as paths.results=... or device=cpu")
        if "=" not in a and ident is None:
            ident = a
        else:
            rest.append(a)
        i += 1
    if ident is None:
        raise UsageError("reproduce needs the id of a leaderboard row (or a run id): "
                         "python -m harness reproduce <row-id> [--seed N]")
    return ident, seed, rest


def runs_behind(store, ident: str) -> Tuple[List[Dict[str, Any]], str]:
    """(rows, description) of a leaderboard row id, else of a run id; ([], '') if neither."""
    from harness.report.blocks import find_row, known_row_ids

    rows = find_row(store, ident)
    if rows:
        return rows, f"leaderboard row {ident} ({known_row_ids(store).get(ident, '?')})"
    row = store.get(ident)
    if row is not None:
        return [row], f"run {ident}"
    return [], ""


def pick(rows: Sequence[Dict[str, Any]], seed: Optional[int]) -> Dict[str, Any]:
    from harness.errors import UsageError

    if seed is None:
        return min(rows, key=lambda r: (r["seed"] if r["seed"] is not None else math.inf, r["created_at"] or ""))
    chosen = [r for r in rows if r["seed"] == seed]
    if not chosen:
        raise UsageError(f"no run of seed {seed} behind this row; its seeds: "
                         f"{', '.join(str(r['seed']) for r in rows)}")
    return chosen[0]


def recorded_device(row: Dict[str, Any]) -> Optional[str]:
    device = str((row.get("extra_json") or {}).get("device") or "")
    return device.split(":")[0] if device in ("cpu",) or device.startswith("cuda") else None


def load_run_plugins(row: Dict[str, Any]) -> List[str]:
    """Load the plug-ins the run was trained with (its stored `plugins:` list, absolute paths or module
    names) before anything is rebuilt from its config: a plug-in method or dataset is otherwise unknown
    here. A plug-in that is gone is a ConfigError naming it (exit 2)."""
    from harness.plugins import load

    return load((row.get("config_json") or {}).get("plugins") or [])


def reproduction_config(row: Dict[str, Any], current: Dict[str, Any], device: Optional[str] = None) -> Dict[str, Any]:
    """The stored config with the current paths/store/energy/progress and the recorded device."""
    cfg = copy.deepcopy(row["config_json"])
    for key in KEEP_FROM_CURRENT:
        cfg[key] = copy.deepcopy(current[key])
    cfg["device"] = device or recorded_device(row) or cfg.get("device", "auto")
    return cfg


def compare(stored: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, bool]:
    return {"final_miou": stored["final_miou"] == new["final_miou"],
            "per_class_iou": stored["per_class_iou_json"] == new["per_class_iou_json"],
            "history": [(h["iteration"], h["miou"]) for h in stored["history_json"] or []]
                       == [(h["iteration"], h["miou"]) for h in new["history_json"] or []]}


def reproduce(row: Dict[str, Any], current: Dict[str, Any], device: Optional[str] = None,
              command: str = "") -> Dict[str, Any]:
    """Re-run `row`'s configuration; {stored, new (record), same: {final_miou, per_class_iou, history},
    config, model (the trained student)}. The new run is saved as no run of its own; when it is identical
    and the stored run has no final.pt, its student becomes that file (`--weights` and `show` use it)."""
    from harness.engine.teacher import teacher_for
    from harness.engine.train import run

    cfg = reproduction_config(row, current, device)
    cfg["checkpoint"] = {**(cfg.get("checkpoint") or {}), "final": False, "every": 0}  # leave the run's files alone
    result = run(cfg, teacher=teacher_for(cfg, command), command=command)  # not stored: a second rerun of a seed
    new = result.record
    same = compare(row, new)
    from harness.engine.checkpoint import final_path, save_final

    if all(same.values()) and not final_path(cfg, row["run_id"]).is_file():
        save_final(cfg, row["run_id"], result.model, row["config_hash"])
    return {"stored": row, "new": new, "same": same, "config": cfg, "model": result.model}


STOPPED = ("pruned", "failed", "stopped")  # rows of runs that did not train to the end
COLLAPSE = "tune mIoU collapsed"            # the sweep's collapse rule (sweep.trial.CollapseRule): not replayed


def _history_to(history: Optional[List[Dict[str, Any]]], stop: int) -> List[Tuple[int, float]]:
    return [(h["iteration"], h["miou"]) for h in history or [] if h["iteration"] <= stop]


def stopped_reference(row: Dict[str, Any]) -> Tuple[int, Optional[float], List[Tuple[int, float]]]:
    """(stop iteration, stored mIoU at it or None, stored history up to it) of a row that did not
    finish; UsageError (exit 2) saying why when it cannot be replayed."""
    from harness.errors import UsageError

    what = f"run {row['run_id']} ({row['status']}" + (f": {row['failure_reason']}" if row.get("failure_reason") else "") + ")"
    stop = row.get("iterations")
    if not isinstance(stop, int) or stop < 1:
        raise UsageError(f"cannot reproduce {what}: it stopped before its first iteration was recorded "
                         f"(iterations {stop!r}), so there is no stored mIoU to compare a replay with")
    history = _history_to(row.get("history_json"), stop)
    at_stop = dict(history).get(stop)
    if at_stop is None and not row.get("history_json"):  # a row the sweep's driver wrote: the last reported value
        at_stop = row.get("final_miou")
    if at_stop is None and not history and not _diverged(row):
        raise UsageError(f"cannot reproduce {what}: no {row.get('split') or 'tune'} mIoU was stored for it (no evaluation "
                         f"history and no last reported value; it ended before its first evaluation at iteration {stop})")
    return stop, at_stop, history


def _diverged(row: Dict[str, Any]) -> bool:
    """A failed run that ended by itself (a non-finite loss), not by the collapse rule or a crash."""
    reason = row.get("failure_reason") or ""
    return row["status"] == "failed" and bool(row.get("history_json") is not None) and not reason.startswith(COLLAPSE)


def reproduce_stopped(row: Dict[str, Any], current: Dict[str, Any], device: Optional[str] = None,
                      command: str = "") -> Dict[str, Any]:
    """Replay a run that did not finish to the iteration where it stopped, on its own split;
    {stored, new (record), same: {miou_at_stop, history, failure (whichever apply)}, config, model, stop}."""
    from harness.engine.teacher import teacher_for
    from harness.engine.train import run

    stop, at_stop, history = stopped_reference(row)
    cfg = reproduction_config(row, current, device)
    cfg["checkpoint"] = {**(cfg.get("checkpoint") or {}), "final": False, "every": 0}  # leave the run's files alone
    result = run(cfg, teacher=teacher_for(cfg, command), command=command, resume=False,
                 callback=lambda iteration, metrics: True if iteration >= stop else None)
    new = result.record
    replayed = _history_to(new.history_json, stop)
    same: Dict[str, bool] = {}
    if at_stop is not None:
        same["miou_at_stop"] = dict(replayed).get(stop) == at_stop
    if history:
        same["history"] = replayed == history
    if _diverged(row):
        same["failure"] = new.status == "failed" and new.failure_reason == row["failure_reason"]
    return {"stored": row, "new": new, "same": same, "config": cfg, "model": result.model, "stop": stop,
            "stored_at_stop": at_stop, "new_at_stop": dict(replayed).get(stop)}


def from_weights(row: Dict[str, Any], current: Dict[str, Any], device: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Measure `row`'s saved final student as its run measured it; None when no final.pt was saved.
    The same shape as `reproduce`'s answer (`same` without the history)."""
    from harness.engine.train import evaluate_model, saved_student

    cfg = reproduction_config(row, current, device)
    model = saved_student(cfg, row["run_id"])
    if model is None:
        return None
    metrics = evaluate_model(cfg, model)
    new = {"final_miou": metrics["miou"], "per_class_iou_json": metrics["per_class_iou"], "split": row["split"],
           "status": "saved weights"}
    same = {"final_miou": row["final_miou"] == new["final_miou"],
            "per_class_iou": row["per_class_iou_json"] == new["per_class_iou_json"]}
    return {"stored": row, "new": new, "same": same, "config": cfg, "model": model.cpu().eval()}


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.6f}"


def main(args: List[str]) -> int:
    from harness.errors import UsageError
    from harness.config import load_config
    from harness.store import ResultsStore

    flags = {a for a in args if a in ("--weights", "--retrain")}
    ident, seed, overrides = parse_args([a for a in args if a not in flags])
    device = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == "device"), None)
    current = load_config(overrides)
    store = ResultsStore(current["store"]["url"], readonly=True)
    rows, what = runs_behind(store, ident)
    if not rows:
        from harness.report.blocks import known_row_ids

        known = known_row_ids(store)
        listing = "; ".join(f"{k} = {v}" for k, v in known.items()) or "none (the database has no rerun rows)"
        raise UsageError(f"'{ident}' is neither a leaderboard row id nor a run id in {store.url}. "
                         f"Known row ids: {listing}")
    row = pick(rows, seed)
    if not row.get("config_json"):
        raise UsageError(f"cannot reproduce run {row['run_id']}: the row has no stored configuration (config_json), "
                         f"so what it trained is unknown")
    load_run_plugins(row)
    print(f"reproducing {what}: run {row['run_id']} ({row['arm']}, seed {row['seed']}, split {row['split']})")
    command = "python -m harness reproduce " + " ".join(shlex.quote(a) for a in args)
    if row["status"] in STOPPED:
        return _main_stopped(row, current, device, command, flags)
    result = None
    if "--weights" in flags and "--retrain" not in flags:
        from harness.engine.checkpoint import final_path

        result = from_weights(row, current, device)
        print(f"  weights        {final_path(current, row['run_id'])}: "
              + ("the run's saved final student, measured again" if result else "missing; retraining the run"))
    result = result or reproduce(row, current, device, command)
    new, same = result["new"], result["same"]
    print(f"  configuration  stored config_json of that run (hash {row['config_hash']}), device "
          f"{result['config']['device']}, threads {result['config']['threads']}")
    print(f"  stored         {row['split']} mIoU {_pct(row['final_miou'])}  (recorded {row['created_at']}, "
          f"commit {row['git_commit']})")
    print(f"  reproduced     {new['split']} mIoU {_pct(new['final_miou'])}  (status {new['status']})")
    if all(same.values()):
        print("  identical      yes: final mIoU, per-class IoU and every evaluation of the history match exactly")
        return 0
    diff = (new["final_miou"] - row["final_miou"]) if None not in (new["final_miou"], row["final_miou"]) else None
    print(f"  identical      no ({', '.join(k for k, v in same.items() if not v)} differ"
          + (f"; difference {100 * diff:+.6f} mIoU points" if diff is not None else "") + ")", file=sys.stdout)
    return 1


def _main_stopped(row: Dict[str, Any], current: Dict[str, Any], device: Optional[str], command: str, flags) -> int:
    """`main` for a run that did not finish: replay it to where it stopped and compare there."""
    stop, _, _ = stopped_reference(row)  # says why not (exit 2) before anything trains
    if "--weights" in flags and "--retrain" not in flags:
        print(f"  weights        a {row['status']} run saved no final student; replaying its training instead")
    result = reproduce_stopped(row, current, device, command)
    new, same = result["new"], result["same"]
    split = result["config"]["eval_split"]
    print(f"  configuration  stored config_json of that run (hash {row['config_hash']}), device "
          f"{result['config']['device']}, threads {result['config']['threads']}, split {split}")
    print(f"  stopped        {row['status']} at iteration {stop} of {result['config']['budget']['iterations']}"
          + (f" ({row['failure_reason']})" if row.get("failure_reason") else "") + f"; replayed to iteration {stop}")
    print(f"  stored         {split} mIoU at iteration {stop} {_pct(result['stored_at_stop'])}  "
          f"(recorded {row['created_at']}, commit {row['git_commit']})")
    print(f"  reproduced     {split} mIoU at iteration {stop} {_pct(result['new_at_stop'])}  (status {new.status}"
          + (f": {new.failure_reason}" if new.status == "failed" else "") + ")")
    if all(same.values()):
        print(f"  identical      yes: {', '.join(k.replace('_', ' ') for k in same)} match exactly")
        return 0
    print(f"  identical      no ({', '.join(k for k, v in same.items() if not v)} differ)")
    return 1
