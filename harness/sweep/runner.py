"""Run a tuning protocol for both arms of a comparison, stage by stage.

    for each stage, for each of its arms:
        params inherited = winners of the stages it inherits (lineage: which stage chose what)
        done   = rows of (arm, stage) already in the results database   -> resume and reuse
        run the missing trials as one Ray Tune experiment (OptunaSearch/TPE or a grid, ASHA)
        winner = the best completed trial on the tune split (failed/pruned trials never win)

The database is the source of truth: a sweep killed in the middle of a stage and started again
sees its finished trials there (they are not re-run; the TPE sampler is told their results), and
the student-only arm's rows, keyed by (dataset, student, budget, optimiser, protocol), are reused
by every later method sweep with the same key.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness.config import methods_of, stable_hash
from harness.errors import ConfigError
from harness.store import ResultsStore
from harness.sweep.protocol import Protocol, Stage, check_paths, expand_space, load_protocol
from harness.sweep.trial import SEARCH_KEY, run_id_for, trainable

FINISHED = ("completed", "pruned", "failed")


class SweepError(RuntimeError):
    """A sweep that cannot go on (every trial of a stage failed); the database keeps the reasons."""


@dataclass
class Winner:
    params: Dict[str, Any]
    miou: Optional[float]
    lineage: Dict[str, str] = field(default_factory=dict)  # path -> stage that chose its value
    best_single: Optional["Winner"] = None  # `each` stages: the best sub-stage, for `combine`


@dataclass
class Unit:
    """One Ray Tune experiment: a stage (or one sub-stage of an `each` stage) for one arm."""
    arm: str
    arm_id: str
    stage: Stage
    name: str                       # stage name, or stage[path] for sub-stages
    base: Dict[str, Any]            # the arm's config
    fixed: Dict[str, Any]           # inherited winners
    lineage: Dict[str, str]
    space: Dict[str, Dict[str, Any]]
    points: List[Dict[str, Any]]    # grid / combine / rerun candidates
    trials: int


def arm_ids(cfg: Dict[str, Any], protocol: Protocol) -> Dict[str, str]:
    common = {k: cfg[k] for k in ("dataset", "student", "budget", "optim", "seed", "train_split")}
    common["protocol"] = protocol.raw
    student = stable_hash(common)
    distilled = stable_hash({**common, "teacher": cfg["teacher"], "method": cfg["method"]})
    return {"student-only": f"student-only:{student}",
            "distilled": f"distilled:{'+'.join(methods_of(cfg))}:{distilled}"}


def arm_config(cfg: Dict[str, Any], arm: str) -> Dict[str, Any]:
    return {**cfg, "method": {}} if arm == "student-only" else cfg


def prepare(cfg: Dict[str, Any]) -> Tuple[Protocol, Dict[str, str]]:
    """Everything that can be wrong with a sweep request, found before anything runs or is written."""
    if not cfg["method"]:
        raise ConfigError("a sweep compares a distilled arm with the student-only arm: add +method=NAME "
                          "(e.g. python -m harness sweep +method=kd)")
    protocol = load_protocol(cfg["sweep"]["protocol"])
    for stage in protocol.stages:
        for arm in stage.arms:
            space = expand_space(stage.space, arm_config(cfg, arm))
            check_paths(space, arm_config(cfg, arm), f"protocol '{protocol.name}', stage '{stage.name}'")
    return protocol, arm_ids(cfg, protocol)


def run_sweep(cfg: Dict[str, Any], command: str = "") -> Dict[str, Any]:
    protocol, ids = prepare(cfg)
    from harness.sweep.ray_runtime import check_address, ray_session

    if cfg["sweep"]["ray"]["address"]:
        check_address(cfg["sweep"]["ray"]["address"])
    store = ResultsStore(cfg["store"]["url"])
    say(f"sweep '{protocol.name}' for {'+'.join(methods_of(cfg))}: {cfg['student']['name']} <- "
        f"{cfg['teacher']['name']} on {cfg['dataset']['name']} (budget {cfg['budget']['name']})")
    say(f"  arms: {ids['student-only']}  |  {ids['distilled']}")

    from harness.engine.teacher import get_teacher
    from harness.engine.train import resolve_device

    if any("distilled" in s.arms for s in protocol.stages):  # trained once, before any trial
        get_teacher(cfg, resolve_device(cfg["device"]), command=command)

    winners: Dict[Tuple[str, str], Winner] = {}
    started = time.time()
    with ray_session(cfg["sweep"]["ray"]["address"], cfg["sweep"]["ray"]["num_cpus"], cfg["paths"]["results"]):
        for stage in protocol.stages:
            for arm in stage.arms:
                winners[(arm, stage.name)] = run_stage(cfg, protocol, stage, arm, ids[arm], winners, store, command)
    summary = final_summary(store, ids, protocol, winners, time.time() - started)
    return summary


def run_stage(cfg, protocol: Protocol, stage: Stage, arm: str, arm_id: str,
              winners: Dict[Tuple[str, str], Winner], store: ResultsStore, command: str) -> Winner:
    base = arm_config(cfg, arm)
    fixed, lineage = {}, {}
    parents = [winners[(arm, p)] for p in stage.inherits if (arm, p) in winners]  # others: not this arm's
    for parent in parents:
        fixed.update(parent.params)
        lineage.update(parent.lineage)
    started = time.time()
    if stage.search == "combine":
        singles = [p.best_single for p in parents if p.best_single is not None]
        result = combine_stage(cfg, protocol, stage, arm, arm_id, base, fixed, lineage,
                               singles[-1] if singles else None, store, command)
    else:
        space = expand_space(stage.space, base)
        if stage.search != "rerun" and not space:
            say(f"[{stage.name}] {arm}: nothing to search for {'+'.join(methods_of(cfg))} (no matching "
                f"parameters), winners carried over")
            return Winner(fixed, None, lineage)
        groups = [{p: d} for p, d in space.items()] if stage.each else [space]
        results = []
        for group in groups:
            name = f"{stage.name}[{next(iter(group))}]" if stage.each else stage.name
            unit = make_unit(cfg, protocol, stage, arm, arm_id, name, base, fixed, lineage, group)
            results.append(run_unit(cfg, protocol, unit, store, command))
        result = merge_each(stage, results, fixed, lineage) if stage.each else results[0]
    stage_summary(store, arm_id, stage, arm, result, time.time() - started)
    return result


def make_unit(cfg, protocol, stage, arm, arm_id, name, base, fixed, lineage, space) -> Unit:
    cap = cfg["budget"]["sweep_max_trials"]
    points: List[Dict[str, Any]] = []
    trials = 0
    if stage.search == "rerun":
        seeds = min(stage.seeds, cfg["budget"]["sweep_rerun_seeds"] or stage.seeds)
        points = [{"seed": cfg["seed"] + 1 + i} for i in range(seeds)]  # fresh seeds: not the search seed
    elif stage.search == "grid":
        points = [{}]
        for path, dist in space.items():
            points = [{**p, path: v} for p in points for v in dist["grid"]]
        points = points[:cap] if cap else points
    else:
        trials = min(stage.trials, cap) if cap else stage.trials
    return Unit(arm, arm_id, stage, name, base, fixed, lineage, space, points, trials)


def run_unit(cfg, protocol: Protocol, unit: Unit, store: ResultsStore, command: str) -> Winner:
    """One stage (or sub-stage) of one arm. Two sweeps that share an arm (two methods' sweeps of the
    same student, started together) take turns: the second waits for the first, then reuses its rows."""
    from filelock import FileLock

    locks = Path(cfg["paths"]["results"]) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    name = stable_hash([unit.arm_id, unit.name], 16)
    with FileLock(str(locks / f"{name}.lock")):
        rows = _run_unit(cfg, protocol, unit, store, command)
    return pick_winner(within_budget(rows, unit), unit)


def within_budget(rows: List[Dict[str, Any]], unit: Unit) -> List[Dict[str, Any]]:
    """The rows a winner may come from: the first `trials` of a search stage, the first row of each
    grid point or seed. Extra rows (left by a concurrent sweep of an older version) cannot give
    one arm more trials than the other."""
    rows = sorted(rows, key=lambda r: r["created_at"] or "")
    if not unit.points:
        return rows[:unit.trials]
    kept = []
    for point in unit.points:
        match = next((r for r in rows if _same(point, r["params_json"])), None)
        if match is not None:
            kept.append(match)
    return kept


def _run_unit(cfg, protocol: Protocol, unit: Unit, store: ResultsStore, command: str) -> List[Dict[str, Any]]:
    done = [r for r in store.query(sweep_id=unit.arm_id, stage=unit.name) if r["status"] in FINISHED]
    if unit.points:
        todo = [p for p in unit.points if not any(_same(p, r["params_json"]) for r in done)]
        total = len(unit.points)
    else:
        todo, total = [], unit.trials
    remaining = len(todo) if unit.points else max(0, unit.trials - len(done))
    if done:
        verb = "reused" if unit.arm == "student-only" else "resumed"
        say(f"[{unit.name}] {unit.arm}: {len(done)}/{total} trials already in the database "
            f"({unit.arm_id}), {verb}; {remaining} to run")
    if remaining:
        launch(cfg, protocol, unit, todo, remaining, done, command)
    return [r for r in store.query(sweep_id=unit.arm_id, stage=unit.name) if r["status"] in FINISHED]


def launch(cfg, protocol: Protocol, unit: Unit, todo, remaining: int, done, command: str) -> None:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    sweep = cfg["sweep"]
    budget = cfg["budget"]
    evaluations = math.ceil(budget["iterations"] / budget["eval_interval"])
    spec = {"base": unit.base, "fixed": unit.fixed, "arm_id": unit.arm_id, "stage": unit.name,
            "split": unit.stage.split, "threads": max(1, int(sweep["cpus_per_trial"])),
            "collapse_fraction": sweep["collapse_fraction"], "command": command,
            "gpu_share": sweep["gpus_per_trial"] if 0 < sweep["gpus_per_trial"] < 1 else None}
    if unit.points:
        param_space = {SEARCH_KEY: tune.grid_search(todo)}
        search_alg, num_samples = None, 1
    else:
        param_space = {path: domain(dist) for path, dist in unit.space.items()}
        searched = list(unit.space)
        previous = [{k: r["params_json"][k] for k in searched} for r in done]
        rewards = [r["final_miou"] if r["status"] != "failed" and r["final_miou"] is not None else 0.0 for r in done]
        sampler = optuna.samplers.TPESampler(seed=protocol.sampler_seed,
                                             n_startup_trials=protocol.tpe_startup_trials)
        search_alg = OptunaSearch(metric="miou", mode="max", sampler=sampler,
                                  points_to_evaluate=previous or None, evaluated_rewards=rewards or None)
        num_samples = remaining
    scheduler = (ASHAScheduler(time_attr="training_iteration", metric="miou", mode="max", max_t=evaluations,
                               grace_period=protocol.asha["grace_period"],
                               reduction_factor=protocol.asha["reduction_factor"],
                               stop_last_trials=False)  # a trial that reaches the end writes its own row
                 if unit.stage.early_stopping == "asha" else FIFOScheduler())
    resources = {"cpu": sweep["cpus_per_trial"], "gpu": sweep["gpus_per_trial"]}
    name = f"{unit.arm_id}-{unit.name}-{int(time.time())}".replace(":", "_").replace("[", "_").replace("]", "")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, spec=spec), resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=num_samples, search_alg=search_alg, scheduler=scheduler,
                                    max_concurrent_trials=sweep["max_concurrent_trials"], reuse_actors=True,
                                    trial_dirname_creator=lambda t: t.trial_id, trial_name_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(cfg["paths"]["results"]) / "ray" / "runs"),
                                  failure_config=tune.FailureConfig(max_failures=sweep["max_failures"]),
                                  callbacks=[RecordCallback(cfg, unit, evaluations, command)], verbose=0))
    tuner.fit()


def domain(dist: Dict[str, Any]):
    from ray import tune

    kind, values = next(iter(dist.items()))
    return {"loguniform": lambda: tune.loguniform(*values), "uniform": lambda: tune.uniform(*values),
            "choice": lambda: tune.choice(values)}[kind]()


def pick_winner(rows: List[Dict[str, Any]], unit: Unit) -> Winner:
    completed = [r for r in rows if r["status"] == "completed" and r["final_miou"] is not None]
    if unit.stage.search == "rerun":
        return Winner(unit.fixed, statistics.mean(r["final_miou"] for r in completed) if completed else None,
                      unit.lineage)
    if not completed:
        raise SweepError(f"stage {unit.name} ({unit.arm}): no trial completed "
                           f"({len(rows)} pruned or failed); see their failure reasons in the database")
    best = max(completed, key=lambda r: r["final_miou"])
    return Winner(dict(best["params_json"]), best["final_miou"],
                  {**unit.lineage, **{p: unit.name for p in unit.space}})


def merge_each(stage: Stage, results: List[Winner], fixed, lineage) -> Winner:
    """`each` stage: every path keeps the value its own sub-stage chose (not yet evaluated together)."""
    params, lin = dict(fixed), dict(lineage)
    for w in results:
        for p, stage_name in w.lineage.items():
            if stage_name.startswith(stage.name + "["):
                params[p] = w.params[p]
                lin[p] = stage_name
    best = max(results, key=lambda w: w.miou or 0)
    # evaluated only if a single change was searched; otherwise the combine stage evaluates it
    return Winner(params, best.miou if params == best.params else None, lin, best_single=best)


def combine_stage(cfg, protocol, stage, arm, arm_id, base, fixed, lineage, best_single: Optional[Winner],
                  store, command) -> Winner:
    """The isolated winners together, one trial; kept only if it beats the best single change."""
    if best_single is None or best_single.params == fixed:
        return Winner(fixed, best_single.miou if best_single else None, lineage)
    unit = Unit(arm, arm_id, stage, stage.name, base, {}, lineage, {}, [fixed], 0)
    together = run_unit(cfg, protocol, unit, store, command)
    if together.miou is not None and (best_single.miou is None or together.miou >= best_single.miou):
        return Winner(fixed, together.miou, lineage)
    say(f"[{stage.name}] {arm}: the winners together ({100 * (together.miou or 0):.2f}) do not beat the best "
        f"single change ({100 * best_single.miou:.2f}); keeping that one")
    return best_single


def _same(a: Dict[str, Any], b: Optional[Dict[str, Any]]) -> bool:
    if b is None:
        return False
    return all(k in b and (b[k] == v or isinstance(v, float) and math.isclose(b[k], v, rel_tol=1e-9))
               for k, v in a.items())


# ---------------------------------------------------------------------------------- recording
def _callback_base():
    from ray.tune import Callback

    return Callback


class RecordCallback(_callback_base()):
    """Driver side: one line per finished trial; rows for trials stopped by ASHA or crashed."""

    def __init__(self, cfg, unit: Unit, evaluations: int, command: str):
        self.cfg, self.unit, self.evaluations, self.command = cfg, unit, evaluations, command
        self.store = ResultsStore(cfg["store"]["url"])
        self.started: Dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=f"trial crashed {self.cfg['sweep']['max_failures'] + 1} time(s): "
                                  f"{_error_text(trial)}")

    def _finish(self, trial, error: Optional[str]) -> None:
        run_id = run_id_for(self.unit.arm_id, self.unit.name, trial.trial_id)
        row = self.store.get(run_id)
        last = trial.last_result or {}
        if row is None:
            from harness.sweep.trial import apply_params, trial_params

            params = trial_params(trial.config, self.unit.fixed)
            cfg = apply_params(self.unit.base, params)
            status = "failed" if error else "pruned"
            reason = error or (f"stopped by ASHA after {last.get('iteration')} iterations"
                               f" ({last.get('training_iteration')} of {self.evaluations} evaluations)")
            row = {"run_id": run_id, "command": self.command, "config_json": cfg, "arm": self.unit.arm,
                   "methods": ",".join(methods_of(cfg)), "dataset": cfg["dataset"]["name"],
                   "student": cfg["student"]["name"], "teacher": cfg["teacher"]["name"] if cfg["method"] else None,
                   "seed": cfg["seed"], "split": self.unit.stage.split, "status": status, "failure_reason": reason,
                   "sweep_id": self.unit.arm_id, "stage": self.unit.name, "trial_id": trial.trial_id,
                   "params_json": params, "final_miou": last.get("miou"), "best_miou": last.get("miou"),
                   "iterations": last.get("iteration"),
                   "wall_time_s": time.time() - self.started.get(trial.trial_id, time.time())}
            from harness.config import run_hash

            row["config_hash"] = run_hash(cfg)
            self.store.append(row)
        shown = {k.split(".")[-1] if k.startswith("optim.") else k: _fmt(v)
                 for k, v in row["params_json"].items() if k not in self.unit.fixed or k in self.unit.space or k == "seed"}
        miou = row["final_miou"]
        say(f"  [{self.unit.name}] {self.unit.arm:<12} {trial.trial_id}  "
            f"{' '.join(f'{k}={v}' for k, v in shown.items()):<40} {self.unit.stage.split} mIoU "
            f"{'  n/a' if miou is None else f'{100 * miou:5.2f}'}  {row['status']}"
            + (f" ({row['failure_reason']})" if row["status"] == "failed" else ""))


def _error_text(trial) -> str:
    text = getattr(trial, "error_msg", None) or ""
    if not text and getattr(trial, "error_file", None) and Path(trial.error_file).exists():
        text = Path(trial.error_file).read_text()
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else "unknown error"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------- summaries
def stage_summary(store: ResultsStore, arm_id: str, stage: Stage, arm: str, winner: Winner, wall: float) -> None:
    rows = [r for r in store.query(sweep_id=arm_id) if r["stage"] == stage.name or
            (r["stage"] or "").startswith(stage.name + "[")]
    counts = {s: sum(r["status"] == s for r in rows) for s in FINISHED}
    energy = sum(r["energy_kwh"] or 0 for r in store.query(sweep_id=arm_id))
    chosen = {p: _fmt(v) for p, v in winner.params.items() if winner.lineage.get(p) and
              winner.lineage[p].split("[")[0] == stage.name}
    say(f"== stage {stage.name} ({arm}): {counts['completed']} done, {counts['pruned']} pruned, "
        f"{counts['failed']} failed; best {stage.split} mIoU "
        f"{'n/a' if winner.miou is None else f'{100 * winner.miou:.2f}'}; chose {chosen or '-'}; "
        f"{wall:.0f} s; energy so far {1000 * energy:.2f} Wh")


def final_summary(store: ResultsStore, ids: Dict[str, str], protocol: Protocol,
                  winners: Dict[Tuple[str, str], Winner], wall: float) -> Dict[str, Any]:
    rerun_stage = next((s.name for s in reversed(protocol.stages) if s.search == "rerun"), None)
    arms = {}
    for arm, arm_id in ids.items():
        rows = [r for r in store.query(sweep_id=arm_id, stage=rerun_stage) if r["status"] == "completed"]
        values = [r["final_miou"] for r in rows]
        final = winners.get((arm, rerun_stage))
        arms[arm] = {"arm_id": arm_id, "val_miou": values, "params": final.params if final else None,
                     "lineage": final.lineage if final else None,
                     "mean": statistics.mean(values) if values else None,
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    say(f"\n== {protocol.name}: tuned arms side by side (val mIoU over rerun seeds), {wall / 60:.1f} min")
    for arm, a in arms.items():
        tuned = {k: _fmt(v) for k, v in (a["params"] or {}).items() if k != "seed"}
        mean = "n/a" if a["mean"] is None else f"{100 * a['mean']:.2f} +- {100 * a['std']:.2f} (n={len(a['val_miou'])})"
        say(f"  {arm:<13} {mean:<24} {tuned}")
    s, d = arms["student-only"]["mean"], arms["distilled"]["mean"]
    lift = None if s is None or d is None else d - s
    say(f"  lift of the distilled arm over the tuned student-only arm: "
        f"{'n/a' if lift is None else f'{100 * lift:+.2f} mIoU points'}")
    return {"arms": arms, "lift": lift, "wall_time_s": wall}


def say(text: str) -> None:
    print(text, flush=True, file=sys.stdout)
