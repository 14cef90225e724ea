"""Across blocks: each method over every comparison in the database (`reports/across.md`,
`reports/cd_diagram.png`).

**Gap closed.** In a block (dataset, student, teacher, budget; `harness.report.blocks`) a method's
gap closed is

    g = (mean distilled mIoU - mean tuned student-only mIoU) / (teacher val mIoU - mean tuned student-only mIoU)

over the rerun seeds of each arm: 0 = no better than the tuned student, 1 = as good as the teacher.
The teacher's val mIoU is the ``final_miou`` of the block's teacher row(s) in the store (arm
``teacher``, student = the block's teacher, same dataset and budget; the rows that trained the
teacher the distilled rows name in ``extra_json.teacher.trained_by_run`` when those are among them),
else the re-measured ``val_miou`` the distilled rows carry in their teacher provenance. Without
either, or when the teacher is not above the tuned student (denominator <= 0), the block's gap is
n/a with the reason, never 0.

**Across blocks** (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice", the
practice of rliable): the interquartile mean IQM = ``scipy.stats.trim_mean(g, 0.25)`` of the blocks'
gaps (the mean of the middle half; the plain mean below 4 blocks) and a 95 % percentile interval of
a **stratified bootstrap**: in each replicate the seeds of every block's student-only and distilled
arm are resampled with replacement within that block and arm, every block's gap is recomputed (the
teacher's mIoU held fixed), then the IQM. Seeds are never moved between blocks, so a block whose
seeds agree contributes no spread. With one block the IQM is that block's gap and the interval is
over its seeds only. rliable itself does not import with pandas 3, hence numpy/scipy here.

**Critical difference** (Demšar 2006, JMLR 7, Section 3.2.2): over blocks x arms (the tuned
student-only arm and every method present in every block used) of mean mIoU, the Friedman test
(``scipy.stats.friedmanchisquare``) and the Nemenyi critical difference of average ranks

    CD = q_alpha * sqrt(k (k + 1) / (6 N)),   q_alpha = studentized_range.ppf(1 - alpha, k, inf) / sqrt(2)

(k arms, N blocks), drawn as the usual diagram when N >= 3 and k >= 3; otherwise the text says why.
"""
from __future__ import annotations

import math
import statistics
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

from harness.report.blocks import MISSING, STUDENT_ONLY, Block, budget_of, load_blocks, source_lines
from harness.report.filters import Filters
from harness.report.render import markdown_table, publish

ALPHA = 0.05
CONFIDENCE = 0.95
REPS = 10_000          # bootstrap replicates
SEED = 0               # of the bootstrap's numpy Generator (mixed with the method's label)
MIN_FRIEDMAN = 3       # blocks and arms the Friedman test and the diagram need at least


# --------------------------------------------------------------------------------- the teacher
@dataclass
class TeacherMiou:
    value: Optional[float]
    source: str            # where the value comes from, or why there is none


def teacher_miou(store, block: Block) -> TeacherMiou:
    """The val mIoU of `block`'s teacher: its teacher row(s) in the store, else the re-measured value
    in the distilled rows' teacher provenance, else None with the reason."""
    if block.teacher is None:
        return TeacherMiou(None, "no distilled arm, hence no teacher")
    distilled = [r for label, a in block.arms.items() if label != STUDENT_ONLY for r in a.rows]
    provenance = [(r.get("extra_json") or {}).get("teacher") or {} for r in distilled]
    trained_by = {p["trained_by_run"] for p in provenance if p.get("trained_by_run")}
    rows = [r for r in store.query(arm="teacher", status="completed", dataset=block.dataset, student=block.teacher)
            if budget_of(r) == block.budget and r.get("final_miou") is not None]
    named = [r for r in rows if r["run_id"] in trained_by]
    rows = named or rows
    if rows:
        ids = ", ".join(str(r["run_id"]) for r in rows)
        mean = statistics.fmean(r["final_miou"] for r in rows)
        return TeacherMiou(mean, f"teacher row {ids}" if len(rows) == 1 else f"mean of teacher rows {ids}")
    measured = sorted({p["val_miou"] for p in provenance if p.get("val_miou") is not None})
    if measured:
        what = ("re-measured val mIoU in the distilled rows' teacher provenance (no teacher row in the database)"
                if len(measured) == 1 else
                f"mean of {len(measured)} different re-measured val mIoUs in the distilled rows' provenance "
                f"(no teacher row in the database)")
        return TeacherMiou(statistics.fmean(measured), what)
    return TeacherMiou(None, f"no teacher row ({block.teacher}, {block.dataset}, budget {block.budget or 'unknown'}) "
                             f"in the database and no re-measured teacher mIoU in the distilled rows")


# -------------------------------------------------------------------------------- gap closed
@dataclass
class Gap:
    value: Optional[float]
    why: str = ""          # the reason when value is None


def gap_closed(distilled: Optional[float], student: Optional[float], teacher: Optional[float],
               teacher_why: str = "no teacher mIoU") -> Gap:
    """(distilled - student) / (teacher - student); n/a with the reason, never 0."""
    if student is None:
        return Gap(None, "no tuned student-only rerun in this block")
    if distilled is None:
        return Gap(None, "no completed distilled rerun")
    if teacher is None:
        return Gap(None, teacher_why)
    if teacher - student <= 0:
        return Gap(None, f"teacher {100 * teacher:.2f} not above the tuned student {100 * student:.2f}")
    return Gap((distilled - student) / (teacher - student))


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: the mean of the middle half (scipy.stats.trim_mean(x, 0.25))."""
    return float(stats.trim_mean(np.asarray(values, dtype=float), 0.25))


@dataclass
class BlockSample:
    """What one block contributes to a method's bootstrap: the seeds of both arms and the teacher."""
    student: Sequence[float]
    distilled: Sequence[float]
    teacher: float


def stratified_bootstrap(samples: Sequence[BlockSample], reps: int = REPS,
                         rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, int]:
    """(IQM of every replicate, replicates dropped). Each replicate resamples the seeds within every
    block and arm (same n, with replacement), recomputes every block's gap closed, then the IQM; a
    replicate in which some block's resampled student reaches the teacher (gap undefined) is dropped."""
    rng = np.random.default_rng(SEED) if rng is None else rng
    gaps = np.empty((reps, len(samples)))
    for j, s in enumerate(samples):
        means = []
        for values in (s.student, s.distilled):
            v = np.asarray(values, dtype=float)
            means.append(v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1))
        student, distilled = means
        denom = s.teacher - student
        with np.errstate(divide="ignore", invalid="ignore"):
            gaps[:, j] = np.where(denom > 0, (distilled - student) / denom, np.nan)
    ok = ~np.isnan(gaps).any(axis=1)
    return stats.trim_mean(gaps[ok], 0.25, axis=1), int((~ok).sum())


def method_rng(label: str, seed: int = SEED) -> np.random.Generator:
    """The bootstrap generator of one method: the same whatever other methods a filter shows."""
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


@dataclass
class MethodSummary:
    label: str
    gaps: List[Tuple[str, Gap]]            # (block id, gap) for every block that ran the method
    iqm: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    @property
    def valid(self) -> List[float]:
        return [g.value for _, g in self.gaps if g.value is not None]


def summarise(label: str, blocks: Sequence[Tuple[str, Block, TeacherMiou]], reps: int = REPS,
              seed: int = SEED) -> MethodSummary:
    """Gap closed of `label` in every block that ran it, their IQM and its stratified bootstrap interval."""
    out = MethodSummary(label, [])
    samples = []
    for bid, block, teacher in blocks:
        arm, base = block.arms.get(label), block.baseline
        if arm is None:
            continue
        gap = gap_closed(arm.mean, base.mean if base else None, teacher.value, teacher.source)
        out.gaps.append((bid, gap))
        if gap.value is not None:
            samples.append(BlockSample(base.values, arm.values, teacher.value))
            if min(arm.n, base.n) < 2:
                out.notes.append(f"{bid}: an arm with one seed adds no spread to the interval")
    if not samples:
        return out
    out.iqm = iqm(out.valid)
    boot, dropped = stratified_bootstrap(samples, reps, method_rng(label, seed))
    if len(boot):
        tail = 100 * (1 - CONFIDENCE) / 2
        out.low, out.high = (float(x) for x in np.percentile(boot, [tail, 100 - tail]))
    if dropped:
        out.notes.append(f"{dropped} of {reps} bootstrap replicates dropped: a resampled student reached the "
                         f"teacher in some block (gap closed undefined)")
    if len(samples) == 1:
        out.notes.append("one block: the IQM is that block's gap closed and the interval is over its seeds only")
    return out


# ------------------------------------------------------------------------- critical difference
def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> Tuple[float, float]:
    """(q_alpha, CD) of the Nemenyi test for k arms over n blocks (Demšar 2006, Section 3.2.2)."""
    q = float(stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))
    return q, q * math.sqrt(k * (k + 1) / (6.0 * n))


def average_ranks(scores: np.ndarray) -> np.ndarray:
    """Average rank of each column over the rows of `scores` (N x k; rank 1 = highest score, ties averaged)."""
    return stats.rankdata(-np.asarray(scores, dtype=float), axis=1).mean(axis=0)


@dataclass
class CriticalDifference:
    names: List[str] = field(default_factory=list)
    block_ids: List[str] = field(default_factory=list)
    ranks: List[float] = field(default_factory=list)
    statistic: Optional[float] = None
    p: Optional[float] = None
    q: Optional[float] = None
    cd: Optional[float] = None
    left_out: List[str] = field(default_factory=list)   # arms not in every block used
    why: str = ""                                       # why there is no test / no diagram

    @property
    def computed(self) -> bool:
        return self.cd is not None


def friedman_nemenyi(names: Sequence[str], scores: np.ndarray, alpha: float = ALPHA) -> CriticalDifference:
    """Friedman chi-square over the rows (blocks) of `scores` (N x k, higher is better), the average
    ranks and the Nemenyi critical difference."""
    scores = np.asarray(scores, dtype=float)
    n, k = scores.shape
    result = CriticalDifference(names=list(names), ranks=[float(r) for r in average_ranks(scores)])
    if n < MIN_FRIEDMAN or k < MIN_FRIEDMAN:
        result.why = (f"{n} block(s) and {k} arm(s): the Friedman test and the critical-difference diagram "
                      f"need at least {MIN_FRIEDMAN} of each")
        return result
    with np.errstate(divide="ignore", invalid="ignore"):
        test = stats.friedmanchisquare(*scores.T)
    result.statistic = float(test.statistic)
    result.p = None if math.isnan(test.pvalue) else float(test.pvalue)
    result.q, result.cd = nemenyi_cd(k, n, alpha)
    return result


def critical_difference(blocks: Sequence[Tuple[str, Block, TeacherMiou]], alpha: float = ALPHA) -> CriticalDifference:
    """The Friedman/Nemenyi analysis of mean mIoU over the blocks with a student-only and a distilled
    arm, on the arms present in every one of them."""
    used = [(bid, b) for bid, b, _ in blocks
            if b.baseline is not None and b.baseline.n and any(lab != STUDENT_ONLY and a.n for lab, a in b.arms.items())]
    present = [{label for label, a in b.arms.items() if a.n} for _, b in used]
    common = sorted(set.intersection(*present), key=lambda lab: (lab != STUDENT_ONLY, lab)) if present else []
    left_out = sorted(set.union(*present) - set(common)) if present else []
    if not used:
        return CriticalDifference(why="no block with both a tuned student-only and a distilled arm")
    scores = np.array([[b.arms[label].mean for label in common] for _, b in used])
    result = friedman_nemenyi(common, scores, alpha)
    result.block_ids, result.left_out = [bid for bid, _ in used], left_out
    return result


def cliques(names: Sequence[str], ranks: Sequence[float], cd: float) -> List[List[str]]:
    """Maximal runs of arms (sorted by rank) whose average ranks differ by less than CD."""
    order = sorted(range(len(names)), key=lambda i: ranks[i])
    groups: List[List[int]] = []
    for i in range(len(order)):
        j = i
        while j + 1 < len(order) and ranks[order[j + 1]] - ranks[order[i]] < cd:
            j += 1
        if j > i and not any(g[0] <= i and j <= g[-1] for g in groups):
            groups.append(list(range(i, j + 1)))
    return [[names[order[x]] for x in g] for g in groups]


def draw_cd(path: Path, result: CriticalDifference, source: Sequence[str]) -> Path:
    """The usual critical-difference diagram: average ranks on an axis (1 = best, left), the CD bar
    above, arms joined by a thick line where they do not differ by CD."""
    from harness.report.figures import _pyplot, save
    from harness.report.names import method_name

    plt = _pyplot()
    names, ranks, k = result.names, result.ranks, len(result.names)
    order = sorted(range(k), key=lambda i: ranks[i])
    left, right = order[: (k + 1) // 2], order[(k + 1) // 2:]
    groups = cliques(names, ranks, result.cd)
    rows = max(len(left), len(right))
    fig, ax = plt.subplots(figsize=(7.0, 1.6 + 0.32 * (rows + len(groups))))
    ax.set_xlim(0.5 - 0.25 * k, k + 0.5 + 0.25 * k)
    ax.set_ylim(-(rows + 1.2 + 0.35 * len(groups)), 1.6)
    ax.axis("off")
    ax.hlines(0, 1, k, color="black", lw=1)
    for r in range(1, k + 1):
        ax.vlines(r, 0, 0.18, color="black", lw=1)
        ax.text(r, 0.3, str(r), ha="center", va="bottom", fontsize=9)
    ax.hlines(1.1, 1, 1 + result.cd, color="black", lw=1.5)
    ax.vlines([1, 1 + result.cd], 1.0, 1.2, color="black", lw=1.5)
    ax.text(1 + result.cd / 2, 1.25, f"CD = {result.cd:.2f}", ha="center", va="bottom", fontsize=9)
    bars = 0.35 * len(groups)
    for side, members in (("left", left), ("right", right)):
        for n, i in enumerate(members if side == "left" else reversed(members)):
            y = -(bars + 0.6 + n)
            x_end = 0.5 - 0.1 * k if side == "left" else k + 0.5 + 0.1 * k
            ax.plot([ranks[i], ranks[i], x_end], [0, y, y], color="black", lw=0.8)
            ax.text(x_end + (-0.05 if side == "left" else 0.05), y, f"{method_name(names[i])} ({ranks[i]:.2f})",
                    ha="right" if side == "left" else "left", va="center", fontsize=9)
    for n, group in enumerate(groups):
        xs = [ranks[names.index(g)] for g in group]
        ax.hlines(-(0.25 + 0.35 * n), min(xs) - 0.03, max(xs) + 0.03, color="black", lw=3)
    p = "n/a" if result.p is None else f"{result.p:.3g}"
    ax.set_title(f"Average rank of mean val mIoU over {len(result.block_ids)} blocks "
                 f"(Friedman p = {p}; Nemenyi, α = {ALPHA})", fontsize=10)
    return save(fig, Path(path), source)


# ---------------------------------------------------------------------------------- the report
def pct(value: Optional[float]) -> str:
    return MISSING if value is None else f"{100 * value:.1f} %"


def analyse(store, blocks: Sequence[Block], reps: int = REPS, seed: int = SEED):
    """(block ids with their block and teacher, method summaries, critical difference, skipped blocks)."""
    with_teacher = [b for b in blocks if b.teacher is not None]
    skipped = [b for b in blocks if b.teacher is None]
    ided = [(f"B{i}", b, teacher_miou(store, b)) for i, b in enumerate(with_teacher, start=1)]
    labels = sorted({lab for _, b, _ in ided for lab in b.arms if lab != STUDENT_ONLY})
    summaries = [summarise(label, ided, reps, seed) for label in labels]
    return ided, summaries, critical_difference(ided), skipped


def across_report(store, blocks: Sequence[Block], source: Sequence[str], diagram: Optional[str],
                  reps: int = REPS, seed: int = SEED, analysis=None) -> str:
    """Markdown of reports/across.md; `diagram` is the PNG's name when it was drawn."""
    ided, summaries, cd, skipped = analysis or analyse(store, blocks, reps, seed)
    lines = ["# Across blocks", ""]
    if not ided:
        why = ("no block with a distilled arm" if blocks else "no completed rerun rows")
        lines += [f"Nothing to compare across blocks: {why} (run python -m harness sweep +method=NAME first).", ""]
        return "\n".join(lines + footer(source)) + "\n"
    lines += [
        "Gap closed = (mean distilled mIoU - mean tuned student-only mIoU) / (teacher val mIoU - mean tuned "
        "student-only mIoU), per block over the rerun seeds: 0 % = no better than the tuned student, "
        "100 % = as good as the teacher.",
        f"Across blocks: interquartile mean (scipy.stats.trim_mean(x, 0.25); the plain mean below 4 blocks) with a "
        f"{100 * CONFIDENCE:.0f} % stratified bootstrap interval ({reps} replicates, seed {seed}: seeds resampled "
        f"within each block and arm, the teacher's mIoU held fixed; rliable's practice, Agarwal et al. 2021).", ""]
    table = []
    for s in summaries:
        valid, missing = len(s.valid), len(s.gaps) - len(s.valid)
        n = f"{valid}" + (f" (+{missing} n/a)" if missing else "")
        if s.iqm is None:
            cell = f"{MISSING} (no block with a gap closed)"
        elif s.low is None:
            cell = f"{pct(s.iqm)} [{MISSING}]"
        else:
            cell = f"{pct(s.iqm)} [{100 * s.low:.1f}, {100 * s.high:.1f}]"
        per = "; ".join(f"{bid}: {pct(g.value)}" + (f" ({g.why})" if g.value is None else "") for bid, g in s.gaps)
        table.append([s.label, n, cell, per])
    lines += markdown_table(["method", "blocks", f"IQM gap closed [{100 * CONFIDENCE:.0f} % CI]",
                             "gap closed per block"], table, "lrrl") + [""]
    lines += [f"Note: {s.label}: {n}" for s in summaries for n in s.notes]
    lines += ["", "## Blocks", ""]
    table = []
    for bid, b, t in ided:
        base = b.baseline
        student = f"{100 * base.mean:.2f} (n={base.n})" if base and base.n else f"{MISSING} (no student-only rerun)"
        teacher = f"{100 * t.value:.2f} ({t.source})" if t.value is not None else f"{MISSING} ({t.source})"
        table.append([bid, b.title, teacher, student])
    lines += markdown_table(["block", "comparison", "teacher val mIoU", "tuned student-only mIoU"], table) + [""]
    if skipped:
        lines += [f"Left out (no distilled arm): {b.title}" for b in skipped] + [""]
    lines += [f"Note: {bid}: {n}" for bid, b, _ in ided for n in b.notes]
    lines += ["## Critical difference", ""]
    lines += cd_lines(cd, diagram)
    lines += [""] + footer(source)
    return "\n".join(lines) + "\n"


def footer(source: Sequence[str]) -> List[str]:
    """The source lines under the text, as the other reports write them."""
    return ["---", ""] + [f"{s}  " for s in source]


def cd_lines(cd: CriticalDifference, diagram: Optional[str]) -> List[str]:
    lines = []
    if cd.left_out:
        lines.append(f"Left out of the Friedman test (not in every block used): {', '.join(cd.left_out)}.")
    if cd.block_ids:
        lines.append(f"Blocks used: {', '.join(cd.block_ids)}; arms: {', '.join(cd.names) or 'none'}.")
    if not cd.computed:
        lines += [f"No Friedman test and no critical-difference diagram: {cd.why}."]
        return lines
    p = MISSING + " (every block ranks the arms alike)" if cd.p is None else f"{cd.p:.4g}"
    lines += [f"Friedman chi-square = {cd.statistic:.3f} (k = {len(cd.names)} arms, N = {len(cd.block_ids)} "
              f"blocks), p = {p}; Nemenyi q_{ALPHA} = {cd.q:.3f}, critical difference CD = {cd.cd:.3f} "
              f"(average ranks of mean val mIoU, 1 = best; Demšar 2006).", ""]
    lines += markdown_table(["arm", "average rank"],
                            [[n, f"{r:.2f}"] for r, n in sorted(zip(cd.ranks, cd.names))], "lr") + [""]
    apart = [f"{a} vs {b} ({abs(ra - rb):.2f})" for i, (a, ra) in enumerate(zip(cd.names, cd.ranks))
             for b, rb in list(zip(cd.names, cd.ranks))[i + 1:] if abs(ra - rb) > cd.cd]
    lines.append("Ranks further apart than CD: " + ("; ".join(apart) if apart else "none") + ".")
    if diagram:
        lines.append(f"Diagram: {diagram}")
    return lines


def write(cfg: Dict[str, Any], store, filters: Filters = Filters(), blocks: Optional[Sequence[Block]] = None,
          quiet: bool = False, reps: int = REPS, seed: int = SEED) -> Dict[str, Path]:
    """reports/across.md and, when the Friedman test ran, reports/cd_diagram.png."""
    if blocks is None:
        blocks = load_blocks(store, **filters.selection())
    analysis = analyse(store, blocks, reps, seed)
    ided, _, cd, _ = analysis
    rows = [r for _, b, _ in ided for r in b.rows] or [r for b in blocks for r in b.rows]
    source = source_lines(store.url, rows, what="across blocks") + [f"Filters: {filters.shown()}"]
    out_dir = Path(cfg["paths"]["reports"])
    diagram = None
    if cd.computed:
        from harness.report.tuning import shown_database  # the figure names no absolute path

        drawn = source_lines(shown_database(store.url), rows, what="across blocks") + [f"Filters: {filters.shown()}"]
        publish(out_dir, "cd_diagram", {"png": lambda p: draw_cd(p, cd, drawn)}, quiet=True, empty="")
        diagram = "cd_diagram.png"
        if not quiet:
            print(f"wrote {out_dir / diagram}")
    elif (out_dir / "cd_diagram.png").exists():
        (out_dir / "cd_diagram.png").unlink()  # an older diagram must not stand next to this text
    empty = "" if ided else (f"No block with a distilled arm in {store.url}: run python -m harness sweep "
                             f"+method=NAME first.")
    return publish(out_dir, "across", {"md": across_report(store, blocks, source, diagram, reps, seed, analysis)},
                   quiet, empty)
