"""The verdicts of a block, computed once: what the leaderboard and the significance table print.

Both tables read the same ``BlockVerdicts`` (``verdicts_of(block)``), so one comparison carries the
same lift, interval and p in both. Per block (``harness.report.blocks``):

- **Family 1, "vs the tuned student"**: every distilled arm of the block against its tuned
  student-only arm. Holm's correction runs over these m1 comparisons. The family is the block's,
  ``Block.all_arms``: a display filter (``+method=cwd``) hides rows and never changes a p-value.
  Where one (dataset, student, teacher, budget) has several student-only winners (a larger
  composition grew the student arm and its winner changed), each winner is its own block, and the
  comparisons of the other blocks (``Block.family_extra``) join the family: m counts every
  distilled-vs-student test made on that comparison, not only the ones a block shows.
- **Family 2, "between methods"**: every pair of distilled arms of the block, Holm over m2 pairs
  (the significance table only).
- Each comparison is ``harness.stats.compare_seeds``: paired t on the seeds both arms completed
  (the default design reruns the same seeds in both arms), Welch's t when fewer than two are
  shared. The interval is the test's t interval at 95 %, and a **simultaneous** interval at
  1 - 0.05 / m (Bonferroni over the family: it excludes 0 exactly when p < 0.05 / m, Holm's first
  step). The power columns use alpha / m, the level of Holm's first step, so "the smallest lift this
  design detects" is stated for the test the table actually applies to the strongest row.
- A row is **underpowered** when its observed |lift| is below the smallest lift detectable at 80 %
  power with its n and observed sd: the design could not have confirmed a lift of that size.
- The permutation test (exact sign flips of the per-seed differences) is a nonparametric check of
  the same comparison; it is reported in the CSV, never used for the markers.

The coverage of these intervals and the size of these tests are measured by
``benchmarks/coverage.py`` (docs/statistics.md).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from harness import stats
from harness.report.blocks import STUDENT_ONLY, Block

LEVEL = 0.95
HALFWIDTH = 0.01       # the interval half-width the "seeds for +-1 mIoU" column plans for


@dataclass
class Comparison:
    a: str
    b: str
    verdict: stats.Verdict
    permutation: stats.TestResult
    p_holm: Optional[float] = None       # the t-test's p, Holm-adjusted over the family
    p_perm_holm: Optional[float] = None  # the permutation test's p, Holm-adjusted over the family
    family: str = ""                     # 'vs student' | 'between methods'
    family_size: int = 0
    simultaneous: Tuple[Optional[float], Optional[float]] = (None, None)
    simultaneous_level: float = LEVEL


@dataclass
class BlockVerdicts:
    block: Block
    vs_student: Dict[str, Comparison] = field(default_factory=dict)       # distilled label -> comparison
    between: Dict[Tuple[str, str], Comparison] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    family_size_vs_student: int = 0   # m of family 1: this block's arms plus its siblings' (Block.family_extra)

    def get(self, a: str, b: str) -> Tuple[Optional[Comparison], int]:
        """The comparison of a and b and the sign of (a - b) relative to it (0: none)."""
        if b == STUDENT_ONLY and a in self.vs_student:
            return self.vs_student[a], 1
        if a == STUDENT_ONLY and b in self.vs_student:
            return self.vs_student[b], -1
        if (a, b) in self.between:
            return self.between[(a, b)], 1
        if (b, a) in self.between:
            return self.between[(b, a)], -1
        return None, 0

    def p(self, comparison: Comparison, test: str) -> Optional[float]:
        return comparison.p_holm if test == "t" else comparison.p_perm_holm

    @property
    def family_sizes(self) -> Tuple[int, int]:
        return (max(self.family_size_vs_student, len(self.vs_student)), len(self.between))


def _order(label: str) -> Tuple[int, int, str]:
    return (0 if label == STUDENT_ONLY else 1, label.count("+"), label)


def _family(comps: List[Comparison], name: str, level: float) -> None:
    """Holm over the comparisons with a test; the simultaneous (Bonferroni) intervals at 1 - a/m."""
    m = len(comps)
    holm = stats.holm([c.verdict.p for c in comps])
    perm = stats.holm([c.permutation.p for c in comps])
    sim_level = stats.simultaneous_level(level, m)
    for c, p, q in zip(comps, holm.adjusted, perm.adjusted):
        c.p_holm, c.p_perm_holm, c.family, c.family_size, c.simultaneous_level = p, q, name, m, sim_level
        c.simultaneous = _interval_at(c.verdict, sim_level)


def _interval_at(v: stats.Verdict, level: float) -> Tuple[Optional[float], Optional[float]]:
    """The verdict's t interval re-computed at another level (same centre, df and standard error)."""
    from scipy import stats as st

    if v.low is None or v.df is None or v.statistic in (None, 0):
        return (v.low, v.high) if v.low is not None and v.low == v.high else (None, None)
    se = v.lift / v.statistic
    q = st.t.ppf((1 + level) / 2, v.df)
    return v.lift - q * abs(se), v.lift + q * abs(se)


def verdicts_of(block: Block, level: float = LEVEL, halfwidth: float = HALFWIDTH) -> BlockVerdicts:
    """Every comparison of the block, both families corrected, computed once."""
    out = BlockVerdicts(block)
    arms = block.all_arms
    distilled = sorted((l for l in arms if l != STUDENT_ONLY), key=_order)
    base = arms.get(STUDENT_ONLY)
    extra = block.family_extra if base is not None else []
    m1 = (len(distilled) if base is not None else 0) + len(extra)
    first: List[Comparison] = []
    if base is not None:
        pairs1 = [(label, arms[label], base) for label in distilled] + list(extra)
        for label, arm, ref in pairs1:
            a, b = arm.by_seed, ref.by_seed
            v = stats.compare_seeds(a, b, level=level, family_size=max(1, m1), halfwidth=halfwidth)
            first.append(Comparison(label, STUDENT_ONLY, v, stats.permutation_test(a, b)))
        _family(first, "vs student", level)
        # the other blocks' comparisons only size the family; this block shows its own
        out.vs_student = {c.a: c for c in first[:len(distilled)]}
        out.family_size_vs_student = m1
    pairs = list(itertools.combinations(distilled, 2))
    second: List[Comparison] = []
    for x, y in pairs:
        a, b = arms[x].by_seed, arms[y].by_seed
        v = stats.compare_seeds(a, b, level=level, family_size=max(1, len(pairs)), halfwidth=halfwidth)
        second.append(Comparison(x, y, v, stats.permutation_test(a, b)))
    _family(second, "between methods", level)
    out.between = {(c.a, c.b): c for c in second}
    return out
