"""The statistics behind the tables: two-sample tests, a bootstrap interval, Holm's correction.

Every function takes the per-seed values of two arms (``a`` = the arm under test, ``b`` = the
reference, usually the tuned student-only arm) and returns a small dataclass. Where a number cannot
be computed honestly the field is ``None`` and ``note`` says why; nothing is ever reported as 0 or 1
in its place.

- ``welch(a, b)``: Welch's unequal-variance t-test (``scipy.stats.ttest_ind(equal_var=False)``),
  two-sided. Needs n >= 2 in both arms (a variance per arm). If both arms have zero variance the
  t statistic is undefined (scipy would say t = +-inf, p = 0): no test, a note instead.
- ``mann_whitney(a, b)``: Mann-Whitney U (``scipy.stats.mannwhitneyu``, two-sided, scipy's
  ``method="auto"`` without ties: exact for small n; with ties the permutation distribution of U
  given the tied values, exact by enumeration for the seed counts of the tables, so p is never below
  the smallest p the data allow). ``statistic`` is U of ``a``. ``min_p`` is the
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
from typing import Dict, List, Optional, Sequence, Tuple

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
    if np.unique(both).size < both.size:
        # ties: the permutation distribution of U with these tied values (exact by enumeration
        # while C(n_a + n_b, n_a) <= 9999, which covers any seed count the tables see), never the
        # normal approximation, whose p can fall below the smallest p the data allow
        res = stats.mannwhitneyu(x, y, alternative="two-sided",
                                 method=stats.PermutationMethod(n_resamples=9999, rng=np.random.default_rng(0)))
        out.note = "ties: p from the permutation distribution of U with the tied values"
    else:
        res = stats.mannwhitneyu(x, y, alternative="two-sided", method="auto")
    out.statistic, out.p = float(res.statistic), max(float(res.pvalue), out.min_p)
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


# ======================================================================= the verdict of one comparison
# What the tables print for "arm a against arm b". Both arms rerun the same seeds by default, and
# with one seed they share the student's initialisation and data order: the design is paired, and
# the primary analysis is on the per-seed differences d_i = a_i - b_i (seeds present in both arms):
#
# - test: paired t-test (``scipy.stats.ttest_rel``), interval: its t interval of mean(d);
# - effect size: Cohen's d_z = mean(d) / sd(d);
# - P(improvement): the share of seed pairs with d_i > 0 (ties count one half), with the exact
#   Clopper-Pearson interval (``scipy.stats.binomtest``) of the count of d_i > 0 (conservative:
#   it covers at least its level);
# - power: the smallest lift detectable at 80 % power with this n and the observed sd(d)
#   (``statsmodels.stats.power.TTestPower``, two-sided, at the family's first Holm step alpha / m
#   and at alpha), and the seeds a +-1 mIoU point interval needs at that sd.
#
# Without two common seeds the fallback is unpaired: Welch's t-test and its interval
# (``ttest_ind(equal_var=False)``), Hedges' g, P(a > b) = U / (n_a n_b) without an interval, and
# ``TTestIndPower`` for the detectable lift at the pooled sd. Values are fractions (mIoU in [0, 1]);
# the tables print percentage points.
#
# The bootstrap is not in this verdict: the coverage benchmark (benchmarks/coverage.py,
# docs/statistics.md) measured its BCa interval, arms resampled independently, at 84-88 % for a
# nominal 95 % on unpaired data at n = 5 and 87-91 % at n = 3. The same benchmark measures the t
# intervals at 95 % on normal seeds and on seeds skewed alike in both arms, and at 91-92 % when the
# arms are skewed in opposite directions (docs/statistics.md says so next to the tables).
# The unpaired detectable lift comes from TTestIndPower (Student's pooled t); for the Welch test
# actually applied it overstates power at small n (measured 70 % at n = 3, 78 % at n = 5).
POWER = 0.8
PAIRED, UNPAIRED = "paired", "unpaired"


@dataclass
class Verdict:
    design: str                          # 'paired' | 'unpaired' | '' (no analysis possible)
    n_a: int
    n_b: int
    n_pairs: int = 0                     # seeds present in both arms
    seeds: List[int] = field(default_factory=list)   # the seeds the paired analysis uses
    diffs: List[float] = field(default_factory=list)  # a - b per common seed (paired)
    lift: Optional[float] = None         # mean(a) - mean(b) (paired: mean of the differences)
    low: Optional[float] = None          # t interval of the lift
    high: Optional[float] = None
    level: float = 0.95
    test: str = ""                       # 'paired t' | 'Welch t'
    statistic: Optional[float] = None
    df: Optional[float] = None
    p: Optional[float] = None            # two-sided, uncorrected
    sd: Optional[float] = None           # sd of the differences (paired) or pooled sd (unpaired)
    effect: Optional[float] = None
    effect_name: str = ""                # "d_z" | "Hedges' g"
    p_improve: Optional[float] = None    # P(a > b) over seed pairs
    p_improve_low: Optional[float] = None
    p_improve_high: Optional[float] = None
    mde: Optional[float] = None          # smallest lift detectable at 80 % power, alpha
    mde_family: Optional[float] = None   # the same at the family's first Holm step (alpha / m)
    family_size: int = 1
    seeds_for_halfwidth: Optional[int] = None   # seeds (per arm) a +-halfwidth interval needs
    halfwidth_target: float = 0.01
    notes: List[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        return self.p is not None

    @property
    def halfwidth(self) -> Optional[float]:
        return None if self.low is None else (self.high - self.low) / 2

    @property
    def underpowered(self) -> Optional[bool]:
        """The design cannot detect its own observed lift at 80 % power at the family's alpha
        (alpha / family_size, Holm's first step) (None: not computable)."""
        if self.mde_family is None or self.lift is None:
            return None
        return abs(self.lift) < self.mde_family


def _by_seed(values) -> Dict[int, float]:
    if isinstance(values, dict):
        out = {int(k): float(v) for k, v in values.items() if v is not None}
    else:
        out = {i: float(v) for i, v in enumerate(values) if v is not None}
    if not all(math.isfinite(v) for v in out.values()):
        raise ValueError("values must be finite numbers")
    return out


def minimum_detectable(n: int, sd: Optional[float], alpha: float = ALPHA, power: float = POWER,
                       paired: bool = True, n_b: Optional[int] = None) -> Optional[float]:
    """Smallest true lift a two-sided t-test detects with `power` (statsmodels' power classes):
    paired: one-sample t on n differences of sd `sd`; unpaired: two samples n and n_b, common sd."""
    if sd is None or not math.isfinite(sd) or sd <= 0 or n < 2 or (not paired and (n_b or 0) < 2):
        return None
    import warnings as _w

    from statsmodels.stats.power import TTestIndPower, TTestPower

    with _w.catch_warnings():
        _w.simplefilter("ignore")
        if paired:
            es = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power,
                                          alternative="two-sided")
        else:
            es = TTestIndPower().solve_power(effect_size=None, nobs1=n, ratio=n_b / n, alpha=alpha,
                                             power=power, alternative="two-sided")
    es = float(np.atleast_1d(es)[0])
    return es * sd if math.isfinite(es) else None


def seeds_for_halfwidth(sd: Optional[float], halfwidth: float, level: float = 0.95,
                        max_n: int = 10_000) -> Optional[int]:
    """Smallest n >= 2 whose t interval t_{(1+level)/2, n-1} sd / sqrt(n) has half-width <= halfwidth
    (the sd taken as known: the planning value of the observed sd)."""
    from scipy import stats as st

    if sd is None or not math.isfinite(sd) or halfwidth <= 0:
        return None
    if sd == 0:
        return 2
    q = (1 + level) / 2
    for n in range(2, max_n + 1):
        if st.t.ppf(q, n - 1) * sd / math.sqrt(n) <= halfwidth:
            return n
    return None


def _improve_paired(d: np.ndarray, level: float) -> Tuple[float, float, float]:
    from scipy import stats as st

    wins, ties = int(np.sum(d > 0)), int(np.sum(d == 0))
    n = d.size
    est = (wins + 0.5 * ties) / n
    low = st.binomtest(wins, n).proportion_ci(level, method="exact").low
    high = st.binomtest(wins + ties, n).proportion_ci(level, method="exact").high
    return est, float(low), float(high)


def compare_seeds(a, b, level: float = 0.95, alpha: float = ALPHA, family_size: int = 1,
                  halfwidth: float = 0.01) -> Verdict:
    """The verdict on arm `a` against arm `b`; `a`, `b`: {seed: value} (or sequences, then the
    position is the seed). Paired on the common seeds when there are at least two, else Welch."""
    from scipy import stats as st

    va, vb = _by_seed(a), _by_seed(b)
    common = sorted(set(va) & set(vb))
    out = Verdict("", len(va), len(vb), len(common), level=level, family_size=max(1, family_size),
                  halfwidth_target=halfwidth)
    fam_alpha = alpha / out.family_size
    if len(common) >= 2:
        out.design, out.test, out.seeds = PAIRED, "paired t", common
        d = np.array([va[s] - vb[s] for s in common])
        out.diffs = [float(x) for x in d]
        out.lift = float(d.mean())
        out.sd = float(d.std(ddof=1))
        if float(np.ptp(d)) <= 1e-12:   # equal differences up to float rounding of the stored values
            out.sd = 0.0
        only = sorted((set(va) | set(vb)) - set(common))
        if only:
            out.notes.append(f"paired on the {len(common)} seeds both arms completed; seed(s) "
                             f"{', '.join(map(str, only))} left out of the comparison")
        out.p_improve, out.p_improve_low, out.p_improve_high = _improve_paired(d, level)
        if out.sd == 0:
            out.low = out.high = out.lift
            out.notes.append("every seed pair differs by the same amount: no t-test (zero variance)")
        else:
            res = st.ttest_rel(d + 0.0, np.zeros_like(d))
            ci = res.confidence_interval(level)
            out.statistic, out.p, out.df = float(res.statistic), float(res.pvalue), float(res.df)
            out.low, out.high = float(ci.low), float(ci.high)
            out.effect, out.effect_name = out.lift / out.sd, "d_z"
        out.mde = minimum_detectable(len(common), out.sd, alpha)
        out.mde_family = minimum_detectable(len(common), out.sd, fam_alpha)
        out.seeds_for_halfwidth = seeds_for_halfwidth(out.sd, halfwidth, level)
        return out
    x, y = np.array(list(va.values())), np.array(list(vb.values()))
    if x.size < 2 or y.size < 2:
        out.notes.append(f"no test: fewer than 2 seeds in an arm (n = {x.size} vs {y.size})")
        if x.size and y.size:
            out.lift = float(x.mean() - y.mean())
        return out
    out.design, out.test = UNPAIRED, "Welch t"
    out.notes.append("unpaired: the arms share fewer than 2 seeds, Welch's t-test")
    out.lift = float(x.mean() - y.mean())
    nx, ny = x.size, y.size
    out.sd = float(math.sqrt(((nx - 1) * x.var(ddof=1) + (ny - 1) * y.var(ddof=1)) / (nx + ny - 2)))
    if out.sd > 0:
        g = out.lift / out.sd * (1 - 3 / (4 * (nx + ny) - 9))
        out.effect, out.effect_name = g, "Hedges' g"
    w = welch(x, y)
    if w.p is None:
        out.notes.append(w.note)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = st.ttest_ind(x, y, equal_var=False)
        ci = res.confidence_interval(level)
        out.statistic, out.p, out.df = w.statistic, w.p, w.df
        out.low, out.high = float(ci.low), float(ci.high)
    u = st.mannwhitneyu(x, y, alternative="two-sided").statistic
    out.p_improve = float(u) / (nx * ny)
    out.mde = minimum_detectable(nx, out.sd, alpha, paired=False, n_b=ny)
    out.mde_family = minimum_detectable(nx, out.sd, fam_alpha, paired=False, n_b=ny)
    out.seeds_for_halfwidth = seeds_for_halfwidth(out.sd * math.sqrt(2) if out.sd else out.sd, halfwidth, level)
    return out


def simultaneous_level(level: float, m: int) -> float:
    """Bonferroni's per-comparison level giving `level` jointly over m intervals (it matches Holm's
    first step: an interval excludes 0 exactly when p < alpha / m)."""
    return 1 - (1 - level) / max(1, m)


def permutation_test(a, b, n_resamples: int = 9999, seed: int = 0) -> TestResult:
    """Nonparametric check of the same comparison: exact permutation test of the mean difference
    (``scipy.stats.permutation_test``): paired = sign flips of the per-seed differences (2^n), else
    the exchange of values between arms (C(n_a + n_b, n_a)); exact by enumeration while that count
    is <= n_resamples. With ties it stays exact, and p is never below min_p = 2 / (count)."""
    from scipy import stats as st

    va, vb = _by_seed(a), _by_seed(b)
    common = sorted(set(va) & set(vb))
    if len(common) >= 2:
        d = np.array([va[s] - vb[s] for s in common])
        out = TestResult("permutation (paired)", len(common), len(common))
        out.min_p = min(1.0, 2.0 / 2 ** len(common))
        if np.all(d == 0):
            out.p, out.statistic, out.note = 1.0, 0.0, "every difference is 0: p = 1"
            return out
        res = st.permutation_test((d,), np.mean, permutation_type="samples", vectorized=True,
                                  n_resamples=n_resamples, alternative="two-sided",
                                  rng=np.random.default_rng(seed))
    else:
        x, y = np.array(list(va.values())), np.array(list(vb.values()))
        out = TestResult("permutation (unpaired)", x.size, y.size)
        if x.size < 2 or y.size < 2:
            out.note = f"no test: fewer than 2 seeds in an arm (n = {x.size} vs {y.size})"
            return out
        out.min_p = mann_whitney_min_p(x.size, y.size)
        if _constant(np.concatenate([x, y])):
            out.p, out.statistic, out.note = 1.0, 0.0, "all values tied: p = 1"
            return out
        res = st.permutation_test((x, y), _mean_diff, permutation_type="independent", vectorized=True,
                                  n_resamples=n_resamples, alternative="two-sided",
                                  rng=np.random.default_rng(seed))
    out.statistic, out.p = float(res.statistic), min(1.0, max(float(res.pvalue), out.min_p))
    if out.min_p >= ALPHA:
        out.warning = f"with these seeds the smallest possible permutation p is {out.min_p:.3g}"
    return out
