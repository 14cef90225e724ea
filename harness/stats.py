"""The statistics behind the tables: two-sample tests, a bootstrap interval, Holm's correction.

Every function takes the per-seed values of two arms (``a`` = the arm under test, ``b`` = the
reference, usually the tuned student-only arm) and returns a small dataclass. Where a number cannot
be computed honestly the field is ``None`` and ``note`` says why; nothing is ever reported as 0 or 1
in its place.

- ``welch(a, b)``: Welch's unequal-variance t-test (``scipy.stats.ttest_ind(equal_var=False)``),
  two-sided. Needs n >= 2 in both arms (a variance per arm). If both arms have zero variance the
  t statistic is undefined (scipy would say t = +-inf, p = 0): no test, a note instead.
- ``mann_whitney(a, b)``: Mann-Whitney U (``scipy.stats.mannwhitneyu``, two-sided, scipy's
  ``method="auto"``: exact without ties for small n, else the normal approximation with tie and
  continuity correction, as R's ``wilcox.test``). ``statistic`` is U of ``a``. ``min_p`` is the
  smallest two-sided p any data could give with these n (exact distribution, no ties):
  ``min(1, 2 / C(n_a + n_b, n_a))``; ``warning`` is set when it cannot go below ``alpha``
  (e.g. 3 vs 3 seeds: min p = 0.1).
- ``bootstrap_diff(a, b)``: the 95% bootstrap confidence interval of mean(a) - mean(b)
  (``scipy.stats.bootstrap``, the two samples resampled independently, seeded ``numpy`` generator,
  BCa by default). BCa needs a non-degenerate jackknife; where it returns NaN the percentile
  interval is used and ``method`` says so. Both arms of zero variance: every resample gives the same
  difference, the interval is that point (method ``degenerate``). n = 1 in an arm: no interval.
- ``holm(pvalues)``: Holm's step-down adjustment. For the m available p-values sorted ascending,
  ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``; ``None`` entries (no test) stay ``None``
  and do not count in m. Same numbers as R's ``p.adjust(p, "holm")``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

ALPHA = 0.05


def _array(values: Sequence[float]) -> np.ndarray:
    x = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("values must be finite numbers")
    return x


def _constant(x: np.ndarray) -> bool:
    return x.size > 0 and bool(np.all(x == x[0]))


# ------------------------------------------------------------------------------------- Welch
@dataclass
class TestResult:
    test: str                        # 'welch' or 'mann-whitney'
    n_a: int
    n_b: int
    statistic: Optional[float] = None
    p: Optional[float] = None        # two-sided; None = no test possible (see note)
    df: Optional[float] = None       # Welch-Satterthwaite degrees of freedom
    min_p: Optional[float] = None    # Mann-Whitney: smallest achievable p with these n
    note: str = ""                   # why there is no test, or what is special about this one
    warning: str = ""                # the test cannot reach significance with these n

    @property
    def available(self) -> bool:
        return self.p is not None


def welch(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Welch's two-sided t-test of mean(a) == mean(b)."""
    from scipy import stats

    x, y = _array(a), _array(b)
    out = TestResult("welch", x.size, y.size)
    if x.size < 2 or y.size < 2:
        out.note = (f"no test: Welch needs at least 2 seeds per arm (n = {x.size} vs {y.size})")
        return out
    if _constant(x) and _constant(y):
        same = x[0] == y[0]
        out.note = ("no test: both arms have zero variance "
                    + ("and equal values" if same else f"(difference {x[0] - y[0]:+.6g} on every seed)")
                    + ", the t statistic is undefined")
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision warning for a flat arm
        res = stats.ttest_ind(x, y, equal_var=False)
    out.statistic, out.p, out.df = float(res.statistic), float(res.pvalue), float(res.df)
    if _constant(x) or _constant(y):
        out.note = "one arm has zero variance: the standard error comes from the other arm alone"
    return out


# ------------------------------------------------------------------------------ Mann-Whitney U
def mann_whitney_min_p(n_a: int, n_b: int) -> float:
    """Smallest two-sided exact p-value of Mann-Whitney U with n_a and n_b values and no ties."""
    if n_a < 1 or n_b < 1:
        return 1.0
    return min(1.0, 2.0 / math.comb(n_a + n_b, n_a))


def mann_whitney(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> TestResult:
    """Two-sided Mann-Whitney U test; U is the statistic of `a`."""
    from scipy import stats

    x, y = _array(a), _array(b)
    out = TestResult("mann-whitney", x.size, y.size)
    if x.size < 1 or y.size < 1:
        out.note = f"no test: an arm has no values (n = {x.size} vs {y.size})"
        return out
    out.min_p = mann_whitney_min_p(x.size, y.size)
    if out.min_p >= alpha:
        out.warning = (f"with n = {x.size} vs {y.size} the smallest possible p is {out.min_p:.3g}: "
                       f"p < {alpha:g} is impossible")
    both = np.concatenate([x, y])
    if _constant(both):
        out.statistic, out.p = x.size * y.size / 2.0, 1.0
        out.note = "all values tied: U is at its centre, p = 1"
        return out
    res = stats.mannwhitneyu(x, y, alternative="two-sided", method="auto")
    out.statistic, out.p = float(res.statistic), float(res.pvalue)
    if np.unique(both).size < both.size:
        out.note = "ties: normal approximation with tie and continuity correction"
    return out


# --------------------------------------------------------------------------------- bootstrap
@dataclass
class Interval:
    diff: Optional[float]            # mean(a) - mean(b)
    low: Optional[float] = None
    high: Optional[float] = None
    level: float = 0.95
    method: str = ""                 # 'BCa', 'percentile' (BCa degenerate), 'degenerate', ''
    n_resamples: int = 0
    seed: int = 0
    note: str = ""

    @property
    def available(self) -> bool:
        return self.low is not None


def _mean_diff(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def bootstrap_diff(a: Sequence[float], b: Sequence[float], level: float = 0.95,
                   n_resamples: int = 9999, seed: int = 0, method: str = "BCa") -> Interval:
    """Bootstrap confidence interval of mean(a) - mean(b), samples resampled independently."""
    from scipy import stats

    x, y = _array(a), _array(b)
    diff = float(x.mean() - y.mean()) if x.size and y.size else None
    out = Interval(diff, level=level, n_resamples=n_resamples, seed=seed)
    if x.size < 2 or y.size < 2:
        out.note = f"no interval: the bootstrap needs at least 2 seeds per arm (n = {x.size} vs {y.size})"
        return out
    if _constant(x) and _constant(y):
        out.low = out.high = diff
        out.method = "degenerate"
        out.note = "both arms have zero variance: every resample gives the same difference"
        return out
    for m in dict.fromkeys([method, "percentile"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's degenerate-data warning: handled below
            res = stats.bootstrap((x, y), _mean_diff, vectorized=True, paired=False,
                                  confidence_level=level, n_resamples=n_resamples, method=m,
                                  rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if np.isfinite(low) and np.isfinite(high):
            out.low, out.high, out.method = low, high, m
            if m != method:
                out.note = f"{method} interval degenerate (jackknife without spread): percentile interval"
            return out
    out.note = "no interval: the bootstrap distribution is degenerate"
    return out


# ---------------------------------------------------------------------------------------- Holm
@dataclass
class HolmResult:
    adjusted: List[Optional[float]]  # aligned with the input; None where the input was None
    rejected: List[Optional[bool]]   # adjusted p < alpha
    m: int                           # number of p-values corrected for
    alpha: float = ALPHA
    note: str = ""


def holm(pvalues: Sequence[Optional[float]], alpha: float = ALPHA) -> HolmResult:
    """Holm's step-down adjusted p-values (None entries are skipped and stay None)."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    for i in idx:
        if not 0.0 <= float(pvalues[i]) <= 1.0 or math.isnan(float(pvalues[i])):
            raise ValueError(f"p-value {pvalues[i]!r} is not in [0, 1]")
    m = len(idx)
    adjusted: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: float(pvalues[i]))):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        adjusted[i] = running
    rejected = [None if p is None else p < alpha for p in adjusted]
    note = "" if m else "no p-values to correct"
    return HolmResult(adjusted, rejected, m, alpha, note)


@dataclass
class Comparison:
    """Everything the tables say about arm `a` against arm `b`."""
    welch: TestResult
    mann_whitney: TestResult
    interval: Interval
    notes: List[str] = field(default_factory=list)


def compare(a: Sequence[float], b: Sequence[float], seed: int = 0, n_resamples: int = 9999,
            level: float = 0.95, alpha: float = ALPHA) -> Comparison:
    w, u = welch(a, b), mann_whitney(a, b, alpha)
    ci = bootstrap_diff(a, b, level=level, n_resamples=n_resamples, seed=seed)
    notes = [n for n in (w.note, ci.note, u.warning) if n]
    return Comparison(w, u, ci, notes)
