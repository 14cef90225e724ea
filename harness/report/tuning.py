"""Expected best tune mIoU against the tuning budget (issue 11, item 5).

How good a configuration does an arm find with n trials? Dodge et al. 2019 ("Show Your Work:
Improved Reporting of Experimental Results", EMNLP) plot the expected maximum of the validation
score over n hyperparameter trials against n; Tang et al. 2020 ("Showing Your Work Doesn't Always
Work", ACL) show that Dodge's estimator (sampling the N observed trials *with* replacement) is
biased for n close to N and give the unbiased one: the U-statistic of sampling *without*
replacement. With the N observed values sorted ascending, v_(1) <= ... <= v_(N),

    E[max of n]  = sum_{i=n..N} v_(i) * C(i-1, n-1) / C(N, n)            1 <= n <= N  (Tang et al.)
    E~[max of n] = sum_{i=1..N} v_(i) * [(i/N)^n - ((i-1)/N)^n]           n >= 1       (Dodge et al.)

The first is exactly the mean, over all C(N, n) subsets of n of the observed trials, of the
subset's best value (C(i-1, n-1) subsets have v_(i) as their largest member); n = 1 gives the mean,
n = N the maximum. Its weights are computed with exact integer binomials, so N in the hundreds is
stable. Both are non-decreasing in n and in every value.

**Which trials.** The trial rows of an arm are the rows of its sweep (``sweep_id``) that are not
rerun rows (``extra_json.stage_kind != "rerun"``; rows recorded without a stage kind: the rerun
stages of their protocol, ``harness.report.blocks.RerunStages``), in the order they were run
(``created_at``, then run id): every search stage (lr x wd, temperatures, weights, their
combination), all on the tune split. The value of a trial is its tune mIoU at the end of training
(``final_miou``). The estimator treats the arm's trials as one exchangeable pool; the protocol's
later stages search around the earlier winners, so the curve reads "best of n of the trials this
protocol ran", not "best of n independent random draws".

**Pruned trials are included, at the last tune mIoU they reported** (the value the sampler was
told, ``harness.sweep.runner.reward``), and the curve of an arm with pruned trials is drawn dashed
and labelled a lower bound. Why include rather than exclude:

* the value at the cut is a lower bound of what the trial would have reached by the end of training
  (as far as training improves a model; mIoU is not strictly monotone in iterations), and the
  estimator is non-decreasing in every value: with pruned trials at their cut value the curve is a
  lower bound of the curve at full fidelity. It is also what the protocol had in hand when it chose
  (a pruned trial never wins), so the curve still reads "what this protocol finds with n trials";
* excluding them would condition on surviving ASHA: the pool would keep only the trials that looked
  good at the first cut (an optimistic, survivor-selected curve), and the x axis would no longer
  count the trials the arm spent (issue 11: an ASHA stage completed 1 of 6 trials; excluding would
  leave a one-point curve for a six-trial budget).

The arm with more pruning therefore gets the more pessimistic curve; the figure gives every arm's
counts so a reader can see it. ``stopped`` rows (ended early by their caller) are treated like
pruned ones. Failed trials are excluded (their mIoU measures the crash, not the configuration) and
counted in a note, as are completed or pruned rows without a tune mIoU.

**Smallest budget above.** ``smallest_budget_above(d, s)`` is the smallest n from which the
distilled curve stays strictly above the student-only curve for every larger n where both are
defined (n <= min(N_d, N_s)); ``None`` ("never") when it is not above at the last common n.

The report layer only reads: this module imports no model code. ``harness.report.figures`` draws
through it (``expected_best_figures``), so its few small plotting helpers (Agg backend, save with
the source under the plot, leaderboard row order) are repeated here rather than imported
from there or from ``leaderboard`` (the import graph has no loops).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from harness.report.blocks import STUDENT_ONLY, Arm, Block, RerunStages, is_control, source_lines
from harness.report.names import block_title, method_name

Output = Tuple[Optional[Path], str]  # as in harness.report.figures

EARLY = ("pruned", "stopped")  # ended before the last iteration: their value is the last one reported


# ---------------------------------------------------------------------------------- estimators
def _checked(values: Sequence[float]) -> List[float]:
    vals = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"expected-max values must be real numbers, got {v!r}")
        if not math.isfinite(v):
            raise ValueError(f"expected-max values must be finite, got {v!r}")
        vals.append(float(v))
    if not vals:
        raise ValueError("expected max of an empty set of trials: there is no observed value")
    return sorted(vals)


def _checked_n(n: Any, upper: Optional[int]) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"the number of trials n must be an integer, got {n!r}")
    if n < 1 or (upper is not None and n > upper):
        bound = f"1 <= n <= N = {upper}" if upper is not None else "n >= 1"
        raise ValueError(f"the number of trials n must satisfy {bound}, got n = {n}")
    return n


def expected_max(values: Sequence[float], n: int) -> float:
    """Unbiased expected maximum of `n` trials drawn without replacement from the N observed `values`
    (Tang et al. 2020, the U-statistic):

        E = sum_{i=n..N} v_(i) * C(i-1, n-1) / C(N, n),   v_(1) <= ... <= v_(N),   1 <= n <= N

    = the mean over all C(N, n) subsets of their maximum. Weights from exact integer binomials (one
    correctly rounded division each), stable for N in the hundreds. ValueError: empty or non-finite
    values, n not an integer in 1..N."""
    vals = _checked(values)
    return _expected_max(vals, _checked_n(n, len(vals)))


def _expected_max(vals: List[float], n: int) -> float:  # vals sorted ascending, 1 <= n <= N
    big_n = len(vals)
    total = math.comb(big_n, n)
    return math.fsum(vals[i - 1] * (math.comb(i - 1, n - 1) / total) for i in range(n, big_n + 1))


def expected_max_curve(values: Sequence[float]) -> List[float]:
    """[expected_max(values, n) for n = 1..N] (index 0 is n = 1). ValueError as expected_max."""
    vals = _checked(values)
    return [_expected_max(vals, n) for n in range(1, len(vals) + 1)]


def expected_max_with_replacement(values: Sequence[float], n: int) -> float:
    """Dodge et al. 2019's expected maximum of `n` trials drawn *with* replacement from the N observed
    `values` (the empirical CDF raised to the n-th power), for reference:

        E~ = sum_{i=1..N} v_(i) * [(i/N)^n - ((i-1)/N)^n],   n >= 1

    Biased low against the without-replacement estimator as n approaches N (Tang et al. 2020); n may
    exceed N. ValueError: empty or non-finite values, n not an integer >= 1."""
    vals = _checked(values)
    big_n = len(vals)
    n = _checked_n(n, None)
    return math.fsum(v * ((i / big_n) ** n - ((i - 1) / big_n) ** n) for i, v in enumerate(vals, start=1))


def smallest_budget_above(curve_distilled: Sequence[float], curve_student: Sequence[float]) -> Optional[int]:
    """The smallest n (1-based, index 0 of a curve is n = 1) from which `curve_distilled` stays
    strictly above `curve_student` for every larger n where both are defined (n <= the shorter
    curve's length); None ("never") when it is not above at the last common n, or when a curve is
    empty. Beyond the shorter curve nothing is known, so nothing is claimed. ValueError: a
    non-finite point."""
    for curve in (curve_distilled, curve_student):
        for v in curve:
            if v is None or not math.isfinite(v):
                raise ValueError(f"a curve point must be a finite number, got {v!r}")
    common = min(len(curve_distilled), len(curve_student))
    n = common
    while n >= 1 and curve_distilled[n - 1] > curve_student[n - 1]:
        n -= 1
    return None if n == common else n + 1


# ------------------------------------------------------------------------------- trial rows
@dataclass
class TuningValues:
    """The trials that feed one arm's curve: `values[k]` is the tune mIoU of `rows[k]`, in run order."""
    values: List[float] = field(default_factory=list)
    rows: List[Dict[str, Any]] = field(default_factory=list)
    pruned: int = 0                                       # included at their last reported tune mIoU
    failed: int = 0                                       # excluded
    notes: List[str] = field(default_factory=list)        # what was left out and why

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def lower_bound(self) -> bool:
        """True when pruned trials entered at their cut value: the curve is a lower bound."""
        return self.pruned > 0

    @property
    def curve(self) -> List[float]:
        """expected_max_curve of the values; [] without trials."""
        return expected_max_curve(self.values) if self.values else []

    def describe(self) -> str:
        """'6 trials (5 pruned: lower bound)' -- how the figure and tables name the pool."""
        text = f"{self.n} trial{'s' if self.n != 1 else ''}"
        extra = []
        if self.pruned:
            extra.append(f"{self.pruned} stopped early: curve is a lower bound")
        if self.failed:
            extra.append(f"{self.failed} failed, left out")
        return text + (f" ({'; '.join(extra)})" if extra else "")


def tuning_values(rows: Iterable[Dict[str, Any]]) -> TuningValues:
    """Which trial rows feed the expected-best curve, and with which value.

    Of `rows` (the rows of an arm's sweep), the trial rows are those that are not rerun rows
    (`extra_json.stage_kind != "rerun"`, or for rows without a stage kind not in their protocol's
    rerun stages, `blocks.RerunStages`), in the order they were run (`created_at`, then `run_id`).
    Value: the tune mIoU at the end of training (`final_miou`) of a completed trial; a pruned (or
    stopped) trial enters at the last tune mIoU it reported, which makes the curve a lower bound of
    the full-fidelity one (the estimator is non-decreasing in every value) instead of a curve of the
    trials that survived the first cut (see the module docstring for why). Failed trials, and
    trials without a tune mIoU, are left out and counted in `notes`."""
    is_rerun = RerunStages()
    out = TuningValues()
    no_value: Dict[str, int] = {}
    fallback = []
    trials = []
    for r in rows:
        rerun, note = is_rerun(r)
        if note:
            fallback.append(note)
        if not rerun and not is_control(r):  # compute-matched controls are no tuning trials
            trials.append(r)
    trials.sort(key=lambda r: (r.get("created_at") or "", r.get("run_id") or ""))
    for r in trials:
        status, value = r.get("status"), r.get("final_miou")
        if status == "failed":
            out.failed += 1
            continue
        if status not in ("completed", *EARLY) or value is None or not math.isfinite(value):
            no_value[status or "no status"] = no_value.get(status or "no status", 0) + 1
            continue
        out.values.append(float(value))
        out.rows.append(r)
        out.pruned += status in EARLY
    if out.failed:
        out.notes.append(f"{out.failed} failed trial(s) left out (their mIoU measures the failure)")
    for status, k in sorted(no_value.items()):
        out.notes.append(f"{k} {status} trial row(s) without a tune mIoU left out")
    out.notes += list(dict.fromkeys(fallback))
    return out


def arm_tuning(store, arm: Arm) -> TuningValues:
    """TuningValues of a leaderboard arm: the rows of the sweep(s) its rerun rows belong to."""
    sweep_ids = sorted({r["sweep_id"] for r in arm.rows if r.get("sweep_id")})
    if not sweep_ids:
        return TuningValues(notes=[f"{arm.label}: its rerun rows name no sweep, so it has no trial rows"])
    found = tuning_values(store.query(sweep_id=sweep_ids))
    if len(sweep_ids) > 1:
        found.notes.append(f"{arm.label}: the trials of {len(sweep_ids)} sweeps pooled "
                           f"({', '.join(sweep_ids)}), as its rerun rows are")
    return found


def block_tuning(store, block: Block) -> Dict[str, TuningValues]:
    """label -> TuningValues for every arm of `block` (student-only first, as the block orders them)."""
    return {label: arm_tuning(store, arm) for label, arm in block.arms.items()}


# ------------------------------------------------------------------------------------ figure
def shown_database(url: str) -> str:
    """The database as a footer names it: relative to the repository when inside it, else by file
    name only (no absolute path of the machine that drew the figure); a server URL without its
    password. A plain path (a JSON Lines export) is shown the same way."""
    from harness.config import PROJECT_ROOT

    def relative(path: str, prefix: str) -> str:
        p = Path(path).expanduser()
        try:
            return prefix + str(p.resolve().relative_to(PROJECT_ROOT))
        except ValueError:
            return f"{prefix}<outside the repository>/{p.name}"

    text = str(url)
    if "://" not in text:
        return relative(text, "")
    try:
        from sqlalchemy.engine import make_url

        u = make_url(text)
    except Exception:  # noqa: BLE001 - not a URL after all
        return relative(text, "")
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        return relative(u.database, "sqlite:///")
    return u.render_as_string(hide_password=True)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


FOOTER_PT = 8  # the source lines under every figure: readable in print


def source_text(lines: Sequence[str], fig_width_in: float) -> str:
    """The footer lines wrapped to the figure's width (monospace at FOOTER_PT: about 0.6 em a
    character), continuation lines indented."""
    import textwrap

    width = max(60, int(fig_width_in * 72 / (0.6 * FOOTER_PT)))
    out: List[str] = []
    for line in lines:
        out += textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False) or [""]
    return "\n".join(out)


def _save(fig, path: Path, lines: Sequence[str]) -> Path:
    """As harness.report.figures.save: PNG with its source under everything drawn."""
    bottom = fig.get_tightbbox(fig.canvas.get_renderer()).y0 / fig.get_figheight()
    fig.text(0.0, bottom - 0.02, source_text(lines, fig.get_figwidth()), fontsize=FOOTER_PT, va="top", ha="left",
             family="monospace")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _leaderboard_order(label: str) -> Tuple[int, int, str]:  # as harness.report.leaderboard orders rows
    return (0 if label == STUDENT_ONLY else 1, label.count("+"), label)


def expected_best_figures(store, blocks: Sequence[Block], out_dir: Path) -> List[Output]:
    """``tuning_<block>.png``: per block, the expected best tune mIoU (%) of each arm against the
    number of its trials (Tang et al. 2020's estimator), the arms labelled as the leaderboard labels
    them, with their trial counts and, for each distilled arm, the smallest budget from which it stays
    above the student-only arm (a dotted line where that is above 1); dashed: a lower bound (pruned
    trials at their cut value)."""
    if not blocks:
        return [(None, f"expected best vs tuning budget: no completed rerun rows in {shown_database(store.url)}")]
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    out: List[Output] = []
    for block in blocks:
        tuning = block_tuning(store, block)
        found = {label: t for label, t in tuning.items() if t.n}
        if not found:
            out.append((None, f"expected best vs tuning budget of {block.title}: no trial rows in its arms' sweeps"))
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        student = found.get(STUDENT_ONLY)
        said = []
        for i, label in enumerate(sorted(block.arms, key=_leaderboard_order)):
            if label not in found:
                said.append(f"{label}: no trial rows")
                continue
            t = found[label]
            xs = list(range(1, t.n + 1))
            curve = t.curve
            ys = [100 * v for v in curve]
            color = f"C{i % 10}"
            name = f"{method_name(label)} [{block.row_id(label)}]: {t.describe()}"
            if label != STUDENT_ONLY and student is not None:
                n = smallest_budget_above(curve, student.curve)
                above = f"above student-only from n = {n}" if n else "above student-only: never"
                said.append(f"{label} {above}")
                name += f"; {above}"
                if n and n > 1:
                    ax.axvline(n, color=color, ls=":", lw=1)
            ax.plot(xs, ys, "-" if not t.lower_bound else "--", marker="o", ms=3, color=color, label=name)
        ax.set_xlabel("tuning trials n", fontsize=9)
        ax.set_ylabel("expected best tune mIoU (%)", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.set_title(f"Expected best tune mIoU vs tuning budget\n{block_title(block)}", fontsize=10)
        fig.tight_layout()
        # below the axes (after the layout, which would shrink the axes for it), one arm a line:
        # inside, the legend hid the curves it names
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(-0.1, -0.15), frameon=False, ncol=1)
        rows = [r for t in found.values() for r in t.rows]
        lines = source_lines(shown_database(store.url), rows, "")
        lines[0] = (f"Source: expected best of n trials from {len(rows)} trial row(s) (search stages, tune split) "
                    f"of {shown_database(store.url)}")
        lines.insert(1, "Estimator: mean over all n-subsets of the arm's trials of their best (Tang et al. 2020, "
                        "unbiased; Dodge et al. 2019); dashed: pruned trials at their cut value, a lower bound")
        # the legend already says which arm is above the student-only arm from which n
        notes = [x for x in said if x.endswith("no trial rows")] + [n for t in tuning.values() for n in t.notes]
        lines += [f"Note: {n}" for n in dict.fromkeys(notes)]
        path = _save(fig, Path(out_dir) / f"tuning_{block.file_stem}.png", lines)
        out.append((path, f"expected best tune mIoU vs tuning budget of {block.title}"
                          + (f" ({'; '.join(said)})" if said else "")))
    return out
