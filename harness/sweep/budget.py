"""Tuning budgets of the two arms of a comparison, counted from stored rows (no Ray, no torch).

The rule (README "The fair tuning protocol", `sweeps/default.yaml`):

- An arm's **tuning budget** is counted over the rows its winner could come from (the rows of its
  search stages, not its reruns): trials `started` (every such row), split into `completed`,
  `pruned` and `failed`; training `iterations` actually run (a pruned trial counts the iterations
  up to the evaluation at which it was cut, a failed one those it ran); and tuning energy (`kwh`,
  the sum of `energy_kwh`; rows without a measurement, e.g. pruned trials recorded by the driver,
  count 0 and are counted in `kwh_missing`).
- The student-only arm's growing stage (`grow: true`, lr x wd in the default protocol) is one seeded
  TPE sequence per student arm id, in **sequence order** = stored order (`created_at`, then
  `run_id`): a trial's row is written when it ends and later growth only appends, so a prefix never
  changes. A comparison at budget N uses the first N trials of that sequence (`student_prefix`),
  its winner among them (`winner`), and that winner's reruns (`student_reruns_for`).
- N is the smallest prefix, starting at the protocol's `trials`, with which the student-only arm has
  at least as many trials AND at least as many tuning iterations as the distilled arm
  (`parity_prefix`): the two are equal within one trial's length. A comparison whose student-only
  arm has fewer of either is marked "unequal tuning budget" with both numbers (`unequal`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

UNEQUAL = "unequal tuning budget"


@dataclass(frozen=True)
class Budget:
    """What an arm spent on tuning (see the module docstring for what is counted)."""
    started: int = 0
    completed: int = 0
    pruned: int = 0
    failed: int = 0
    iterations: int = 0
    kwh: float = 0.0
    kwh_missing: int = 0          # rows counted in `started` without an energy measurement

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "Budget":
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})

    def text(self) -> str:
        """`13 trials started (7 completed, 5 pruned, 1 failed), 6200 iterations, 0.0123 kWh`."""
        kwh = f"{self.kwh:.4g} kWh" + (f" ({self.kwh_missing} trials unmeasured)" if self.kwh_missing else "")
        return (f"{self.started} trials started ({self.completed} completed, {self.pruned} pruned, "
                f"{self.failed} failed), {self.iterations} iterations, {kwh}")


def row_iterations(row: Dict[str, Any]) -> int:
    """Training iterations a stored trial actually ran: its `iterations` column; for rows without one,
    the last evaluation of its history; 0 when neither is known (a trial that crashed at start)."""
    if row.get("iterations") is not None:
        return int(row["iterations"])
    history = row.get("history_json") or []
    return int(history[-1].get("iteration") or 0) if history else 0


def arm_budget(rows: Iterable[Dict[str, Any]]) -> Budget:
    """The tuning budget of the given trial rows (pass only tuning rows: not reruns).
    `started` counts every row; `completed`/`pruned`/`failed` by status (a `stopped` row is started
    and none of the three)."""
    rows = list(rows)
    status = [r.get("status") for r in rows]
    energies = [r.get("energy_kwh") for r in rows]
    return Budget(started=len(rows), completed=status.count("completed"), pruned=status.count("pruned"),
                  failed=status.count("failed"), iterations=sum(row_iterations(r) for r in rows),
                  kwh=float(sum(e for e in energies if e is not None)),
                  kwh_missing=sum(e is None for e in energies))


def sequence_order(rows: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows in the order of their sequence: stored order (`created_at`, then `run_id`)."""
    return sorted(rows, key=lambda r: (r.get("created_at") or "", r.get("run_id") or ""))


def student_prefix(student_trial_rows: Iterable[Dict[str, Any]], n: int,
                   stage: Optional[str] = None) -> List[Dict[str, Any]]:
    """The student-only arm's tuning rows of a comparison at budget `n`: the first `n` rows, in
    sequence order, of its growing stage `stage`, then every row of its other search stages (which do
    not grow; none in the default protocol). With `stage=None` all given rows are the sequence."""
    rows = sequence_order(student_trial_rows)
    if stage is None:
        return rows[:n]
    grown = [r for r in rows if r.get("stage") == stage]
    return grown[:n] + [r for r in rows if r.get("stage") != stage]


def winner(rows: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The best completed row by tune mIoU (failed and pruned rows never win); on a tie the earlier in
    sequence order. None when no row completed."""
    completed = [r for r in sequence_order(rows) if r.get("status") == "completed" and r.get("final_miou") is not None]
    return max(completed, key=lambda r: r["final_miou"]) if completed else None


def at_least(student: Budget, distilled: Budget) -> bool:
    """Whether the student-only arm's budget is at least the distilled arm's, in trials and iterations."""
    return student.started >= distilled.started and student.iterations >= distilled.iterations


def parity_prefix(sequence_rows: Sequence[Dict[str, Any]], distilled: Budget, start: int = 1,
                  other_rows: Sequence[Dict[str, Any]] = ()) -> Optional[int]:
    """The smallest n >= `start` such that the first n rows of the student-only arm's growing sequence
    (`sequence_rows`), together with its other tuning rows, reach `distilled` in trials and iterations;
    None when the stored rows are not enough (the sequence must grow)."""
    rows = sequence_order(sequence_rows)
    for n in range(max(start, 1), len(rows) + 1):
        if at_least(arm_budget([*rows[:n], *other_rows]), distilled):
            return n
    return None


def growth_step(student: Budget, distilled: Budget, iterations_per_trial: int) -> int:
    """How many more trials the student-only sequence needs at least to reach `distilled` (>= 1):
    the missing trials, or the missing iterations in whole trials of `iterations_per_trial`, whichever
    is more. A trial adds at most `iterations_per_trial`, so growing by this never overshoots the
    distilled arm's iterations by a whole trial unless the trial count demands it."""
    missing_trials = distilled.started - student.started
    missing_iterations = math.ceil(max(0, distilled.iterations - student.iterations) / max(1, iterations_per_trial))
    return max(1, missing_trials, missing_iterations)


def unequal(student: Budget, distilled: Budget) -> Optional[str]:
    """None when the student-only arm's tuning budget is at least the distilled arm's in trials and in
    iterations; otherwise the mark `unequal tuning budget: ...` with both arms' numbers. One-sided on
    purpose: a student-only arm with more tuning only makes the lift smaller (conservative)."""
    if at_least(student, distilled):
        return None
    return (f"{UNEQUAL}: student-only {student.started} trials, {student.iterations} iterations; "
            f"distilled {distilled.started} trials, {distilled.iterations} iterations")


def student_reruns_for(distilled_rerun_row: Dict[str, Any],
                       student_rerun_rows: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The student-only reruns a distilled rerun row is compared with: those of the winner of the
    student's first N trials (`extra_json.student_arm.winner_run_id` of the distilled row equals the
    student rows' `extra_json.winner_run_id`; a winner shared by several N has one set of reruns).
    A distilled row without `student_arm` (stored before budgets were recorded) is compared with the
    student reruns that carry no `winner_run_id` either (the arm then had one winner)."""
    wanted = ((distilled_rerun_row.get("extra_json") or {}).get("student_arm") or {}).get("winner_run_id")
    return [r for r in student_rerun_rows if (r.get("extra_json") or {}).get("winner_run_id") == wanted]


def miou_at(row: Dict[str, Any], iteration: int) -> Optional[float]:
    """The tune mIoU a row's history holds for the evaluation at `iteration` (None if it has none)."""
    for h in row.get("history_json") or []:
        if h.get("iteration") == iteration and h.get("miou") is not None and not math.isnan(h["miou"]):
            return float(h["miou"])
    return None


def rank_agreement(rows: Iterable[Dict[str, Any]], iteration: Optional[int]) -> Dict[str, Any]:
    """Spearman rank correlation, over the completed trials of a stage, between the tune mIoU at the
    first cut (`iteration`: the first evaluation at which pruning may stop a trial) and the final tune
    mIoU: how far the first cut's ranking is the final one. `{"rho", "n", "iteration", "reason"}`;
    rho is None with the reason when fewer than 3 completed trials have both values, when there is no
    evaluation before the end, or when one of the two rankings is constant."""
    rows = [r for r in rows if r.get("status") == "completed" and r.get("final_miou") is not None]
    out: Dict[str, Any] = {"rho": None, "n": 0, "iteration": iteration, "reason": None}
    if iteration is None:
        out["reason"] = "no evaluation before the end of training: no first cut"
        return out
    pairs = [(miou_at(r, iteration), float(r["final_miou"])) for r in rows]
    pairs = [p for p in pairs if p[0] is not None]
    out["n"] = len(pairs)
    if len(pairs) < 3:
        out["reason"] = f"{len(pairs)} completed trials with both values (< 3)"
        return out
    first, final = zip(*pairs)
    if len(set(first)) == 1 or len(set(final)) == 1:
        out["reason"] = "a constant ranking (all values equal)"
        return out
    from scipy.stats import spearmanr

    out["rho"] = float(spearmanr(first, final).statistic)
    return out


# ------------------------------------------------------------------ compute-matched control
def run_cost(rows: Iterable[Dict[str, Any]], measure: str) -> Optional[float]:
    """Mean training cost of one run over completed rerun rows: 'time' = train seconds per iteration
    (`train_time_s / iterations`), 'energy' = kWh per run (`energy_kwh`); rows without a positive
    value are left out; None when no row has one. (The leaderboard's `cost_ratios` reads the same.)"""
    if measure == "time":
        values = [r["train_time_s"] / r["iterations"] for r in rows
                  if r.get("train_time_s") and r.get("iterations")]
    elif measure == "energy":
        values = [r.get("energy_kwh") for r in rows]
    else:
        raise ValueError(f"unknown cost measure {measure!r} (time, energy)")
    values = [float(v) for v in values if v is not None and v > 0]
    return sum(values) / len(values) if values else None


def measured_cost_ratio(distilled_rows: Iterable[Dict[str, Any]], student_rows: Iterable[Dict[str, Any]],
                        measure: str):
    """(distilled cost / student-only cost per run, None) measured on the two arms' completed reruns, or
    (None, why not) when an arm recorded no such cost (energy tracking off)."""
    d, s = run_cost(list(distilled_rows), measure), run_cost(list(student_rows), measure)
    if d is None or s is None:
        what = "train time per iteration" if measure == "time" else "energy (kWh)"
        arms = [a for a, v in (("distilled", d), ("student-only", s)) if v is None]
        return None, f"no {what} recorded on the {' and '.join(arms)} reruns" + (
            " (energy.enabled false or codecarbon unavailable)" if measure == "energy" else "")
    return d / s, None


def scaled_budget(iterations: int, eval_interval: int, ratio: float):
    """(iterations, eval_interval) of the compute-matched student run: iterations x ratio, rounded (at
    least 1); the evaluation interval scaled by the same factor (rounded, at least 1) so that the run
    is evaluated about as often as the reruns it is compared with. The poly lr schedule runs over the
    scaled length (the loop decays over `budget.iterations`)."""
    n = max(1, int(round(iterations * ratio)))
    every = max(1, int(round(eval_interval * n / iterations)))
    return n, min(every, n)


def measure_of(extra: Dict[str, Any]) -> str:
    """The cost measure a compute-matched row was run for (rows from before measures: 'time')."""
    return extra.get("measure") or "time"


def stands_for(extra: Dict[str, Any], measure: str) -> Optional[Tuple[Optional[float], Optional[int], Optional[int]]]:
    """(cost ratio, iterations, eval_interval) that a compute-matched row stands for under `measure`:
    its own measure's, or one listed in its `also_measures` (a control run once for several measures,
    `control_plan`); None when the row is not for that measure."""
    if measure_of(extra) == measure:
        return extra.get("cost_ratio"), extra.get("iterations"), extra.get("eval_interval")
    also = (extra.get("also_measures") or {}).get(measure)
    if also:
        return also.get("cost_ratio"), also.get("iterations"), also.get("eval_interval")
    return None


@dataclass
class ControlPlan:
    """What the compute-matched stage does for one cost measure (`control_plan`)."""
    measure: str
    ratio: Optional[float] = None
    iterations: Optional[int] = None
    eval_interval: Optional[int] = None
    kept: bool = False                # its values come from rows already stored
    shared_with: Optional[str] = None  # its runs are those of this measure's control (same configuration)
    also: List[str] = field(default_factory=list)  # measures whose control these runs also are
    skipped: Optional[str] = None     # why there is no control for this measure


def control_plan(measures: Sequence[str], stored: Sequence[Dict[str, Any]],
                 measured: Dict[str, Tuple[Optional[float], Optional[str]]], iterations: int,
                 eval_interval: int, share_within: float = 0.0) -> List[ControlPlan]:
    """Per measure, the compute-matched control to run or keep. `stored`: extra_json of the rows already
    stored for this comparison; `measured`: measure -> (ratio, why not) from the two arms' reruns.

    A measure with stored rows keeps their ratio and length (a resumed sweep runs the missing seeds
    the same length). Otherwise its budget is scaled by the measured ratio. When that gives exactly the
    iterations and evaluation interval of an earlier measure's control that is run now (not kept from
    older rows, which cannot list it), or its ratio is within `share_within` (relative) of that
    control's, the two would train the same configuration -- same tuned student, seeds, split, and
    the same length or one `share_within` apart -- so those runs stand for both (`also_measures` on
    their rows, with this measure's own ratio), at the earlier measure's length, and nothing is trained
    twice. On a CPU without energy counters codecarbon's energy is a load-based estimate and the two
    ratios agree to about 0.1 % (1.934x and 1.935x in the main job), while the estimate itself is
    uncertain by -60 % to +190 % (codecarbon's documentation)."""
    plans: List[ControlPlan] = []
    for measure in measures:
        plan = ControlPlan(measure)
        own = [e for e in stored if measure_of(e) == measure and e.get("cost_ratio") is not None]
        via = [e for e in stored if measure in (e.get("also_measures") or {})]
        if via and not own:
            plan.ratio, plan.iterations, plan.eval_interval = stands_for(via[0], measure)
            plan.kept, plan.shared_with = True, measure_of(via[0])
        elif own:
            plan.ratio, plan.iterations, plan.eval_interval = stands_for(own[0], measure)
            plan.eval_interval = plan.eval_interval or eval_interval
            plan.kept = True
            plan.also = sorted({m for e in own for m in (e.get("also_measures") or {})})
        else:
            ratio, why = measured.get(measure, (None, f"no {measure} cost measured"))
            if ratio is None:
                plan.skipped = why
            else:
                plan.ratio = ratio
                plan.iterations, plan.eval_interval = scaled_budget(iterations, eval_interval, ratio)
                first = next((p for p in plans if p.shared_with is None and p.skipped is None and not p.kept
                              and ((p.iterations, p.eval_interval) == (plan.iterations, plan.eval_interval)
                                   or abs(ratio - p.ratio) <= share_within * p.ratio)), None)
                if first is not None:
                    plan.shared_with = first.measure
                    plan.iterations, plan.eval_interval = first.iterations, first.eval_interval
                    first.also.append(measure)
        plans.append(plan)
    return plans


# ------------------------------------------------------------------------------ adaptive seeds
def auto_seeds_decision(distilled_by_seed: Dict[int, float], student_by_seed: Dict[int, float], seeds: int,
                        target_halfwidth: float, max_seeds: int, min_seeds: int = 3) -> Optional[str]:
    """After `seeds` seeds of both arms: why the reruns stop (a text), or None to add a seed. The rule
    is on the width only, never on p: stop when the paired 95 % t interval of the lift
    (`harness.stats.compare_seeds(distilled, student).halfwidth`) is <= `target_halfwidth`, or when
    `max_seeds` seeds ran; never before `min_seeds` seeds, nor before `min_seeds` completed seed pairs
    (a failed run leaves its seed out of the pairs)."""
    from harness import stats

    verdict = stats.compare_seeds(distilled_by_seed, student_by_seed)
    width = verdict.halfwidth if verdict.design == stats.PAIRED else None
    shown = "n/a" if width is None else f"{width:.4f}"
    if seeds >= min_seeds and verdict.n_pairs >= min_seeds and width is not None and width <= target_halfwidth:
        return f"halfwidth {shown} <= {target_halfwidth:g} after {seeds} seeds"
    if seeds >= max_seeds:
        return f"max_seeds {max_seeds} reached (halfwidth {shown})"
    return None


def auto_seeds_stop(distilled_values: Sequence[float], student_values: Sequence[float], target_halfwidth: float,
                    max_seeds: int, min_seeds: int = 3):
    """(seeds run, why it stopped) for per-seed values given in seed order (seed 1 first): the rule of
    `auto_seeds_decision` applied after each added seed pair. A None value is a failed run (left out
    of the pairs, the seed still counts). Raises ValueError if the values run out before it stops."""
    for n in range(min_seeds, max_seeds + 1):
        if n > min(len(distilled_values), len(student_values)):
            break
        d = {i + 1: v for i, v in enumerate(distilled_values[:n]) if v is not None}
        s = {i + 1: v for i, v in enumerate(student_values[:n]) if v is not None}
        why = auto_seeds_decision(d, s, n, target_halfwidth, max_seeds, min_seeds)
        if why:
            return n, why
    raise ValueError("the values ran out before the rule stopped")
