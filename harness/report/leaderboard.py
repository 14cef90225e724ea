"""The leaderboard: every tuned arm against the tuned student-only arm, from the rerun rows.

``python -m harness leaderboard [dataset=... student=... teacher=... budget=... +method=...]``
writes ``results/leaderboard.md``, ``.csv`` and ``.tex`` (booktabs).

One block per (dataset, student, teacher, budget) (see ``harness.report.blocks``); rows = the tuned
student-only arm, then each method, then each combination. Per row, from the ``final_miou`` of its
completed rerun rows (mIoU in percentage points):

- ``mean +- std (completed/run)``: sample std (n - 1) over the completed rerun seeds, and how many
  seeds were started; a seed that failed, collapsed or was stopped is listed under the block with
  its reason and the row is marked (never silently dropped);
- ``lift [95% CI]``: the verdict of ``harness.report.verdicts`` (one computation shared with the
  significance table): paired t on the seeds both arms completed, its t interval; Welch's t and its
  interval when the arms share fewer than two seeds. The CSV also holds the simultaneous
  (Bonferroni, 1 - 0.05/m) interval of the family;
- ``p (Holm)``: that test's two-sided p, Holm-corrected over the block's family "every distilled arm
  vs the tuned student" (m stated under the block; a display filter never changes it); ``test=
  permutation`` marks with the exact permutation test instead. Markers * / ** / *** for adjusted
  p < 0.05 / 0.01 / 0.001;
- ``d_z``: effect size (mean / sd of the per-seed differences; Hedges' g when unpaired);
  ``P(impr.)``: share of seed pairs where the distilled arm wins, with its exact 95 % interval;
- ``MDE``: the smallest lift the design detects at 80 % power with its n and observed sd, at
  Holm's first-step alpha 0.05/m (statsmodels), ``!`` when the observed |lift| is below it (the
  design cannot confirm a lift of that size); ``seeds +-1``: seeds per arm a +-1 point interval needs;
- energy: mean kWh and kg CO2 of one training run (the rerun rows), and the energy of the arm's
  whole sweep (tuning included: every row of its sweep ids, whatever their status);
- params, FLOPs and CPU latency of the deployed student: measured by ``harness.measure.efficiency``
  and handed in by the caller (``efficiency``: block key -> measurement, or the reason it failed);
- bold: the best mean of the block; underlined (Markdown: _italic_): the other rows whose mean is
  within one std of the best row's std (paper 003's convention).

A missing number is never a 0: the cell says ``n/a`` and the notes under the block say why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness.report import verdicts as verdicts_
from harness.report.blocks import (MISSING, STUDENT_ONLY, Arm, Block, RerunStages, is_control, load_blocks, protocol_of,
                                   source_lines)
from harness.report.filters import TESTS, Filters
from harness.report.render import fmt_p, markdown_table, pct, publish, stars, tex, tex_title

CSV_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("dataset", "string"), ("student", "string"), ("teacher", "string"), ("budget", "string"),
    ("protocol", "string"), ("row_id", "string"), ("arm", "string"), ("methods", "string"), ("sweep_id", "string"),
    ("n", "int64"), ("runs", "int64"), ("seeds", "string"), ("miou_by_seed_pct", "string"), ("lost_seeds", "string"),
    ("miou_mean_pct", "float64"), ("miou_std_pct", "float64"),
    ("design", "string"), ("paired_seeds", "string"),
    ("lift_pct", "float64"), ("lift_ci_low_pct", "float64"), ("lift_ci_high_pct", "float64"),
    ("lift_simultaneous_low_pct", "float64"), ("lift_simultaneous_high_pct", "float64"), ("simultaneous_level", "float64"),
    ("test", "string"), ("t_statistic", "float64"), ("df", "float64"), ("p_raw", "float64"), ("p_holm", "float64"),
    ("family", "string"), ("family_size", "Int64"), ("marker", "string"),
    ("p_permutation", "float64"), ("p_permutation_holm", "float64"), ("permutation_min_p", "float64"),
    ("effect_size", "float64"), ("effect_name", "string"), ("sd_pct", "float64"),
    ("p_improvement", "float64"), ("p_improvement_low", "float64"), ("p_improvement_high", "float64"),
    ("mde_pct", "float64"), ("mde_alpha_family_pct", "float64"), ("underpowered", "boolean"),
    ("seeds_for_1pt", "Int64"),
    ("tuning_trials_distilled", "Int64"), ("tuning_iterations_distilled", "Int64"), ("tuning_kwh_distilled", "float64"),
    ("tuning_trials_student", "Int64"), ("tuning_iterations_student", "Int64"), ("tuning_kwh_student", "float64"),
    ("tuning_budget", "string"), ("expected_best_above_from", "Int64"),
    ("lift_equal_time_pct", "float64"), ("lift_equal_time_low_pct", "float64"), ("lift_equal_time_high_pct", "float64"),
    ("cost_ratio_time", "float64"),
    ("lift_equal_energy_pct", "float64"), ("lift_equal_energy_low_pct", "float64"),
    ("lift_equal_energy_high_pct", "float64"), ("cost_ratio_energy", "float64"),
    ("best", "bool"), ("within_one_std", "bool"),
    ("energy_kwh_per_run", "float64"), ("co2_kg_per_run", "float64"), ("sweep_energy_kwh", "float64"),
    ("params", "Int64"), ("flops", "Int64"), ("latency_ms", "float64"),
    ("notes", "string"), ("database", "string"), ("generated_by_commit", "string"),
)


@dataclass
class Row:
    label: str
    row_id: str
    arm: Arm
    mean: Optional[float] = None
    std: Optional[float] = None
    comparison: Optional[verdicts_.Comparison] = None   # against the tuned student (None: the reference)
    p_raw: Optional[float] = None
    p_holm: Optional[float] = None
    best: bool = False
    within_one_std: bool = False
    energy_kwh: Optional[float] = None
    co2_kg: Optional[float] = None
    sweep_energy_kwh: Optional[float] = None
    tuning: Optional["Tuning"] = None    # both arms' tuning budgets of this comparison
    matched: Dict[str, "Matched"] = field(default_factory=dict)   # 'time' / 'energy' -> equal-compute lift
    notes: List[str] = field(default_factory=list)

    @property
    def is_baseline(self) -> bool:
        return self.label == STUDENT_ONLY

    @property
    def verdict(self):
        return None if self.comparison is None else self.comparison.verdict

    @property
    def lift(self) -> Optional[float]:
        return None if self.verdict is None else self.verdict.lift


@dataclass
class Tuning:
    """The tuning budgets behind one comparison (``harness.sweep.budget``): as the sweep recorded
    them on the rerun rows (``extra_json.tuning_budget``), else counted from the sweeps' stored rows."""
    distilled: Any                       # harness.sweep.budget.Budget
    student: Any
    source: str                          # 'recorded by the sweep' | 'counted from the stored rows'
    student_trials: Optional[int] = None  # N: the student's first N trials of its growing sequence
    unequal: Optional[str] = None        # the mark with both numbers, or None
    crossing: Optional[int] = None       # smallest budget from which distilled's expected best stays above
    crossing_note: str = ""


@dataclass
class Matched:
    """The lift at equal compute: the distilled arm's reruns against the tuned student-only
    configuration rerun on the same seeds with its iterations scaled by the measured cost ratio
    (``extra_json.stage_kind == "compute_matched"`` rows of the student-only arm, ``matched_to`` the
    distilled arm's sweep id). `measure`: 'time' (wall-clock per iteration) or 'energy' (kWh per run)."""
    measure: str
    verdict: Any                         # harness.stats.Verdict (not in the Holm family: a second view)
    ratio: Optional[float] = None        # distilled cost / student cost, as measured
    iterations: Optional[int] = None     # the student's scaled iterations
    device: str = ""
    runs: int = 0
    shared_with: Optional[str] = None    # its runs are those of this measure's control (same iterations)


@dataclass
class BlockTable:
    block: Block
    rows: List[Row]
    efficiency: Any = None            # harness.measure.efficiency.Efficiency (plain data) or None
    efficiency_note: str = ""
    notes: List[str] = field(default_factory=list)
    verdicts: Optional[verdicts_.BlockVerdicts] = None


# ------------------------------------------------------------------------------------- compute
def _order(label: str) -> Tuple[int, int, str]:
    return (0 if label == STUDENT_ONLY else 1, label.count("+"), label)


def build_block(block: Block, store=None, test: str = "t", min_seeds: int = 3, efficiency: Any = None,
                verdicts: Optional[verdicts_.BlockVerdicts] = None) -> BlockTable:
    """The shown rows of one block; the numbers come from `verdicts` (default: computed here over
    every arm of the block). `efficiency` is the block's measured cost (an object with params,
    flops, latency_ms and describe()), or a text saying why it is missing, or None (no columns)."""
    if test not in TESTS:
        raise ValueError(f"unknown test '{test}'; valid: {', '.join(TESTS)}")
    verdicts = verdicts if verdicts is not None else verdicts_.verdicts_of(block)
    base = block.baseline
    table = BlockTable(block, [], verdicts=verdicts)
    if base is None:
        table.notes.append(f"no tuned student-only arm: no completed '{STUDENT_ONLY}' rerun rows for "
                           f"{block.dataset}/{block.student} with budget {block.budget}; lifts and tests n/a "
                           f"(run the sweep's reruns stage for this student)")
    if not any(label != STUDENT_ONLY for label in block.all_arms):
        table.notes.append("no distilled arm in this block yet: run python -m harness sweep +method=NAME")
    own = len(verdicts.vs_student)
    m = verdicts.family_sizes[0]
    if own:
        shown = sum(1 for l in block.arms if l != STUDENT_ONLY)
        others = m - own
        table.notes.append(f"family: the {own} distilled arm(s) of this block vs the tuned student-only arm"
                           + (f", and the {others} of the other block(s) of this comparison against their own "
                              f"student-only winner" if others else "")
                           + f" (Holm over m = {m}" + (f"; {own - shown} hidden by the filter, still counted" if shown < own else "")
                           + f"; simultaneous intervals at {100 * verdicts_.stats.simultaneous_level(0.95, m):.2f} %)")
    table.notes += block.notes
    for label in sorted(block.arms, key=_order):
        arm = block.arms[label]
        row = Row(label, block.row_id(label), arm, arm.mean, arm.std)
        if arm.n == 1:
            row.notes.append("one seed: no std, no test")
        elif arm.n < min_seeds:
            row.notes.append(f"{arm.n} seeds < report.min_seeds = {min_seeds}")
        for lost in arm.lost_reasons():
            row.notes.append(f"not completed, left out: {lost}")
        row.notes += [f"seeds: {s}" for s in [((r.get("extra_json") or {}).get("seeds_rule") or {}).get("stopped") for r in arm.rows][-1:] if s]
        comp = verdicts.vs_student.get(label)
        if comp is not None:
            row.comparison = comp
            row.p_raw = comp.verdict.p if test == "t" else comp.permutation.p
            row.p_holm = verdicts.p(comp, test)
            for text in comp.verdict.notes:
                if text not in row.notes:
                    row.notes.append(text)
            if test == "permutation" and comp.permutation.warning:
                row.notes.append(comp.permutation.warning)
            if comp.verdict.underpowered:
                row.notes.append(f"underpowered: |lift| {100 * abs(comp.verdict.lift):.2f} < "
                                 f"{100 * comp.verdict.mde_family:.2f} points, the smallest lift this design detects "
                                 f"at 80 % power (n = {comp.verdict.n_pairs or min(comp.verdict.n_a, comp.verdict.n_b)}, "
                                 f"sd {100 * comp.verdict.sd:.2f}, alpha 0.05/{comp.family_size})")
        _energy(row, arm, store)
        if comp is not None and store is not None:
            row.matched = _matched(store, arm)
            row.tuning = _tuning(store, arm, base)
            if row.tuning.unequal:
                row.notes.append(row.tuning.unequal)
        table.rows.append(row)
    _expected_best(table, store)
    _mark_best(table.rows)
    if isinstance(efficiency, str):
        table.efficiency_note = efficiency
    else:
        table.efficiency = efficiency
    return table


def _energy(row: Row, arm: Arm, store) -> None:
    row.energy_kwh, missing_e = arm.total("energy_kwh")
    row.co2_kg, _ = arm.total("co2_kg")
    if row.energy_kwh is None:
        row.notes.append("no energy recorded for these runs (energy.enabled false or codecarbon unavailable)")
    elif missing_e:
        row.notes.append(f"energy: mean of the {arm.n - missing_e} of {arm.n} runs that recorded it")
    if store is None:
        return
    sweep_ids = sorted({r["sweep_id"] for r in arm.rows if r.get("sweep_id")})
    if not sweep_ids:
        return
    runs = store.query(sweep_id=sweep_ids)
    have = [r["energy_kwh"] for r in runs if r["energy_kwh"] is not None]
    row.sweep_energy_kwh = sum(have) if have else None
    if have and len(have) < len(runs):
        row.notes.append(f"sweep energy: {len(runs) - len(have)} of {len(runs)} runs without energy (not counted)")


COMPUTE_MATCHED = "compute_matched"   # the stage kind of the equal-compute control (blocks.CONTROL_KINDS)


def _matched(store, arm: Arm) -> Dict[str, Matched]:
    """measure -> the equal-compute verdict of a distilled arm (empty when the sweep ran no such stage)."""
    from harness import stats

    if not arm.sweep_ids:
        return {}
    from harness.sweep.budget import measure_of, stands_for

    rows = [r for r in store.query(arm=STUDENT_ONLY)
            if (r.get("extra_json") or {}).get("stage_kind") == COMPUTE_MATCHED
            and (r.get("extra_json") or {}).get("matched_to") in arm.sweep_ids]
    measures = {m for r in rows for m in [measure_of(r.get("extra_json") or {}),
                                          *((r.get("extra_json") or {}).get("also_measures") or {})]}
    out: Dict[str, Matched] = {}
    for measure in sorted(measures):
        mine = [r for r in rows if stands_for(r.get("extra_json") or {}, measure) is not None]
        done = {int(r["seed"]): r["final_miou"] for r in mine
                if r["status"] == "completed" and r["final_miou"] is not None and r["seed"] is not None}
        e = (mine[-1].get("extra_json") or {}) if mine else {}
        ratio, iterations, _ = stands_for(e, measure) if e else (None, None, None)
        out[measure] = Matched(measure, stats.compare_seeds(arm.by_seed, done), ratio, iterations,
                               str(e.get("device") or ""), len({r["seed"] for r in mine}),
                               shared_with=None if not e or measure_of(e) == measure else measure_of(e))
    return out


def _tuning_rows(store, arm: Arm) -> List[Dict[str, Any]]:
    """The tuning rows (every search stage, not the reruns) of the sweep(s) behind an arm."""
    if not arm.sweep_ids:
        return []
    is_rerun = RerunStages()
    return [r for r in store.query(sweep_id=arm.sweep_ids) if not is_rerun(r)[0] and not is_control(r)]


def _tuning(store, arm: Arm, base: Arm) -> Tuning:
    from harness.sweep.budget import Budget, arm_budget, unequal

    recorded = [(r.get("extra_json") or {}) for r in arm.rows + arm.lost]
    recorded = [e for e in recorded if e.get("tuning_budget")]
    if recorded:
        e = recorded[-1]
        b = e["tuning_budget"]
        t = Tuning(Budget.from_dict(b.get("distilled")), Budget.from_dict(b.get(STUDENT_ONLY)), "recorded by the sweep",
                   (e.get("student_arm") or {}).get("trials"))
        t.unequal = e.get("unequal_tuning_budget") or unequal(t.student, t.distilled)
        return t
    t = Tuning(arm_budget(_tuning_rows(store, arm)), arm_budget(_tuning_rows(store, base)) if base else Budget(),
               "counted from the stored rows (the sweep predates recorded budgets)")
    t.unequal = unequal(t.student, t.distilled)
    return t


def _expected_best(table: BlockTable, store) -> None:
    """The smallest budget from which each distilled arm's expected best tune mIoU stays above the
    student-only arm's (``harness.report.tuning``)."""
    if store is None or table.block.baseline is None:
        return
    from harness.report.tuning import arm_tuning, smallest_budget_above

    try:
        student = arm_tuning(store, table.block.baseline)
    except Exception as exc:  # noqa: BLE001 - a curve that cannot be drawn must not hide the table
        table.notes.append(f"expected best vs budget not computed: {exc}")
        return
    for r in table.rows:
        if r.tuning is None:
            continue
        distilled = arm_tuning(store, r.arm)
        if not distilled.n or not student.n:
            r.tuning.crossing_note = "no tuning trials with a tune mIoU"
            continue
        r.tuning.crossing = smallest_budget_above(distilled.curve, student.curve)
        common = min(distilled.n, student.n)
        r.tuning.crossing_note = (f"never above within {common} trials" if r.tuning.crossing is None
                                  else f"above from {r.tuning.crossing} of {common} trials")
        if distilled.lower_bound or student.lower_bound:
            r.tuning.crossing_note += " (pruned trials at their cut value: lower-bound curves)"


def _mark_best(rows: List[Row]) -> None:
    scored = [r for r in rows if r.mean is not None]
    if not scored:
        return
    best = max(scored, key=lambda r: r.mean)
    best.best = True
    if best.std is None:
        return
    for r in scored:
        if r is not best and best.mean - r.mean <= best.std:
            r.within_one_std = True


def build(blocks: Sequence[Block], store=None, efficiency: Optional[Dict[Any, Any]] = None,
          **kw) -> List[BlockTable]:
    """One table per block; `efficiency`: block key -> measured cost or why it is missing."""
    return [build_block(b, store=store, efficiency=(efficiency or {}).get(b.key), **kw) for b in blocks]


def underpowered(r: Row) -> bool:
    """The observed |lift| is below the smallest lift the design detects at the family's alpha."""
    return bool(r.verdict is not None and r.verdict.underpowered)


# ---------------------------------------------------------------------------------- rendering
def _mean_cell(r: Row) -> str:
    if r.mean is None:
        return MISSING if not r.arm.runs else f"{MISSING} (0/{r.arm.runs})"
    std = MISSING if r.std is None else f"{100 * r.std:.2f}"
    runs = r.arm.runs
    mark = "" if runs == r.arm.n else " !"
    return f"{100 * r.mean:.2f} +- {std} ({r.arm.n}/{runs}){mark}"


def _lift_cell(r: Row) -> str:
    if r.is_baseline:
        return "(reference)"
    v = r.verdict
    if v is None or v.lift is None:
        return MISSING
    inner = f"[{100 * v.low:+.2f}, {100 * v.high:+.2f}]" if v.low is not None else f"[{MISSING}]"
    return f"{100 * v.lift:+.2f} {inner}" + ("" if v.design != "unpaired" else " W")


def _p_cell(r: Row) -> str:
    if r.is_baseline:
        return ""
    return MISSING if r.p_holm is None else f"{fmt_p(r.p_holm)}{stars(r.p_holm)}"


def _effect_cell(r: Row) -> str:
    v = r.verdict
    if r.is_baseline:
        return ""
    return MISSING if v is None or v.effect is None else f"{v.effect:+.2f}"


def _improve_cell(r: Row) -> str:
    v = r.verdict
    if r.is_baseline:
        return ""
    if v is None or v.p_improve is None:
        return MISSING
    if v.p_improve_low is None:
        return f"{v.p_improve:.2f}"
    return f"{v.p_improve:.2f} [{v.p_improve_low:.2f}, {v.p_improve_high:.2f}]"


def _mde_cell(r: Row) -> str:
    v = r.verdict
    if r.is_baseline:
        return ""
    if v is None or v.mde_family is None:
        return MISSING
    return f"{100 * v.mde_family:.2f}" + (" !" if underpowered(r) else "")


def _seeds_cell(r: Row) -> str:
    v = r.verdict
    if r.is_baseline:
        return ""
    return MISSING if v is None or v.seeds_for_halfwidth is None else str(v.seeds_for_halfwidth)


def _energy_cell(value: Optional[float], scale: float, digits: int = 3) -> str:
    """Three significant digits (a smoke run's energy is a few millionths of a kWh)."""
    return MISSING if value is None else f"{value * scale:.{digits}g}"


def _eff_cells(t: BlockTable) -> Tuple[str, str, str]:
    e = t.efficiency
    if e is None:
        return MISSING, MISSING, MISSING
    lat = MISSING if e.latency_ms is None else f"{e.latency_ms:.1f}"
    return f"{e.params / 1e6:.2f}", f"{e.flops / 1e9:.2f}", lat


def _footnotes(t: BlockTable) -> List[str]:
    out = list(t.notes)
    out += [f"[{r.label}] {n}" for r in t.rows for n in r.notes]
    if t.efficiency_note:
        out.append(t.efficiency_note)
    elif t.efficiency is not None:
        out.append(t.efficiency.describe())
    return out


HEADER = ("id", "arm", "mIoU mean +- std (done/run)", "lift [95% CI]", "p (Holm)", "d_z", "P(impr.) [95% CI]",
          "MDE", "seeds +-1", "kWh/run", "g CO2/run", "sweep kWh", "params M", "GFLOPs", "latency ms")

LEGEND = ("Tuned arms against the tuned student-only arm (rerun seeds, val mIoU in %). Lift = mean of the per-seed "
          "differences (paired: both arms rerun the same seeds) with its 95% paired-t interval (W: the arms share "
          "fewer than two seeds, Welch's interval). p = {test}, Holm-corrected over the block's family (every "
          "distilled arm vs the tuned student; stated under each block; a filter never changes it) "
          "(* < 0.05, ** < 0.01, *** < 0.001). d_z = lift / sd of the differences. P(impr.) = share of seeds on which "
          "the distilled arm beats the student, exact 95% interval. MDE = smallest lift detectable at 80% power with "
          "this n and sd at Holm's first-step alpha (0.05/m); ! = the observed lift is smaller, this design cannot "
          "confirm it. seeds +-1 = seeds per arm a +-1 point interval needs at this sd. done/run = completed / started "
          "seeds (! = some did not complete, listed under the block). **Bold**: best mean of the block; _italic_ "
          "(underlined in LaTeX): within one std of it.")


def test_name(test: str) -> str:
    return "paired t-test (Welch when unpaired)" if test == "t" else "exact permutation test"


TUNING_HEADER = ("arm", "distilled: trials (done/pruned/failed)", "iterations", "kWh",
                 "student-only: trials (done/pruned/failed)", "iterations", "kWh", "budgets", "expected best above student")


def _budget_cells(b) -> List[str]:
    kwh = MISSING if b.started and b.kwh_missing == b.started else f"{b.kwh:.3g}"
    if b.kwh_missing and b.kwh_missing < b.started:
        kwh += f" ({b.kwh_missing} unmeasured)"
    return [f"{b.started} ({b.completed}/{b.pruned}/{b.failed})", str(b.iterations), kwh]


def _tuning_table(t: BlockTable) -> List[str]:
    rows = [r for r in t.rows if r.tuning is not None]
    if not rows:
        return []
    body = []
    for r in rows:
        tu = r.tuning
        student = _budget_cells(tu.student)
        if tu.student_trials is not None:
            student[0] = f"{student[0]}, first {tu.student_trials} of the sequence"
        parity = "UNEQUAL" if tu.unequal else "equal (student >= distilled)"
        body.append([r.label, *_budget_cells(tu.distilled), *student, parity, tu.crossing_note or MISSING])
    sources = sorted({r.tuning.source for r in rows})
    return ["", f"Tuning budgets of each comparison ({'; '.join(sources)}; trials and iterations as run, a "
                f"pruned trial counting the iterations it ran):", ""] + markdown_table(TUNING_HEADER, body, "lrrrrrrll")


MATCHED_HEADER = ("arm", "lift at equal iterations [95% CI]", "lift at equal compute: wall-clock [95% CI]",
                  "cost ratio (time)", "lift at equal compute: energy [95% CI]", "cost ratio (energy)")


def _verdict_cell(v) -> str:
    if v is None or v.lift is None:
        return MISSING
    inner = f"[{100 * v.low:+.2f}, {100 * v.high:+.2f}]" if v.low is not None else f"[{MISSING}]"
    return f"{100 * v.lift:+.2f} {inner}" + (" W" if v.design == "unpaired" else "")


def cost_ratios(arm: Arm, base: Optional[Arm]) -> Dict[str, float]:
    """Distilled / student-only cost of one run, measured on the reruns: 'time' = mean training seconds
    per iteration, 'energy' = mean kWh per run (only where both arms recorded it)."""
    def mean(values):
        values = [v for v in values if v is not None and v > 0]
        return sum(values) / len(values) if values else None

    if base is None:
        return {}
    out = {}
    per_it = lambda a: mean(r["train_time_s"] / r["iterations"] for r in a.rows  # noqa: E731
                            if r.get("train_time_s") and r.get("iterations"))
    for measure, f in (("time", per_it), ("energy", lambda a: mean(r.get("energy_kwh") for r in a.rows))):
        d, s = f(arm), f(base)
        if d is not None and s is not None:
            out[measure] = d / s
    return out


def _matched_table(t: BlockTable) -> List[str]:
    rows = [r for r in t.rows if not r.is_baseline and r.comparison is not None]
    if not rows:
        return []
    body, devices = [], set()
    for r in rows:
        cells = [r.label, _verdict_cell(r.verdict)]
        measured = cost_ratios(r.arm, t.block.baseline)
        for measure in ("time", "energy"):
            m = r.matched.get(measure)
            if m is None:
                ratio = measured.get(measure)
                cells += [f"{MISSING} (stage not run)",
                          MISSING if ratio is None else f"{ratio:.2f}x (from the reruns)"]
                continue
            devices.add(m.device or MISSING)
            ratio = MISSING if m.ratio is None else f"{m.ratio:.2f}x" + (f", {m.iterations} it." if m.iterations else "")
            if m.shared_with:
                ratio += f" (the {m.shared_with} control's runs)"
            cells += [_verdict_cell(m.verdict), ratio]
        body.append(cells)
    what = ("the tuned student-only configuration rerun on the same seeds with its iterations scaled so its "
            "training compute equals the distilled arm's (teacher forward, method terms and extra steps charged "
            "to the distilled arm), the cost ratio measured on " + (", ".join(sorted(devices)) or "the sweep's device")
            + "; paired t interval, not in the Holm family")
    return ["", f"Lift at equal compute ({what}):", ""] + markdown_table(MATCHED_HEADER, body, "lrrrrr")


def to_markdown(tables: Sequence[BlockTable], source: Sequence[str], test: str = "t",
                empty_message: str = "") -> str:
    lines = ["# Leaderboard", "", LEGEND.format(test=test_name(test)), ""]
    if not tables:
        lines += [empty_message or "No completed rerun rows in the database.", ""]
    for t in tables:
        lines += [f"## {t.block.title}", ""]
        body = []
        params, flops, lat = _eff_cells(t)
        for r in t.rows:
            mean = _mean_cell(r)
            mean = f"**{mean}**" if r.best else f"_{mean}_" if r.within_one_std else mean
            label = r.label + (" (unequal tuning budget)" if r.tuning is not None and r.tuning.unequal else "")
            body.append([r.row_id, label, mean, _lift_cell(r), _p_cell(r), _effect_cell(r), _improve_cell(r),
                         _mde_cell(r), _seeds_cell(r),
                         _energy_cell(r.energy_kwh, 1), _energy_cell(r.co2_kg, 1000),
                         _energy_cell(r.sweep_energy_kwh, 1), params, flops, lat])
        lines += markdown_table(HEADER, body, "ll" + "r" * (len(HEADER) - 2))
        lines += _tuning_table(t)
        lines += _matched_table(t)
        notes = _footnotes(t)
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        lines.append("")
    lines += ["---", ""] + [f"{s}  " for s in source]
    return "\n".join(lines).rstrip() + "\n"


def to_latex(tables: Sequence[BlockTable], source: Sequence[str], test: str = "t",
             empty_message: str = "") -> str:
    ncol = 11   # the row id, seeds +-1 and energy per run go into the CSV / Markdown only
    out = [f"% {s}" for s in source]
    out += [r"% needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering", r"\scriptsize",
            r"\begin{tabular}{l" + "r" * (ncol - 1) + "}", r"\toprule",
            " & ".join([r"Arm", r"mIoU (\%)", r"Lift [95\% CI]", r"$p_\mathrm{Holm}$", r"$d_z$",
                        r"$P(\mathrm{impr.})$", r"MDE", r"Sweep kWh", r"Params (M)", r"GFLOPs",
                        r"Latency (ms)"]) + r" \\"]
    if not tables:
        out += [r"\midrule", rf"\multicolumn{{{ncol}}}{{l}}{{{tex(empty_message or 'No completed rerun rows.')}}} \\"]
    for t in tables:
        out += [r"\midrule", rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{{tex_title(t.block.title)}}}}} \\", r"\midrule"]
        params, flops, lat = _eff_cells(t)
        for r in t.rows:
            if r.mean is None:
                mean = MISSING
            else:
                std = MISSING if r.std is None else f"{100 * r.std:.2f}"
                mean = rf"{100 * r.mean:.2f} $\pm$ {std} ({r.arm.n}/{r.arm.runs})"
            mean = rf"\textbf{{{mean}}}" if r.best else rf"\underline{{{mean}}}" if r.within_one_std else mean
            p = "" if r.is_baseline else (MISSING if r.p_holm is None else
                                          fmt_p(r.p_holm).replace("<", "$<$") + (f"$^{{{stars(r.p_holm)}}}$" if stars(r.p_holm) else ""))
            cells = [tex(r.label), mean, tex(_lift_cell(r)).replace("+-", r"$\pm$"), p, tex(_effect_cell(r)),
                     tex(_improve_cell(r)), tex(_mde_cell(r)), _energy_cell(r.sweep_energy_kwh, 1), params, flops, lat]
            out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}",
            rf"\caption{{Tuned arms against the tuned student-only arm: val mIoU mean $\pm$ std (completed/started "
            rf"seeds), lift = mean per-seed difference with its 95\% paired-$t$ interval (W: Welch, unpaired), "
            rf"{tex(test_name(test))} $p$-value Holm-corrected over the distilled arms of each block "
            rf"($^{{*}}$ $<$0.05, $^{{**}}$ $<$0.01, $^{{***}}$ $<$0.001), effect size $d_z$, share of seeds improved "
            rf"with exact 95\% interval, smallest lift detectable at 80\% power at Holm's first-step $\alpha$ "
            rf"(! = observed lift below it). Best mean in bold, within one std of it underlined. n/a: see "
            rf"leaderboard.md for the reason.}}",
            r"\label{tab:leaderboard}", r"\end{table}"]
    return "\n".join(out) + "\n"


def _seed_values(arm: Arm) -> Optional[str]:
    """'1:30.12 2:29.87 ...' (percentage points, full precision of the stored value)."""
    vals = arm.by_seed
    return " ".join(f"{s}:{100 * vals[s]!r}" for s in sorted(vals)) or None


def csv_rows(tables: Sequence[BlockTable], database: str, commit: str, test: str = "t") -> List[Dict[str, Any]]:
    out = []
    for t in tables:
        b, e = t.block, t.efficiency
        for r in t.rows:
            protocols = sorted({p for p in (protocol_of(x) for x in r.arm.rows + r.arm.lost) if p})
            c, v, tu = r.comparison, r.verdict, r.tuning
            perm = c.permutation if c else None
            out.append({
                "dataset": b.dataset, "student": b.student, "teacher": b.teacher, "budget": b.budget,
                "protocol": ",".join(protocols) or None, "row_id": r.row_id,
                "arm": STUDENT_ONLY if r.is_baseline else "distilled",
                "methods": None if r.is_baseline else r.label.split("@")[0],
                "sweep_id": ",".join(r.arm.sweep_ids) or None, "n": r.arm.n, "runs": r.arm.runs,
                "seeds": " ".join(map(str, r.arm.seeds)) or None, "miou_by_seed_pct": _seed_values(r.arm),
                "lost_seeds": "; ".join(r.arm.lost_reasons()) or None,
                "miou_mean_pct": pct(r.mean, 6), "miou_std_pct": pct(r.std, 6),
                "design": v.design or None if v else None,
                "paired_seeds": " ".join(map(str, v.seeds)) or None if v else None,
                "lift_pct": pct(v.lift, 6) if v else None,
                "lift_ci_low_pct": pct(v.low, 6) if v else None, "lift_ci_high_pct": pct(v.high, 6) if v else None,
                "lift_simultaneous_low_pct": pct(c.simultaneous[0], 6) if c else None,
                "lift_simultaneous_high_pct": pct(c.simultaneous[1], 6) if c else None,
                "simultaneous_level": c.simultaneous_level if c else None,
                "test": (v.test or None) if v and test == "t" else (perm.test if perm else None),
                "t_statistic": v.statistic if v else None, "df": v.df if v else None,
                "p_raw": r.p_raw, "p_holm": r.p_holm,
                "family": f"{c.family} of block {b.title}" if c else None, "family_size": c.family_size if c else None,
                "marker": stars(r.p_holm) or None,
                "p_permutation": perm.p if perm else None, "p_permutation_holm": c.p_perm_holm if c else None,
                "permutation_min_p": perm.min_p if perm else None,
                "effect_size": v.effect if v else None, "effect_name": (v.effect_name or None) if v else None,
                "sd_pct": pct(v.sd, 6) if v else None,
                "p_improvement": v.p_improve if v else None, "p_improvement_low": v.p_improve_low if v else None,
                "p_improvement_high": v.p_improve_high if v else None,
                "mde_pct": pct(v.mde, 6) if v else None, "mde_alpha_family_pct": pct(v.mde_family, 6) if v else None,
                "underpowered": v.underpowered if v else None, "seeds_for_1pt": v.seeds_for_halfwidth if v else None,
                "tuning_trials_distilled": tu.distilled.started if tu else None,
                "tuning_iterations_distilled": tu.distilled.iterations if tu else None,
                "tuning_kwh_distilled": tu.distilled.kwh if tu else None,
                "tuning_trials_student": tu.student.started if tu else None,
                "tuning_iterations_student": tu.student.iterations if tu else None,
                "tuning_kwh_student": tu.student.kwh if tu else None,
                "tuning_budget": (tu.unequal or "equal") if tu else None,
                "expected_best_above_from": tu.crossing if tu else None,
                **_matched_csv(r),
                "best": r.best, "within_one_std": r.within_one_std,
                "energy_kwh_per_run": r.energy_kwh, "co2_kg_per_run": r.co2_kg,
                "sweep_energy_kwh": r.sweep_energy_kwh,
                "params": e.params if e else None, "flops": e.flops if e else None,
                "latency_ms": e.latency_ms if e else None,
                "notes": "; ".join(t.notes + r.notes + ([t.efficiency_note] if t.efficiency_note else [])) or None,
                "database": database, "generated_by_commit": commit,
            })
    return out


def _matched_csv(r: Row) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for measure in ("time", "energy"):
        m = r.matched.get(measure)
        v = m.verdict if m else None
        out[f"lift_equal_{measure}_pct"] = pct(v.lift, 6) if v else None
        out[f"lift_equal_{measure}_low_pct"] = pct(v.low, 6) if v else None
        out[f"lift_equal_{measure}_high_pct"] = pct(v.high, 6) if v else None
        out[f"cost_ratio_{measure}"] = m.ratio if m else None
    return out


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    import pandas as pd

    df = pd.DataFrame(rows, columns=[c for c, _ in CSV_COLUMNS])
    df.to_csv(path, index=False)


def read_csv(path) -> "Any":
    """The leaderboard CSV as a DataFrame with its declared dtypes (strings as pandas 'string')."""
    import pandas as pd

    return pd.read_csv(path, dtype=dict(CSV_COLUMNS), keep_default_na=True)


# ---------------------------------------------------------------------------------------- write
def write(cfg: Dict[str, Any], store, filters: Filters = Filters(), blocks: Optional[Sequence[Block]] = None,
          efficiency: Optional[Dict[Any, Any]] = None, quiet: bool = False) -> Dict[str, Path]:
    """Build the leaderboard of `blocks` (default: the filtered blocks of `store`), write the three
    files into cfg's results folder, return their paths. `efficiency`: see `build`."""
    from harness.provenance import git_commit

    test = filters.test
    if blocks is None:
        blocks = load_blocks(store, **filters.selection())
    min_seeds = int((cfg.get("report") or {}).get("min_seeds", 3))
    tables = build(blocks, store, efficiency, test=test, min_seeds=min_seeds)
    rows = [x for t in tables for x in t.block.rows]
    shown = filters.shown()
    source = source_lines(store.url, rows, what="leaderboard") + [f"Filters: {shown}"]
    empty = ""
    if not tables:
        empty = (f"No completed rerun rows{' matching ' + shown if shown != 'none' else ''} in {store.url}: "
                 f"run python -m harness sweep +method=NAME first (its last stage, reruns, fills this table).")
    return publish(cfg["paths"]["results"], "leaderboard", {
        "md": to_markdown(tables, source, test, empty),
        "csv": lambda path: write_csv(csv_rows(tables, store.url, git_commit() or "", test), path),
        "tex": to_latex(tables, source, test, empty)}, quiet, empty)
