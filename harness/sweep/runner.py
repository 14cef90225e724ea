"""Run a tuning protocol for both arms of a comparison, stage by stage.

    distilled arm, each search stage; then student-only arm, each search stage; then reruns:
        params inherited = winners of the stages it inherits (lineage: which stage chose what)
        done   = rows of (arm, stage) already in the results database   -> resume and reuse
        run the missing trials as one Ray Tune experiment (OptunaSearch/TPE or a grid, guarded ASHA)
        winner = the best completed trial on the tune split (failed/pruned trials never win)
    student-only `grow` stage: its TPE sequence continues until the arm's tuning budget (trials and
        iterations) reaches the distilled arm's; the comparison uses its first N trials (budget.py)
    reruns `seeds: auto`: both arms add seed pairs until the paired interval is narrow enough
        (`run_auto_reruns`); `compute_matched`: the student-only winner rerun on the reruns' seeds with
        its iterations scaled by the measured cost ratio (`run_compute_matched`)

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
from harness.sweep.budget import (Budget, arm_budget, at_least, auto_seeds_decision, control_plan, growth_step,
                                  measured_cost_ratio, rank_agreement, run_cost, sequence_order, stands_for, unequal)
from harness.sweep.protocol import (COMPUTE_MATCHED, RERUN, Protocol, Stage, check_paths, expand_space,
                                    hashed_stages, load_protocol, parse_stage_name, sub_stage_name)
from harness.sweep.studies import Studies
from harness.sweep.trial import SEARCH_KEY, TrialSpec, trainable

FINISHED = ("completed", "pruned", "failed")


class SweepError(RuntimeError):
    """A sweep that cannot go on (every trial of a stage failed); the database keeps the reasons."""


@dataclass
class Winner:
    params: Dict[str, Any]
    miou: Optional[float]
    lineage: Dict[str, str] = field(default_factory=dict)  # path -> stage that chose its value
    best_single: Optional["Winner"] = None  # `each` stages: the best sub-stage, for `combine`
    run_id: Optional[str] = None            # the row that won (search stages)


@dataclass
class StageRun:
    """One Ray Tune experiment: a stage (or one sub-stage of an `each` stage) for one arm."""
    arm: str
    arm_id: str
    stage: Stage
    name: str                       # the stored stage name: stage, or sub_stage_name(stage, path)
    base: Dict[str, Any]            # the arm's config
    fixed: Dict[str, Any]           # inherited winners
    lineage: Dict[str, str]
    space: Dict[str, Dict[str, Any]]
    points: List[Dict[str, Any]]    # grid / combine / rerun candidates
    trials: int                     # tpe: trials to run (points: one per point)
    extra: Dict[str, Any] = field(default_factory=dict)  # what its rows keep besides the stage (extra_json)
    match: Dict[str, Any] = field(default_factory=dict)  # extra_json values its rows must have (compute_matched)

    def spec(self, sweep: "Sweep") -> TrialSpec:
        s = sweep.cfg["sweep"]
        extra = dict(self.extra)
        if self.stage.is_search:
            cut = sweep.cuts.get(self.arm)
            extra["first_cut"] = {**cut, "pruning": self.stage.prunes} if cut else None
        return TrialSpec(base=self.base, fixed=self.fixed, arm_id=self.arm_id, stage=self.name,
                         stage_kind=self.stage.search, split=self.stage.split,
                         threads=max(1, int(s["cpus_per_trial"])), collapse_fraction=s["collapse_fraction"],
                         command=sweep.command,
                         gpu_share=s["gpus_per_trial"] if 0 < s["gpus_per_trial"] < 1 else None,
                         param_kinds=param_kinds([*self.fixed, *self.space, *(k for p in self.points for k in p)]),
                         extra_fields=extra)

    def full(self, point: Dict[str, Any]) -> Dict[str, Any]:
        """The whole parameter set of one of its points (inherited winners included): a stored row is
        this point's only if its parameters are these (a rerun of another winner is another row)."""
        return {**self.fixed, **point}


@dataclass
class Sweep:
    """What every stage of one sweep shares."""
    cfg: Dict[str, Any]
    protocol: Protocol
    ids: Dict[str, str]             # arm -> arm id
    store: ResultsStore
    command: str = ""
    cuts: Dict[str, Optional[Dict[str, int]]] = field(default_factory=dict)  # arm -> first cut (first_cut)
    tuning: Dict[str, Dict[str, List[Dict[str, Any]]]] = field(default_factory=dict)  # arm -> unit -> counted rows
    seeds: Dict[str, List[int]] = field(default_factory=dict)  # rerun stage -> the seeds both arms reran
    matched: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # measure -> compute-matched result
    studies: Optional[Studies] = None  # the Optuna storage every finished trial is copied to (studies.py)
    progress: Optional["Progress"] = None  # counts for the per-trial progress line (trials, ETA)

    def budget(self, arm: str) -> Budget:
        """The arm's tuning budget so far: the rows its winners were chosen from."""
        return arm_budget(r for rows in self.tuning.get(arm, {}).values() for r in rows)


def param_kinds(paths) -> Dict[str, str]:
    """Method path -> its kind (`harness.methods.path_kind`) for the method paths among `paths`."""
    from harness.methods import path_kind

    return {p: path_kind(p) for p in sorted(set(paths)) if p.startswith("method.")}


def arm_ids(cfg: Dict[str, Any], protocol: Protocol) -> Dict[str, str]:
    """Arm ids: what defines an arm's rows. The student-only arm's is keyed by what its trials depend
    on (data, student, budget, optimiser, seed, and the protocol's parts that concern it: its stages,
    sampler, early stopping); not by the distilled arm's stages, nor by how far its sequence has grown,
    so every comparison on the same key grows one sequence."""
    common = {k: cfg[k] for k in ("dataset", "student", "budget", "optim", "seed", "train_split")}
    student = stable_hash({**common, "protocol": student_protocol(protocol)})
    stages = hashed_stages(protocol.raw)  # not the compute-matched controls: they add rows, change none
    common["protocol"] = protocol.raw if stages == protocol.raw.get("stages") else {**protocol.raw, "stages": stages}
    distilled = stable_hash({**common, "teacher": cfg["teacher"], "method": cfg["method"]})
    return {"student-only": f"student-only:{student}",
            "distilled": f"distilled:{'+'.join(methods_of(cfg))}:{distilled}"}


def student_protocol(protocol: Protocol) -> Dict[str, Any]:
    """The part of the protocol the student-only arm's rows depend on."""
    raw = protocol.raw
    return {"metric": raw.get("metric", "miou"), "sampler_seed": raw.get("sampler_seed", 0),
            "tpe_startup_trials": raw.get("tpe_startup_trials", 3), "asha": protocol.asha,
            "stages": [s for s in hashed_stages(raw) if "student-only" in (s.get("arms") or [])]}


def warmup_end(cfg: Dict[str, Any]) -> int:
    """The last iteration of the longest warm-up among the selected methods (0: none): a method setting
    named `*warmup_fraction*` is a fraction of training, `*warmup_iter*` a number of iterations
    (heteroakd.warmup_fraction is the only one today)."""
    iterations, end = cfg["budget"]["iterations"], 0
    for settings in (cfg.get("method") or {}).values():
        for key, value in (settings or {}).items():
            if "warmup" not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if "fraction" in key:
                end = max(end, math.ceil(value * iterations))
            elif "iter" in key:
                end = max(end, int(value))
    return end


def first_cut(cfg: Dict[str, Any], protocol: Protocol, arm: str) -> Optional[Dict[str, int]]:
    """The first evaluation at which early stopping may stop an arm's trial: not before the protocol's
    `asha.grace_period` evaluations, not before `asha.min_fraction` of training, and after the end of
    every selected method's warm-up (a cut at the very end of a warm-up would judge a run that has not
    distilled yet). None when only the last evaluation is left (then nothing is pruned).
    {"evaluation": k (1-based), "iteration": its iteration}."""
    b = cfg["budget"]
    iterations, every = b["iterations"], b["eval_interval"]
    evaluations = math.ceil(iterations / every)
    floor = protocol.asha["min_fraction"] * iterations
    warm = warmup_end(arm_config(cfg, arm))
    for k in range(1, evaluations):  # the last evaluation is the end of training: no cut there
        it = min(k * every, iterations)
        if k >= protocol.asha["grace_period"] and it >= floor and it > warm:
            return {"evaluation": k, "iteration": it}
    return None


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


def run_sweep(cfg: Dict[str, Any], command: str = "", planned_trials: int = 0) -> Dict[str, Any]:
    protocol, ids = prepare(cfg)
    from harness.sweep.ray_runtime import check_address, ray_session

    if cfg["sweep"]["ray"]["address"]:
        check_address(cfg["sweep"]["ray"]["address"])
    from harness.engine.record import open_store

    store = open_store(cfg)
    say(f"sweep '{protocol.name}' for {'+'.join(methods_of(cfg))}: {cfg['student']['name']} <- "
        f"{cfg['teacher']['name']} on {cfg['dataset']['name']} (budget {cfg['budget']['name']})")
    say(f"  arms: {ids['student-only']}  |  {ids['distilled']}")

    from harness.engine.teacher import teacher_for

    if any("distilled" in s.arms for s in protocol.stages):  # trained once, before any trial
        teacher_for(cfg, command)

    sweep = Sweep(cfg, protocol, ids, store, command, cuts={arm: first_cut(cfg, protocol, arm) for arm in ids},
                  studies=Studies(cfg["sweep"].get("optuna_storage")), progress=Progress(planned_trials))
    if sweep.studies.url:
        from harness.store import shown_url

        say(f"  optuna studies: {shown_url(sweep.studies.url)}  (optuna-dashboard {shown_url(sweep.studies.url)})")
    winners: Dict[Tuple[str, str], Winner] = {}
    started = time.time()
    searches = [s for s in protocol.stages if s.is_search]
    with ray_session(cfg["sweep"]["ray"]["address"], cfg["sweep"]["ray"]["num_cpus"], cfg["paths"]["results"]):
        # the distilled arm first: the student-only arm grows to its budget (protocol.grow_stage)
        for arm in ("distilled", "student-only"):
            for stage in searches:
                if arm in stage.arms:
                    winners[(arm, stage.name)] = run_stage(sweep, stage, arm, winners)
        comparison = compare(sweep, winners)
        for stage in protocol.stages:
            if stage.auto_seeds:
                winners.update(run_auto_reruns(sweep, stage, winners, comparison["extra"]))
            elif stage.search == RERUN:
                for arm in stage.arms:
                    winners[(arm, stage.name)] = run_stage(sweep, stage, arm, winners, comparison["extra"][arm])
            elif stage.search == COMPUTE_MATCHED:
                sweep.matched.update(run_compute_matched(sweep, stage, winners, comparison["extra"]["student-only"]))
    return final_summary(sweep, winners, time.time() - started, comparison)


def compare(sweep: Sweep, winners: Dict[Tuple[str, str], Winner]) -> Dict[str, Any]:
    """Both arms' tuning budgets once every search stage has run, the unequal-budget mark, the rank
    agreement of every search stage, and what each arm's rerun rows record of them (extra_json):

    - distilled reruns: `student_arm` {arm_id, trials (N: the student's first N trials of its growing
      stage), stage, iterations, kwh, winner_run_id}, `tuning_budget` {arm: Budget dict},
      `unequal_tuning_budget` (None or the mark with both numbers), `rank_agreement` {arm: {stage: ...}};
    - student-only reruns: `winner_run_id`, `tuned_trials` (N), and the same three.
    """
    budgets = {arm: sweep.budget(arm) for arm in ("student-only", "distilled")}
    mark = unequal(budgets["student-only"], budgets["distilled"]) if sweep.tuning.get("distilled") else None
    grow = sweep.protocol.grow_stage
    student_rows = sweep.tuning.get("student-only", {})
    n = len(student_rows.get(grow.name, [])) if grow is not None else sum(len(r) for r in student_rows.values())
    last = [s.name for s in sweep.protocol.stages if s.is_search and "student-only" in s.arms]
    student_winner = winners.get(("student-only", last[-1])) if last else None
    agreement = {arm: {unit: rank_agreement(rows, (sweep.cuts.get(arm) or {}).get("iteration"))
                       for unit, rows in units.items()}
                 for arm, units in sweep.tuning.items()}
    common = {"tuning_budget": {a: b.as_dict() for a, b in budgets.items()}, "unequal_tuning_budget": mark,
              "rank_agreement": agreement}
    winner_id = student_winner.run_id if student_winner else None
    student_arm = {"arm_id": sweep.ids["student-only"], "trials": n, "stage": grow.name if grow else None,
                   "iterations": budgets["student-only"].iterations, "kwh": budgets["student-only"].kwh,
                   "winner_run_id": winner_id}
    return {"budgets": budgets, "unequal": mark, "student_arm": student_arm, "rank_agreement": agreement,
            "extra": {"distilled": {**common, "student_arm": student_arm},
                      "student-only": {**common, "winner_run_id": winner_id, "tuned_trials": n}}}


def inherited(stage: Stage, arm: str, winners: Dict[Tuple[str, str], Winner]):
    """(fixed params, lineage, parent winners) a stage of an arm starts from."""
    fixed, lineage = {}, {}
    parents = [winners[(arm, p)] for p in stage.inherits if (arm, p) in winners]  # others: not this arm's
    for parent in parents:
        fixed.update(parent.params)
        lineage.update(parent.lineage)
    return fixed, lineage, parents


def run_stage(sweep: Sweep, stage: Stage, arm: str, winners: Dict[Tuple[str, str], Winner],
              extra: Optional[Dict[str, Any]] = None) -> Winner:
    fixed, lineage, parents = inherited(stage, arm, winners)
    started = time.time()
    if stage.search == "combine":
        singles = [p.best_single for p in parents if p.best_single is not None]
        result = combine_stage(sweep, stage, arm, fixed, lineage, singles[-1] if singles else None)
    else:
        runs = stage_runs(sweep.cfg, stage, arm, sweep.ids[arm], fixed, lineage)
        if not runs:
            say(f"[{stage.name}] {arm}: nothing to search for {'+'.join(methods_of(sweep.cfg))} (no matching "
                f"parameters), winners carried over")
            return Winner(fixed, None, lineage)
        for r in runs:
            r.extra = dict(extra or {})
            if stage.search == RERUN:
                sweep.seeds[stage.name] = [p["seed"] for p in r.points]
        if stage.grow and arm == "student-only":
            results = [grow_unit(sweep, r) for r in runs]
        else:
            results = [run_unit(sweep, r) for r in runs]
        result = merge_each(stage, results, fixed, lineage) if stage.each else results[0]
    stage_summary(sweep, stage, arm, result, time.time() - started)
    return result


def run_auto_reruns(sweep: Sweep, stage: Stage, winners: Dict[Tuple[str, str], Winner],
                    extras: Dict[str, Dict[str, Any]]) -> Dict[Tuple[str, str], Winner]:
    """`seeds: auto`: both arms rerun seeds 1..min_seeds, then one more seed pair at a time until the
    paired interval of the lift is narrow enough or max_seeds ran (`budget.auto_seeds_decision`: the
    width only, never p). The decision after n seeds reads only seeds 1..n, so a resumed sweep (or a
    student arm that another comparison already gave more seeds) stops where this one did. Every rerun
    row of both arms records `extra_json.seeds_rule` with why it stopped."""
    low, top = auto_seed_range(sweep.cfg, stage)
    started = time.time()
    units: Dict[str, StageRun] = {}
    for arm in ("distilled", "student-only"):
        fixed, lineage, _ = inherited(stage, arm, winners)
        unit = stage_runs(sweep.cfg, stage, arm, sweep.ids[arm], fixed, lineage)[0]
        unit.extra = {**extras[arm], "seeds_rule": stage.seeds_rule}
        units[arm] = unit
    n, rows = low, {}
    while True:
        values = {}
        for arm, unit in units.items():
            unit.points = seed_points(sweep.cfg, n)
            rows[arm] = unit_rows(sweep, unit, quiet=n != low)
            values[arm] = {int(r["seed"]): r["final_miou"] for r in rows[arm]
                           if r["status"] == "completed" and r["final_miou"] is not None}
        why = auto_seeds_decision(values["distilled"], values["student-only"], n, stage.target_halfwidth, top, low)
        if why:
            break
        say(f"[{stage.name}] seeds: auto: {n} seeds, paired half-width above {stage.target_halfwidth:g}: one more seed pair")
        n += 1
    if top < stage.max_seeds and why.startswith("max_seeds"):
        why += f" (budget {sweep.cfg['budget']['name']} caps reruns at {top} seeds: budget.sweep_rerun_seeds)"
    say(f"[{stage.name}] seeds: auto stopped: {why}")
    rule = {**stage.seeds_rule, "stopped": why, "seeds": n, "comparison": sweep.ids["distilled"]}
    for arm_rows in rows.values():
        for r in arm_rows:
            if (r.get("extra_json") or {}).get("seeds_rule") != rule:
                sweep.store.update(r["run_id"], extra_json={**(r.get("extra_json") or {}), "seeds_rule": rule})
    sweep.seeds[stage.name] = [p["seed"] for p in seed_points(sweep.cfg, n)]
    out = {}
    for arm, unit in units.items():
        out[(arm, stage.name)] = winner = pick_winner(rows[arm], unit)
        stage_summary(sweep, stage, arm, winner, time.time() - started)
    return out


def rerun_rows(sweep: Sweep, stage: str, arm: str, winner: Optional[Winner],
               seeds: Optional[List[int]] = None) -> List[Dict[str, Any]]:
    """The completed rerun rows of an arm's winner in a rerun stage (on the given seeds, when given)."""
    return [r for r in sweep.store.query(sweep_id=sweep.ids[arm], stage=stage)
            if r["status"] == "completed" and r["final_miou"] is not None
            and (winner is None or _same(winner.params, r["params_json"]))
            and (seeds is None or r["seed"] in seeds)]


def run_compute_matched(sweep: Sweep, stage: Stage, winners: Dict[Tuple[str, str], Winner],
                        extra: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """The compute-matched control: per measure, the student-only arm's tuned configuration (the winner
    whose reruns the comparison uses) rerun on the same seeds and split as the rerun stage it matches,
    with `budget.iterations` scaled by the cost ratio distilled / student-only measured on the two arms'
    completed reruns of this comparison (`budget.measured_cost_ratio`), the evaluation interval scaled
    alike (`budget.scaled_budget`). Rows: arm student-only, stage = this stage, extra_json {stage_kind:
    compute_matched, matched_to: the distilled arm id, measure, cost_ratio, iterations, eval_interval,
    device, ...}. Resumable: a row stored for (matched_to, measure, seed) is kept, and a measure that
    has rows keeps their ratio and iterations (the seeds added later run the same length). Two measures
    whose ratios scale to the same iterations and interval share one set of runs (`budget.control_plan`;
    the rows list the other measure in `also_measures`)."""
    rerun = stage.matches
    student, distilled = winners.get(("student-only", rerun)), winners.get(("distilled", rerun))
    seeds = sweep.seeds.get(rerun) or []
    d_rows = rerun_rows(sweep, rerun, "distilled", distilled, seeds)
    s_rows = rerun_rows(sweep, rerun, "student-only", student, seeds)
    devices = sorted({str((r.get("extra_json") or {}).get("device")) for r in d_rows + s_rows
                      if (r.get("extra_json") or {}).get("device")})
    b = sweep.cfg["budget"]
    stored = [(r.get("extra_json") or {}) for r in sweep.store.query(sweep_id=sweep.ids["student-only"], stage=stage.name)
              if (r.get("extra_json") or {}).get("matched_to") == sweep.ids["distilled"]
              and student is not None and _same(student.params, r["params_json"])]
    measured = {m: measured_cost_ratio(d_rows, s_rows, m) for m in stage.measures}
    plans = control_plan(stage.measures, stored, measured, b["iterations"], b["eval_interval"], stage.share_within)
    by_measure = {p.measure: p for p in plans}
    out: Dict[str, Dict[str, Any]] = {}
    for plan in plans:
        started, measure = time.time(), plan.measure
        ratio, iterations, every = plan.ratio, plan.iterations, plan.eval_interval
        if plan.skipped is not None or student is None or not seeds:
            say(f"[{stage.name}] {measure}: skipped: " + (plan.skipped or f"no reruns of both arms in stage {rerun}"))
            continue
        if plan.shared_with is not None:
            continue  # reported after the control whose runs it shares
        if plan.kept:
            kept = sum(1 for e in stored if stands_for(e, measure) is not None)
            say(f"[{stage.name}] {measure}: cost ratio {ratio:.3f}x and {iterations} iterations kept from the "
                f"{kept} row(s) already stored for {sweep.ids['distilled']}")
        match = {"matched_to": sweep.ids["distilled"], "measure": measure}
        also = {m: {"cost_ratio": by_measure[m].ratio, "iterations": by_measure[m].iterations,
                    "eval_interval": by_measure[m].eval_interval} for m in plan.also}
        base = arm_config(sweep.cfg, "student-only")
        base = {**base, "budget": {**base["budget"], "iterations": iterations, "eval_interval": every}}
        unit = StageRun(arm="student-only", arm_id=sweep.ids["student-only"], stage=stage, name=stage.name, base=base,
                        fixed=dict(student.params), lineage=dict(student.lineage), space={},
                        points=[{"seed": s} for s in seeds], trials=0, match=match)
        unit.extra = {**extra, **match, "cost_ratio": ratio, "iterations": iterations, "eval_interval": every,
                      "base_iterations": b["iterations"], "base_eval_interval": b["eval_interval"],
                      "device": ", ".join(devices) or None, "matched_stage": rerun,
                      "cost": {"distilled": run_cost(d_rows, measure), "student-only": run_cost(s_rows, measure),
                               "runs": {"distilled": len(d_rows), "student-only": len(s_rows)}}}
        if also:
            unit.extra["also_measures"] = also
        rows = unit_rows(sweep, unit)
        done = [r for r in rows if r["status"] == "completed" and r["final_miou"] is not None]
        by_seed = {int(r["seed"]): r["final_miou"] for r in done}
        out[measure] = {"ratio": ratio, "iterations": iterations, "eval_interval": every, "device": unit.extra["device"],
                        "by_seed": by_seed}
        mean = statistics.mean(r["final_miou"] for r in done) if done else None
        say(f"== stage {stage.name} (student-only, {measure}): cost ratio {ratio:.3f}x -> {iterations} iterations "
            f"(evaluation every {every}); {len(done)}/{len(seeds)} seeds done; {stage.split} mIoU "
            f"{'n/a' if mean is None else f'{100 * mean:.2f}'}; {time.time() - started:.0f} s")
        for m in [p.measure for p in plans if p.shared_with == measure]:
            shared = by_measure[m]
            out[m] = {"ratio": shared.ratio, "iterations": iterations, "eval_interval": every,
                      "device": unit.extra["device"], "by_seed": dict(by_seed), "shared_with": measure}
            say(f"== stage {stage.name} (student-only, {m}): cost ratio {shared.ratio:.3f}x -> {iterations} iterations "
                f"(evaluation every {every}): within {100 * stage.share_within:g} % of the {measure} ratio, the "
                f"{measure} control's runs stand for both; nothing trained again")
    return out


def stage_runs(cfg: Dict[str, Any], stage: Stage, arm: str, arm_id: str, fixed: Optional[Dict[str, Any]] = None,
               lineage: Optional[Dict[str, str]] = None) -> List[StageRun]:
    """The experiments of a search or rerun stage for one arm: one, or one per path of an `each`
    stage; none when the arm has nothing to search there. (`combine` stages: `combine_stage`.)"""
    base = arm_config(cfg, arm)
    space = expand_space(stage.space, base)
    if not stage.is_search and stage.search != RERUN:
        return []   # compute_matched: run_compute_matched builds its own units
    if stage.search != RERUN and not space:
        return []
    groups = [{p: d} for p, d in space.items()] if stage.each else [space]
    runs = []
    for group in groups:
        points, trials = trial_points(cfg, stage, group)
        runs.append(StageRun(arm=arm, arm_id=arm_id, stage=stage, space=group, points=points, trials=trials,
                             name=sub_stage_name(stage.name, next(iter(group))) if stage.each else stage.name,
                             base=base, fixed=dict(fixed or {}), lineage=dict(lineage or {})))
    return runs


def trial_points(cfg: Dict[str, Any], stage: Stage, space: Dict[str, Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], int]:
    """(points, trials) of one experiment: the rerun seeds or the grid's points, or TPE's trial count;
    capped by the budget's `sweep_rerun_seeds` / `sweep_max_trials` (smoke sweeps)."""
    cap = cfg["budget"]["sweep_max_trials"]
    if stage.search == RERUN:
        seeds = auto_seed_range(cfg, stage)[0] if stage.auto_seeds else stage.seeds
        seeds = min(seeds, cfg["budget"]["sweep_rerun_seeds"] or seeds)
        return seed_points(cfg, seeds), 0
    if stage.search == "grid":
        points: List[Dict[str, Any]] = [{}]
        for path, dist in space.items():
            points = [{**p, path: v} for p in points for v in dist["grid"]]
        return (points[:cap] if cap else points), 0
    return [], (min(stage.trials, cap) if cap else stage.trials)


def seed_points(cfg: Dict[str, Any], n: int) -> List[Dict[str, Any]]:
    """The first n rerun seeds: seed + 1, seed + 2, ... (fresh seeds: not the search seed)."""
    return [{"seed": cfg["seed"] + 1 + i} for i in range(n)]


def auto_seed_range(cfg: Dict[str, Any], stage: Stage) -> Tuple[int, int]:
    """(min_seeds, max_seeds) of a `seeds: auto` stage, both capped by `budget.sweep_rerun_seeds`."""
    cap = cfg["budget"]["sweep_rerun_seeds"]
    top = min(stage.max_seeds, cap) if cap else stage.max_seeds
    return min(stage.min_seeds, top), top


def run_unit(sweep: Sweep, unit: StageRun) -> Winner:
    """One stage (or sub-stage) of one arm: its winner among the rows it counts."""
    return pick_winner(unit_rows(sweep, unit), unit)


def unit_rows(sweep: Sweep, unit: StageRun, quiet: bool = False) -> List[Dict[str, Any]]:
    """Run what is missing of one stage (or sub-stage) of one arm; the rows it counts (`within_budget`),
    kept in `sweep.tuning` for the budgets. Two sweeps that share an arm (two methods' sweeps of the
    same student, started together) take turns: the second waits for the first, then reuses its rows."""
    from filelock import FileLock

    locks = Path(sweep.cfg["paths"]["results"]) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    name = stable_hash([unit.arm_id, unit.name], 16)
    with FileLock(str(locks / f"{name}.lock")):
        rows = within_budget(_run_unit(sweep, unit, quiet), unit)
    if unit.stage.is_search:
        sweep.tuning.setdefault(unit.arm, {})[unit.name] = rows
    return rows


def grow_unit(sweep: Sweep, unit: StageRun) -> Winner:
    """The student-only arm's growing TPE stage: its sequence (stored order) is continued until the
    arm's tuning budget, this stage's first N trials plus its other search stages, reaches the
    distilled arm's in trials and in iterations; N is the smallest such prefix (`budget.parity_prefix`
    over the stored rows: each step below adds at most the trials still missing). Rows a larger
    comparison already ran are reused, never run again. If failing trials keep the arm short after
    3x the distilled arm's trials, it stops there (the comparison is then marked unequal)."""
    distilled = sweep.budget("distilled")
    other = [r for name, rows in sweep.tuning.get(unit.arm, {}).items() if name != unit.name for r in rows]
    per_trial = sweep.cfg["budget"]["iterations"]
    start = unit.trials
    cap = max(start, 3 * distilled.started)
    while True:
        rows = unit_rows(sweep, unit, quiet=unit.trials != start)
        mine = arm_budget([*rows, *other])
        if at_least(mine, distilled) or unit.trials >= cap or len(rows) < unit.trials:
            break
        unit.trials = min(cap, unit.trials + growth_step(mine, distilled, per_trial))
    if unit.trials != start:
        say(f"[{unit.name}] student-only: its TPE sequence counts {unit.trials} trials here (the protocol's "
            f"{start}, grown to the distilled arm's budget): {mine.text()}; distilled: {distilled.text()}")
    return pick_winner(rows, unit)


def within_budget(rows: List[Dict[str, Any]], unit: StageRun) -> List[Dict[str, Any]]:
    """The rows a winner may come from: the first `trials` of a search stage in sequence order
    (`budget.sequence_order`), the first row of each grid point or seed (with the inherited winners:
    a rerun of another winner is not this one's). Extra rows (left by a concurrent sweep, or a larger
    comparison's growth of the student-only arm) cannot give one arm more trials than the other."""
    rows = sequence_order(rows)
    if not unit.points:
        return rows[:unit.trials]
    kept = []
    for point in unit.points:
        match = next((r for r in rows if _same(unit.full(point), r["params_json"])), None)
        if match is not None:
            kept.append(match)
    return kept


def _matches(row: Dict[str, Any], match: Dict[str, Any]) -> bool:
    extra = row.get("extra_json") or {}
    return all(extra.get(k) == v for k, v in match.items())


def _stored(sweep: Sweep, unit: StageRun) -> List[Dict[str, Any]]:
    return [r for r in sweep.store.query(sweep_id=unit.arm_id, stage=unit.name)
            if r["status"] in FINISHED and _matches(r, unit.match)]


def _run_unit(sweep: Sweep, unit: StageRun, quiet: bool = False) -> List[Dict[str, Any]]:
    done = _stored(sweep, unit)
    if unit.points:
        todo = [p for p in unit.points if not any(_same(unit.full(p), r["params_json"]) for r in done)]
        total = len(unit.points)
        have = total - len(todo)
    else:
        todo, total = [], unit.trials
        have = min(len(done), total)
    remaining = len(todo) if unit.points else max(0, unit.trials - len(done))
    if have and not (quiet and not remaining):
        verb = "reused" if unit.arm == "student-only" else "resumed"
        more = f" (the arm's sequence holds {len(done)})" if not unit.points and len(done) > total else ""
        say(f"[{unit.name}] {unit.arm}: {have}/{total} trials already in the database "
            f"({unit.arm_id}){more}, {verb}; {remaining} to run")
    if sweep.progress is not None:
        sweep.progress.start_unit(unit, total, done)
    if sweep.studies is not None:
        sweep.studies.record(unit, done)  # rows of an earlier (killed) run first: the study keeps stored order
    if remaining:
        launch(sweep, unit, todo, remaining, sequence_order(done))
    rows = _stored(sweep, unit)
    if sweep.studies is not None:
        sweep.studies.record(unit, rows)  # whatever the callback could not add (nothing, normally)
    return rows


def launch(sweep: Sweep, unit: StageRun, todo, remaining: int, done) -> None:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    cfg, protocol = sweep.cfg, sweep.protocol
    resources_cfg, budget = cfg["sweep"], unit.base["budget"]  # a compute-matched unit's own (scaled) budget
    evaluations = math.ceil(budget["iterations"] / budget["eval_interval"])
    spec = unit.spec(sweep)
    if unit.points:
        param_space = {SEARCH_KEY: tune.grid_search(todo)}
        search_alg, num_samples = None, 1
    else:
        param_space = {path: domain(dist) for path, dist in unit.space.items()}
        done = sorted(done, key=lambda r: r["created_at"] or "")
        previous = [{k: r["params_json"][k] for k in unit.space} for r in done]
        rewards = [reward(r) for r in done]
        sampler = replayed_sampler(protocol, OptunaSearch.convert_search_space(param_space), previous, rewards)
        search_alg = OptunaSearch(metric="miou", mode="max", sampler=sampler,
                                  points_to_evaluate=previous or None, evaluated_rewards=rewards or None)
        num_samples = remaining
    scheduler = guarded_scheduler(sweep, unit, done, evaluations)
    resources = {"cpu": resources_cfg["cpus_per_trial"], "gpu": resources_cfg["gpus_per_trial"]}
    name = f"{unit.arm_id}-{unit.name}-{int(time.time())}".replace(":", "_").replace("[", "_").replace("]", "")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, spec=spec), resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=num_samples, search_alg=search_alg, scheduler=scheduler,
                                    max_concurrent_trials=resources_cfg["max_concurrent_trials"], reuse_actors=True,
                                    trial_dirname_creator=lambda t: t.trial_id, trial_name_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=name, storage_path=str(Path(cfg["paths"]["results"]) / "ray" / "runs"),
                                  failure_config=tune.FailureConfig(max_failures=resources_cfg["max_failures"]),
                                  callbacks=[RecordCallback(sweep, unit, spec, evaluations)], verbose=0))
    tuner.fit()


def guarded_scheduler(sweep: Sweep, unit: StageRun, done: List[Dict[str, Any]], evaluations: int):
    """The stage's scheduler: FIFO (every trial to the end) unless the stage prunes and its arm has a
    first cut before the end; then `GuardedASHA` over the stage's whole trial count (its stored rows
    included: their pruned and failed trials use up the pruning allowance, their mIoU at the rungs is
    the bar the new trials meet)."""
    from ray.tune.schedulers import FIFOScheduler

    cut = sweep.cuts.get(unit.arm)
    if not unit.stage.prunes or cut is None:
        return FIFOScheduler()
    trials = len(unit.points) if unit.points else unit.trials
    b = sweep.cfg["budget"]
    scheduler = GuardedASHA(max_t=evaluations, first_cut=cut["evaluation"],
                            reduction_factor=sweep.protocol.asha["reduction_factor"], trials=trials,
                            min_completed=sweep.protocol.min_completed(trials),
                            pruned=sum(r["status"] == "pruned" for r in done),
                            failed=sum(r["status"] == "failed" for r in done))
    scheduler.seed_rungs(done, b["eval_interval"], b["iterations"])
    return scheduler


def _scheduler_base():
    from ray.tune.schedulers import AsyncHyperBandScheduler

    return AsyncHyperBandScheduler


class GuardedASHA(_scheduler_base()):
    """Ray's ASHA (`AsyncHyperBandScheduler` on `training_iteration` = evaluations, mIoU, max), guarded
    so that it cannot starve an arm:

    - its first rung is the arm's first cut (`first_cut`: min_fraction of training, after warm-ups);
      a result at or after the last evaluation is never stopped (the trial ends and stores its own row);
    - a STOP is turned into CONTINUE when it would leave fewer than `min_completed` of the stage's
      `trials` unpruned: a trial is stopped only while trials - pruned - failed - 1 >= min_completed
      (pruned and failed counted over the stage's stored rows and this run). Trials that fail by
      themselves (a non-finite loss, a collapse, a crash) are not made up for;
    - a result that says `failed` (a trial ending itself) is neither judged nor recorded at a rung.
    """

    def __init__(self, *, max_t: int, first_cut: int, reduction_factor: float, trials: int, min_completed: int,
                 pruned: int = 0, failed: int = 0):
        super().__init__(time_attr="training_iteration", metric="miou", mode="max", max_t=max_t,
                         grace_period=first_cut, reduction_factor=reduction_factor, stop_last_trials=False)
        self.trials, self.min_completed = trials, min_completed
        self.stored_pruned, self.stored_failed = pruned, failed
        self.pruned: set = set()
        self.failed: set = set()
        self.spared = 0       # STOPs of plain ASHA turned into CONTINUE by the guard

    def allowance(self) -> int:
        """How many more trials may still be pruned."""
        return (self.trials - self.min_completed - self.stored_pruned - self.stored_failed
                - len(self.pruned) - len(self.failed))

    def seed_rungs(self, rows: List[Dict[str, Any]], eval_interval: int, iterations: int) -> None:
        """Record the stored trials' tune mIoU at each rung they reached (resume, growth): a new trial
        is judged against the stage's whole history, not only against the trials of this run."""
        from harness.sweep.budget import miou_at

        for bracket in self._brackets:
            for milestone, recorded in bracket._rungs:
                it = min(int(milestone) * eval_interval, iterations)
                for r in rows:
                    if r["status"] == "failed":
                        continue
                    value = miou_at(r, it)
                    if value is None and r["status"] == "pruned" and r.get("iterations") == it:
                        value = r.get("final_miou")
                    if value is not None:
                        recorded[f"stored:{r['run_id']}"] = value

    def on_trial_result(self, tune_controller, trial, result: Dict) -> str:
        from ray.tune.schedulers import TrialScheduler

        if result.get("failed"):
            self.failed.add(trial.trial_id)
            return TrialScheduler.CONTINUE
        t = result.get(self._time_attr)
        if t is None or t >= self._max_t:
            return TrialScheduler.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP:
            if self.allowance() < 1:
                self._num_stopped -= 1
                self.spared += 1
                return TrialScheduler.CONTINUE
            self.pruned.add(trial.trial_id)
        return action

    def on_trial_complete(self, tune_controller, trial, result: Dict):
        if result and result.get("failed"):
            self.failed.add(trial.trial_id)
            self._trial_info.pop(trial.trial_id, None)
            return
        self.failed.discard(trial.trial_id)
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result or {})
            self._trial_info.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller, trial):
        self.failed.add(trial.trial_id)

    def on_trial_remove(self, tune_controller, trial):
        self._trial_info.pop(trial.trial_id, None)


def reward(row: Dict[str, Any]) -> float:
    """What the sampler was told of a finished trial: its last tune mIoU (a pruned trial's at the cut),
    0 for a failed one (as the trial reported it to Tune)."""
    return row["final_miou"] if row["status"] != "failed" and row["final_miou"] is not None else 0.0


def replayed_sampler(protocol: Protocol, distributions: Dict[str, Any], previous: List[Dict[str, Any]],
                     rewards: List[float]):
    """The stage's TPE sampler, in the state it had after the finished trials (resume).

    A sampler re-created with the same seed restarts its random sequence, and would propose the
    stage's first point again. So the finished trials are replayed in the order they were stored:
    the sampler is asked (which advances its random state exactly as the first run did) and told each
    trial's reward. With one trial at a time the replayed proposals are the stored points themselves,
    and the resumed stage continues the uninterrupted search point for point; with several trials at
    once the order of asks and tells is not stored, the replay advances the random state by as many
    draws and the continuation is a fresh part of the sequence, not a repeat. The search itself is then
    told the stored points and rewards (`points_to_evaluate`), so its model is built from what ran."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=protocol.sampler_seed, n_startup_trials=protocol.tpe_startup_trials)
    if not previous:
        return sampler
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    replay = optuna.create_study(direction="maximize", sampler=sampler)
    for value in rewards:
        replay.tell(replay.ask(fixed_distributions=distributions), value)
    return sampler


def domain(dist: Dict[str, Any]):
    from ray import tune

    kind, values = next(iter(dist.items()))
    return {"loguniform": lambda: tune.loguniform(*values), "uniform": lambda: tune.uniform(*values),
            "choice": lambda: tune.choice(values)}[kind]()


def pick_winner(rows: List[Dict[str, Any]], unit: StageRun) -> Winner:
    completed = [r for r in rows if r["status"] == "completed" and r["final_miou"] is not None]
    if not unit.stage.is_search:
        return Winner(unit.fixed, statistics.mean(r["final_miou"] for r in completed) if completed else None,
                      unit.lineage)
    if not completed:
        raise SweepError(f"stage {unit.name} ({unit.arm}): no trial completed "
                           f"({len(rows)} pruned or failed); see their failure reasons in the database")
    best = max(completed, key=lambda r: r["final_miou"])
    return Winner(dict(best["params_json"]), best["final_miou"],
                  {**unit.lineage, **{p: unit.name for p in unit.space}}, run_id=best.get("run_id"))


def merge_each(stage: Stage, results: List[Winner], fixed, lineage) -> Winner:
    """`each` stage: every path keeps the value its own sub-stage chose (not yet evaluated together)."""
    params, lin = dict(fixed), dict(lineage)
    for w in results:
        for p, stage_name in w.lineage.items():
            if parse_stage_name(stage_name) == (stage.name, p):
                params[p] = w.params[p]
                lin[p] = stage_name
    best = max(results, key=lambda w: w.miou or 0)
    # evaluated only if a single change was searched; otherwise the combine stage evaluates it
    return Winner(params, best.miou if params == best.params else None, lin, best_single=best)


def combine_stage(sweep: Sweep, stage: Stage, arm: str, fixed: Dict[str, Any], lineage: Dict[str, str],
                  best_single: Optional[Winner]) -> Winner:
    """The isolated winners together, one trial; kept only if it beats the best single change."""
    if best_single is None or best_single.params == fixed:
        return Winner(fixed, best_single.miou if best_single else None, lineage)
    unit = StageRun(arm=arm, arm_id=sweep.ids[arm], stage=stage, name=stage.name, base=arm_config(sweep.cfg, arm),
                    fixed={}, lineage=lineage, space={}, points=[fixed], trials=0)
    together = run_unit(sweep, unit)
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
    """Driver side: one line per finished trial; records for trials stopped by ASHA or crashed."""

    def __init__(self, sweep: Sweep, unit: StageRun, spec: TrialSpec, evaluations: int):
        self.sweep, self.unit, self.spec, self.evaluations = sweep, unit, spec, evaluations
        self.started: Dict[str, float] = {}
        self.reported: Dict[str, Dict[int, float]] = {}  # run id -> {iteration: mIoU} reported to Tune

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("failed") or result.get("iteration") is None or result.get("miou") is None:
            return
        self.reported.setdefault(self.spec.run_id(trial.trial_id), {})[int(result["iteration"])] = float(result["miou"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, error=None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, error=f"trial crashed {self.sweep.cfg['sweep']['max_failures'] + 1} time(s): "
                                  f"{_error_text(trial)}")

    def _finish(self, trial, error: Optional[str]) -> None:
        from harness.engine.record import RunRecord, store_record

        spec = self.spec
        row = self.sweep.store.get(spec.run_id(trial.trial_id))
        last = trial.last_result or {}
        if row is None:  # the trial did not store its own record: pruned, or crashed
            params = spec.params(trial.config)
            cfg = spec.config(params)
            reason = error or (f"stopped by ASHA after {last.get('iteration')} iterations"
                               f" ({last.get('training_iteration')} of {self.evaluations} evaluations)")
            record = RunRecord.of(cfg, spec.run_id(trial.trial_id), spec.command,
                                  status="failed" if error else "pruned", failure_reason=reason,
                                  final_miou=last.get("miou"), best_miou=last.get("miou"),
                                  iterations=last.get("iteration"),
                                  wall_time_s=time.time() - self.started.get(trial.trial_id, time.time()),
                                  extra_json=spec.extra(),
                                  **{k: v for k, v in spec.record_fields(trial.trial_id, params).items()
                                     if k != "run_id"})
            store_record(cfg, record)
            row = record.as_row()
        if self.sweep.studies is not None:
            self.sweep.studies.record(self.unit, [row], self.reported)
        shown = {k.split(".")[-1] if k.startswith("optim.") else k: _fmt(v)
                 for k, v in row["params_json"].items() if k not in self.unit.fixed or k in self.unit.space or k == "seed"}
        miou = row["final_miou"]
        took = time.time() - self.started.get(trial.trial_id, time.time())
        status = self.sweep.progress.finished(row, took) if self.sweep.progress is not None else ""
        say(f"  [{self.unit.name}] {self.unit.arm:<12} {trial.trial_id}  {status}"
            f"{' '.join(f'{k}={v}' for k, v in shown.items()):<40} {self.unit.stage.split} mIoU "
            f"{'  n/a' if miou is None else f'{100 * miou:5.2f}'}  {row['status']}"
            + (f" ({row['failure_reason']})" if row["status"] == "failed" else "")
            + (self.sweep.progress.tail(self.sweep.cfg["sweep"]["max_concurrent_trials"])
               if self.sweep.progress is not None else ""))


class Progress:
    """What the per-trial line says besides the trial: trial k/N of its unit, the unit's best so far, the
    sweep's elapsed time and the ETAs of the unit and of the sweep: trials left x the mean duration of the
    trials run so far / the trials that run at once. The sweep's total is the plan's (`plan.plan`: the
    student-only arm's growth and `seeds: auto` counted at their planned size), an estimate."""

    def __init__(self, planned: int):
        self.planned, self.begun = planned, time.time()
        self.counted: set = set()  # run ids of the finished trials of the units seen so far (stored ones included)
        self.durations: List[float] = []
        self.unit_total = self.unit_done = 0
        self.best: Optional[float] = None

    def start_unit(self, unit: StageRun, total: int, done: List[Dict[str, Any]]) -> None:
        mine = (sequence_order(done)[:total] if not unit.points else
                [r for r in done if any(_same(unit.full(p), r["params_json"]) for p in unit.points)])
        self.unit_total, self.unit_done = total, len(mine)
        self.counted.update(r["run_id"] for r in mine)
        completed = [r["final_miou"] for r in done if r["status"] == "completed" and r["final_miou"] is not None]
        self.best = max(completed) if completed else None

    def finished(self, row: Dict[str, Any], took: float) -> str:
        self.durations.append(took)
        self.unit_done += 1
        self.counted.add(row["run_id"])
        if row["status"] == "completed" and row["final_miou"] is not None:
            self.best = max(self.best if self.best is not None else -1.0, row["final_miou"])
        return f"trial {self.unit_done}/{self.unit_total}  "

    def tail(self, concurrent: int) -> str:
        mean = statistics.mean(self.durations) if self.durations else 0.0
        per = mean / max(1, concurrent)
        stage_left = max(0, self.unit_total - self.unit_done)
        sweep_left = max(stage_left, self.planned - len(self.counted))
        best = "n/a" if self.best is None else f"{100 * self.best:.2f}"
        return (f"  | best {best}  elapsed {_clock(time.time() - self.begun)}  ETA stage {_clock(stage_left * per)}"
                f", sweep ~{_clock(sweep_left * per)}")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _error_text(trial) -> str:
    text = getattr(trial, "error_msg", None) or ""
    if not text and getattr(trial, "error_file", None) and Path(trial.error_file).exists():
        text = Path(trial.error_file).read_text()
    lines = [l for l in str(text).strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else "unknown error"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------- summaries
def stage_summary(sweep: Sweep, stage: Stage, arm: str, winner: Winner, wall: float) -> None:
    """One line per stage and arm: the counted trials by status, the winner, time, energy; for a search
    stage also the rank agreement (Spearman) between the first cut and the end of its completed trials."""
    arm_rows = sweep.store.query(sweep_id=sweep.ids[arm])
    units = {name: rows for name, rows in sweep.tuning.get(arm, {}).items() if parse_stage_name(name)[0] == stage.name}
    if stage.search == RERUN:
        rows = [r for r in arm_rows if r["stage"] == stage.name and _same(winner.params, r["params_json"])]
    else:
        rows = [r for unit_rows_ in units.values() for r in unit_rows_]
    counts = {s: sum(r["status"] == s for r in rows) for s in FINISHED}
    energy = sum(r["energy_kwh"] or 0 for r in arm_rows)
    chosen = {p: _fmt(v) for p, v in winner.params.items() if winner.lineage.get(p) and
              parse_stage_name(winner.lineage[p])[0] == stage.name}
    agreement = ""
    if stage.search != RERUN and units:
        cut = (sweep.cuts.get(arm) or {}).get("iteration")
        parts = []
        for name, unit_rows_ in units.items():
            a = rank_agreement(unit_rows_, cut)
            label = parse_stage_name(name)[1] or name
            parts.append(f"{label} {a['rho']:+.2f} (n={a['n']})" if a["rho"] is not None else f"{label} n/a ({a['reason']})")
        agreement = f"; rank agreement first cut (iteration {cut}) vs end: " + ", ".join(parts)
    # a rerun stage's Winner.miou is the mean over its completed seeds, a search stage's the best trial
    what = f"mean {stage.split} mIoU over {counts['completed']} seeds" if stage.search == RERUN else f"best {stage.split} mIoU"
    say(f"== stage {stage.name} ({arm}): {counts['completed']} done, {counts['pruned']} pruned, "
        f"{counts['failed']} failed; {what} "
        f"{'n/a' if winner.miou is None else f'{100 * winner.miou:.2f}'}; chose {chosen or '-'}; "
        f"{wall:.0f} s; energy so far {1000 * energy:.2f} Wh{agreement}")


def final_summary(sweep: Sweep, winners: Dict[Tuple[str, str], Winner], wall: float,
                  comparison: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Both arms side by side: val mIoU over the reruns of each arm's winner, each arm's tuning budget
    (trials started / completed / pruned / failed, iterations, kWh), the unequal-budget mark, the lift."""
    comparison = comparison or compare(sweep, winners)
    rerun_stage = next((s.name for s in reversed(sweep.protocol.stages) if s.search == RERUN), None)
    arms = {}
    for arm, arm_id in sweep.ids.items():
        final = winners.get((arm, rerun_stage))
        rows = rerun_rows(sweep, rerun_stage, arm, final, sweep.seeds.get(rerun_stage)) if rerun_stage else []
        values = [r["final_miou"] for r in rows]
        arms[arm] = {"arm_id": arm_id, "val_miou": values, "params": final.params if final else None,
                     "by_seed": {int(r["seed"]): r["final_miou"] for r in rows},
                     "lineage": final.lineage if final else None,
                     "mean": statistics.mean(values) if values else None,
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                     "budget": comparison["budgets"][arm].as_dict()}
    say(f"\n== {sweep.protocol.name}: tuned arms side by side (val mIoU over rerun seeds), {wall / 60:.1f} min")
    for arm, a in arms.items():
        tuned = {k: _fmt(v) for k, v in (a["params"] or {}).items() if k != "seed"}
        mean = "n/a" if a["mean"] is None else f"{100 * a['mean']:.2f} +- {100 * a['std']:.2f} (n={len(a['val_miou'])})"
        say(f"  {arm:<13} {mean:<24} {tuned}")
    say("  tuning budget (the trials each arm's winner was chosen from):")
    for arm in arms:
        say(f"  {arm:<13} {comparison['budgets'][arm].text()}")
    n = comparison["student_arm"]["trials"]
    grow = comparison["student_arm"]["stage"]
    if grow:
        say(f"  the student-only arm's {grow} sequence: its first {n} trials ({sweep.ids['student-only']})")
    if comparison["unequal"]:
        say(f"  {comparison['unequal']}")
    s, d = arms["student-only"]["mean"], arms["distilled"]["mean"]
    lift = None if s is None or d is None else d - s
    say(f"  lift of the distilled arm over the tuned student-only arm: "
        f"{'n/a' if lift is None else f'{100 * lift:+.2f} mIoU points'}"
        + (" (unequal tuning budget)" if comparison["unequal"] else ""))
    lifts = lift_lines(arms, sweep.matched)
    return {"arms": arms, "lift": lift, "wall_time_s": wall, "unequal_tuning_budget": comparison["unequal"],
            "student_arm": comparison["student_arm"], "rank_agreement": comparison["rank_agreement"],
            "lifts": lifts}


def lift_lines(arms: Dict[str, Dict[str, Any]], matched: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The paired lift at equal iterations (distilled vs the tuned student's reruns) and at equal compute
    (distilled vs the compute-matched student reruns, per measure, with the cost ratio), printed and
    returned as {"iterations": Verdict, "time": Verdict, "energy": Verdict}."""
    from harness import stats

    if not arms["distilled"]["by_seed"] or not (arms["student-only"]["by_seed"] or matched):
        return {}

    def text(v) -> str:
        if v.lift is None:
            return "n/a (" + "; ".join(v.notes) + ")"
        ci = f" [{100 * v.low:+.2f}, {100 * v.high:+.2f}]" if v.low is not None else ""
        return f"{100 * v.lift:+.2f}{ci} mIoU points ({v.test or 'no test'}, {v.n_pairs or min(v.n_a, v.n_b)} seeds)"

    out = {"iterations": stats.compare_seeds(arms["distilled"]["by_seed"], arms["student-only"]["by_seed"])}
    say(f"  lift at equal iterations: {text(out['iterations'])}")
    for measure, m in matched.items():
        out[measure] = v = stats.compare_seeds(arms["distilled"]["by_seed"], m["by_seed"])
        say(f"  lift at equal compute ({measure}: cost ratio {m['ratio']:.2f}x measured on {m['device'] or 'n/a'}, "
            f"student trained {m['iterations']} iterations"
            + (f", the {m['shared_with']} control's runs" if m.get("shared_with") else "") + f"): {text(v)}")
    return out


def say(text: str) -> None:
    print(text, flush=True, file=sys.stdout)
