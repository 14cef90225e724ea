"""Coverage benchmark: do the intervals cover and do the tests hold their level at the n the tables use?

    python benchmarks/coverage.py [--reps N] [--boot-reps M] [--seed S] [--ns 3 5 10] [--quick]

Simulated per-seed mIoU values (fractions, 0.30 +- 0.02) of a distilled arm `a` and the tuned
student `b`, at n = 3, 5, 10 seeds per arm, in two designs and three shapes:

- **paired** (what the harness runs: both arms rerun the same seeds): a_i = 0.30 + lift + s (sqrt(rho)
  U_i + sqrt(1 - rho) E_ai), b_i = 0.30 + s (sqrt(rho) U_i + sqrt(1 - rho) E_bi), a per-seed effect
  U_i shared by the arms (correlation rho = 0.5), s = 0.02 (2 mIoU points), independent noise E;
  the differences d_i = a_i - b_i have sd 0.02 as well;
- **unpaired** (no common seeds: the Welch fallback): a_i = 0.30 + lift + s E_ai, b_i = 0.30 + s E_bi;
- **normal**: U, E standard normal;
- **skewed**: U, E standardised gamma variables of skewness 2 (shape 1: a shifted exponential).
  ``skew-same``: every component with a long *lower* tail (a seed that collapses), in both arms;
  skew of the same sign in both arms largely cancels in a difference (paired: d is symmetric).
  ``skew-opp``: the shared effect and the distilled arm's noise with a long lower tail, the
  student's noise with a long *upper* tail (a lucky seed): the hard case for an interval of the
  difference (skewness of d -1.41; of the arms -2 / +2 unpaired, -1.41 / 0 paired).

For every interval and test the tables print (``harness.stats.compare_seeds`` and friends):

- coverage of the true lift (lift = 0.01) by the paired t interval (paired design) and the Welch
  interval (unpaired design) at 95 %; joint coverage of 4 Bonferroni simultaneous intervals
  (``simultaneous_level(0.95, 4)``; four distilled arms against one shared student arm);
- coverage of the true P(d > 0) (analytic: normal cdf / an integral of gamma densities) by the Clopper-Pearson 95 %
  interval of P(improvement) (paired design; the unpaired verdict prints no interval for it);
- for reference only, the 95 % BCa bootstrap interval (``harness.stats.bootstrap_diff``, arms resampled
  independently as the old tables did) - the reason the tables dropped it;
- size (type-I error at alpha = 0.05, true lift 0) of the paired t-test, Welch's t-test and the exact
  permutation test (``harness.stats.permutation_test``: sign flips / exchange of values), and the
  familywise error of Holm's correction over 4 null comparisons sharing the student arm;
- for information, the power of the test at the lift the tables call detectable at 80 % power
  (``harness.stats.minimum_detectable`` with the true sd).

Targets: intervals >= 94 % coverage; tests within alpha +- 1 point (Holm's familywise error: at most
alpha + 1 point, since Holm guarantees <= alpha, not = alpha).

How it is computed: the t interval, the t-tests and Holm are closed forms over the whole (reps, n)
array (``--reps``, default 20000 per cell); the permutation test is vectorised too (all 2^n sign
flips; all C(2n, n) exchanges up to n = 5, 9999 random exchanges at n = 10 like scipy's); the
Clopper-Pearson interval comes from a table over the count of d_i > 0. Before each cell the closed
forms are checked against ``compare_seeds``, ``permutation_test`` and ``holm`` on a few draws (the
run stops if they disagree). The BCa interval calls ``bootstrap_diff`` (9999 resamples) once per
repetition, so it gets fewer repetitions (``--boot-reps``, default 800). Each entry carries its Monte
Carlo standard error sqrt(p (1 - p) / reps). The table with its discussion: docs/statistics.md.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import stats as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import stats  # noqa: E402

ALPHA = 0.05
LEVEL = 0.95
MU = 0.30           # student mIoU (fraction)
SD = 0.02           # per-arm sd over seeds: 2 mIoU points
RHO = 0.5           # correlation of the arms over seeds (paired design)
LIFT = 0.01         # true lift for the coverage rows (1 point; d_z = 0.5)
FAMILY = 4          # distilled arms against one student arm
SKEW = 2.0          # skewness of each gamma component
NS = (3, 5, 10)       # --ns changes it for a run
DISTS = ("normal", "skew-same", "skew-opp")
# signs of the gamma components (shared seed effect U, student noise E_b, distilled noise E_a):
# -1 = long lower tail (a seed that collapses), +1 = long upper tail (a lucky seed)
SIGNS = {"skew-same": (-1, -1, -1), "skew-opp": (-1, +1, -1)}
DESIGNS = ("paired", "unpaired")
PERM_RANDOM = 9999  # scipy's n_resamples in harness.stats.permutation_test
INTERVAL_TARGET = 0.94


# ------------------------------------------------------------------------------ the simulation
def _standard(rng: np.random.Generator, dist: str, sign: int, size) -> np.ndarray:
    """Mean 0, sd 1; normal, or a gamma of skewness `sign` * SKEW."""
    if dist == "normal":
        return rng.standard_normal(size)
    k = 4.0 / SKEW ** 2
    return sign * (rng.gamma(k, 1.0, size) - k) / math.sqrt(k)


def draw(rng: np.random.Generator, dist: str, design: str, n: int, reps: int, lift: float,
         arms: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Per-seed values: a (arms, reps, n) distilled arms, b (reps, n) the student arm they share."""
    su, sb, sa = SIGNS.get(dist, (1, 1, 1))
    if design == "paired":
        u = _standard(rng, dist, su, (reps, n)) * math.sqrt(RHO)
        e = math.sqrt(1 - RHO)
    else:
        u, e = 0.0, 1.0
    b = MU + SD * (u + e * _standard(rng, dist, sb, (reps, n)))
    a = MU + lift + SD * (u + e * _standard(rng, dist, sa, (arms, reps, n)))
    return a, b


def true_p_improve(dist: str, lift: float) -> float:
    """P(d > 0) for one seed pair of the paired design, d = lift + SD sqrt(1 - RHO) (E_a - E_b)."""
    c = lift / (SD * math.sqrt(1 - RHO))
    if dist == "normal":
        return float(st.norm.cdf(c / math.sqrt(2)))
    from scipy import integrate

    _, sb, sa = SIGNS[dist]
    k = 4.0 / SKEW ** 2
    z = st.gamma(k, loc=-math.sqrt(k), scale=1 / math.sqrt(k))   # standardised gamma, skewness +SKEW

    def p_ea_above(t):  # P(sa Z1 > t)
        return z.sf(t) if sa > 0 else z.cdf(-t)

    # d > 0 <=> sa Z1 - sb Z2 > -c; integrate over Z2
    val, _ = integrate.quad(lambda x: z.pdf(x) * p_ea_above(-c + sb * x), z.support()[0], np.inf,
                            limit=200, epsabs=1e-12, epsrel=1e-10)
    return float(val)


def skewness(dist: str, design: str) -> Dict[str, float]:
    """Skewness of arm a, arm b and of a - b (one seed), from the third cumulants."""
    g = 0.0 if dist == "normal" else SKEW
    su, sb, sa = SIGNS.get(dist, (0, 0, 0))
    if design == "paired":
        wu, we = RHO ** 1.5, (1 - RHO) ** 1.5
        return {"a": g * (su * wu + sa * we), "b": g * (su * wu + sb * we), "d": (sa - sb) * g / 2 ** 1.5}
    return {"a": sa * g, "b": sb * g, "d": (sa - sb) * g / 2 ** 1.5}


# --------------------------------------------------------------------------------- closed forms
def paired_t(d: np.ndarray, level: float = LEVEL):
    """Paired t on the last axis of d: (mean, low, high, p)."""
    n = d.shape[-1]
    m, se = d.mean(-1), d.std(-1, ddof=1) / math.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = m / se
    q = st.t.ppf((1 + level) / 2, n - 1)
    return m, m - q * se, m + q * se, 2 * st.t.sf(np.abs(t), n - 1)


def welch_t(x: np.ndarray, y: np.ndarray, level: float = LEVEL):
    """Welch's t on the last axes: (diff, low, high, p)."""
    nx, ny = x.shape[-1], y.shape[-1]
    vx, vy = x.var(-1, ddof=1) / nx, y.var(-1, ddof=1) / ny
    se = np.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (nx - 1) + vy ** 2 / (ny - 1))
    m = x.mean(-1) - y.mean(-1)
    q = st.t.ppf((1 + level) / 2, df)
    return m, m - q * se, m + q * se, 2 * st.t.sf(np.abs(m / se), df)


def holm_adjusted(p: np.ndarray) -> np.ndarray:
    """Holm's adjusted p-values along axis 0 (the family), vectorised over the other axes."""
    m = p.shape[0]
    order = np.argsort(p, axis=0)
    ps = np.take_along_axis(p, order, axis=0)
    factors = (m - np.arange(m)).reshape((m,) + (1,) * (p.ndim - 1))
    adj_sorted = np.maximum.accumulate(np.minimum(1.0, factors * ps), axis=0)
    out = np.empty_like(p)
    np.put_along_axis(out, order, adj_sorted, axis=0)
    return out


def clopper_pearson_table(n: int, level: float = LEVEL) -> Tuple[np.ndarray, np.ndarray]:
    """Exact interval of a binomial proportion for each count k = 0..n (scipy's binomtest)."""
    lo, hi = np.empty(n + 1), np.empty(n + 1)
    for k in range(n + 1):
        ci = st.binomtest(k, n).proportion_ci(level, method="exact")
        lo[k], hi[k] = ci.low, ci.high
    return lo, hi


def _two_sided_p(null: np.ndarray, obs: np.ndarray, randomized: bool) -> np.ndarray:
    """scipy.stats.permutation_test's two-sided p: null (reps, P), obs (reps,)."""
    gamma = np.abs(np.finfo(np.float64).eps * 100 * obs)[:, None]
    le = (null <= obs[:, None] + gamma).sum(1)
    ge = (null >= obs[:, None] - gamma).sum(1)
    if randomized:
        le, ge, total = le + 1.0, ge + 1.0, null.shape[1] + 1.0
    else:
        total = float(null.shape[1])
    return np.clip(2 * np.minimum(le, ge) / total, 0, 1)


_PERM_CACHE: Dict[Tuple[str, int], Tuple[np.ndarray, bool]] = {}


def _permutations(design: str, n: int) -> Tuple[np.ndarray, bool]:
    """Weights W (1 + P, k) with the identity first: the statistic of permutation j is
    values @ W[j] / n, values = d (paired, k = n: sign flips) or [a, b] (unpaired, k = 2n: +1 for
    the values that play arm a, -1 for arm b). Exact: all 2^n flips / all C(2n, n) exchanges;
    randomized (C(2n, n) > 9999, like scipy): 9999 random exchanges after the identity."""
    key = (design, n)
    if key not in _PERM_CACHE:
        if design == "paired":
            w, randomized = np.array(list(itertools.product([1.0, -1.0], repeat=n))), False
        elif math.comb(2 * n, n) <= PERM_RANDOM:
            w = -np.ones((math.comb(2 * n, n), 2 * n))
            for i, c in enumerate(itertools.combinations(range(2 * n), n)):
                w[i, list(c)] = 1.0
            randomized = False
        else:
            rng = np.random.default_rng(12345)
            w = -np.ones((PERM_RANDOM + 1, 2 * n))
            w[0, :n] = 1.0
            for i in range(1, PERM_RANDOM + 1):
                w[i, rng.permutation(2 * n)[:n]] = 1.0
            randomized = True
        assert np.all(w[0] == np.r_[np.ones(n), -np.ones(len(w[0]) - n)])   # identity first
        _PERM_CACHE[key] = (w, randomized)
    return _PERM_CACHE[key]


def permutation_p(a: np.ndarray, b: np.ndarray, design: str, chunk: int = 500) -> np.ndarray:
    """Two-sided permutation p of mean(a) - mean(b) per row of (reps, n) arrays, as
    harness.stats.permutation_test computes it (clipped below at its min_p). The observed statistic
    is the identity's entry of the same product, so it ties exactly with itself and with its mirror
    image (-obs: all signs flipped / the arms swapped), as in scipy."""
    n = a.shape[-1]
    out = np.empty(a.shape[0])
    w, randomized = _permutations(design, n)
    min_p = min(1.0, 2.0 / 2 ** n) if design == "paired" else stats.mann_whitney_min_p(n, n)
    for s in range(0, a.shape[0], chunk):
        x, y = a[s:s + chunk], b[s:s + chunk]
        v = (x - y) if design == "paired" else np.concatenate([x, y], axis=-1)
        v = v - v.mean(-1, keepdims=True) * (design != "paired")   # centring: the statistic is invariant
        null = v @ w.T / n
        obs = null[:, 0].copy()
        if randomized:
            null = null[:, 1:]
        out[s:s + chunk] = np.maximum(_two_sided_p(null, obs, randomized), min_p)
    return out


# ------------------------------------------------------------------------ checks against harness
def check_against_harness(rng: np.random.Generator, dist: str, design: str, n: int, draws: int = 3) -> None:
    """The closed forms equal what the tables compute (harness.stats) on a few draws; raises if not."""
    a, b = draw(rng, dist, design, n, draws, LIFT, FAMILY)
    sim = stats.simultaneous_level(LEVEL, FAMILY)
    for r in range(draws):
        x, y = a[0, r], b[r]
        if design == "paired":
            va, vb = dict(enumerate(x)), dict(enumerate(y))
            m, lo, hi, p = paired_t((x - y)[None])
            _, slo, shi, _ = paired_t((x - y)[None], sim)
        else:
            va, vb = dict(enumerate(x)), {i + 1000: v for i, v in enumerate(y)}
            m, lo, hi, p = welch_t(x[None], y[None])
            _, slo, shi, _ = welch_t(x[None], y[None], sim)
        v = stats.compare_seeds(va, vb)
        assert v.design == design, (v.design, design)
        np.testing.assert_allclose([v.lift, v.low, v.high, v.p], [m[0], lo[0], hi[0], p[0]], rtol=1e-9, atol=1e-12)
        vs = stats.compare_seeds(va, vb, level=sim)
        np.testing.assert_allclose([vs.low, vs.high], [slo[0], shi[0]], rtol=1e-9, atol=1e-12)
        if design == "paired":
            k = int(np.sum(x - y > 0))
            lo_t, hi_t = clopper_pearson_table(n)
            np.testing.assert_allclose([v.p_improve_low, v.p_improve_high], [lo_t[k], hi_t[k]], rtol=1e-12)
        pp = stats.permutation_test(va, vb).p
        mine = permutation_p(x[None], y[None], design)[0]
        randomized = _permutations(design, n)[1]
        # exact enumeration: identical; random exchanges (unpaired n = 10): both estimate one p
        # (p = 2 min(P_less, P_greater): each estimate has sd 2 sqrt(q (1 - q) / 9999), q ~ p / 2)
        q = min(max(pp / 2, 1e-3), 0.5)
        tol = 4 * math.sqrt(2) * 2 * math.sqrt(q * (1 - q) / PERM_RANDOM) if randomized else 1e-12
        assert abs(pp - mine) <= tol, (dist, design, n, pp, mine)
        # Holm over the family's p-values (the closed form's, equal to compare_seeds' as checked above)
        ps = (paired_t(a[:, r] - y) if design == "paired" else welch_t(a[:, r], y[None]))[3]
        np.testing.assert_allclose(stats.holm(list(ps)).adjusted, holm_adjusted(ps[:, None])[:, 0], rtol=1e-12)


# ------------------------------------------------------------------------------------ one cell
@dataclass
class Entry:
    rate: Optional[float]
    reps: int
    kind: str          # 'interval' | 'test' | 'family' | 'info'

    @property
    def se(self) -> float:
        return math.sqrt(self.rate * (1 - self.rate) / self.reps) if self.rate is not None else float("nan")

    @property
    def mark(self) -> str:
        if self.rate is None:
            return ""
        if self.kind == "interval":
            return "✓" if self.rate >= INTERVAL_TARGET else "✗↓"
        if self.kind == "test":
            return "✓" if abs(self.rate - ALPHA) <= 0.01 + 1e-12 else ("✗↓" if self.rate < ALPHA else "✗↑")
        if self.kind == "family":
            return "✓" if self.rate <= ALPHA + 0.01 + 1e-12 else "✗↑"
        return ""


def run_cell(rng: np.random.Generator, dist: str, design: str, n: int, reps: int, boot_reps: int,
             chunk: int = 5000) -> Dict[str, Entry]:
    sim = stats.simultaneous_level(LEVEL, FAMILY)
    cover = cover_sim = cover_cp = reject = reject_perm = fwe = power_hits = 0
    lo_t, hi_t = clopper_pearson_table(n)
    p_true = true_p_improve(dist, LIFT)
    test = paired_t if design == "paired" else (lambda x, y, level=LEVEL: welch_t(x, y, level))
    if design == "paired":
        sd_d = SD * math.sqrt(2 * (1 - RHO))
        mde = stats.minimum_detectable(n, sd_d, ALPHA)
    else:
        mde = stats.minimum_detectable(n, SD, ALPHA, paired=False, n_b=n)

    def analyse(a, b, level=LEVEL):
        return paired_t(a - b, level) if design == "paired" else welch_t(a, b, level)

    for s in range(0, reps, chunk):
        m = min(chunk, reps - s)
        # coverage: true lift LIFT, four distilled arms sharing the student arm
        a, b = draw(rng, dist, design, n, m, LIFT, FAMILY)
        _, lo, hi, _ = analyse(a[0], b)
        cover += int(np.sum((lo <= LIFT) & (LIFT <= hi)))
        _, lo, hi, _ = analyse(a, b[None], sim)
        cover_sim += int(np.sum(np.all((lo <= LIFT) & (LIFT <= hi), axis=0)))
        if design == "paired":
            k = np.sum(a[0] - b > 0, axis=-1)
            cover_cp += int(np.sum((lo_t[k] <= p_true) & (p_true <= hi_t[k])))
        # size: true lift 0
        a, b = draw(rng, dist, design, n, m, 0.0, FAMILY)
        _, _, _, p = analyse(a, b[None])
        reject += int(np.sum(p[0] < ALPHA))
        fwe += int(np.sum(np.any(holm_adjusted(p) < ALPHA, axis=0)))
        reject_perm += int(np.sum(permutation_p(a[0], b, design) < ALPHA))
        # power at the detectable lift
        a, b = draw(rng, dist, design, n, m, mde, 1)
        _, _, _, p = analyse(a[0], b)
        power_hits += int(np.sum(p < ALPHA))

    # the BCa bootstrap interval, by the harness's own function (slow: fewer repetitions)
    a, b = draw(rng, dist, design, n, boot_reps, LIFT, 1)
    cover_boot = 0
    for r in range(boot_reps):
        ci = stats.bootstrap_diff(a[0, r], b[r])
        cover_boot += int(ci.low <= LIFT <= ci.high)

    out = {
        "interval": Entry(cover / reps, reps, "interval"),
        "simultaneous": Entry(cover_sim / reps, reps, "interval"),
        "cp": Entry(cover_cp / reps if design == "paired" else None, reps, "interval"),
        "bca": Entry(cover_boot / boot_reps if boot_reps else None, max(boot_reps, 1), "interval"),
        "test": Entry(reject / reps, reps, "test"),
        "perm": Entry(reject_perm / reps, reps, "test"),
        "holm": Entry(fwe / reps, reps, "family"),
        "power": Entry(power_hits / reps, reps, "info"),
    }
    out["_mde"] = mde  # type: ignore[assignment]
    return out


ROWS = {
    "paired": [
        ("interval", "paired t interval, 95 %: covers the lift"),
        ("simultaneous", f"Bonferroni simultaneous paired t intervals ({FAMILY} arms, each at "
                         f"{100 * stats.simultaneous_level(LEVEL, FAMILY):.2f} %): all cover"),
        ("cp", "Clopper-Pearson 95 % interval of P(improvement): covers P(d > 0)"),
        ("bca", "BCa bootstrap 95 % (reference; not printed by the tables)"),
        ("test", "paired t-test: size at alpha 0.05"),
        ("perm", "permutation test (sign flips): size"),
        ("holm", f"Holm over {FAMILY} null comparisons, shared student arm: familywise error"),
        ("power", "power of the paired t at the detectable lift (info; 80 % intended)"),
    ],
    "unpaired": [
        ("interval", "Welch interval, 95 %: covers the lift"),
        ("simultaneous", f"Bonferroni simultaneous Welch intervals ({FAMILY} arms, each at "
                         f"{100 * stats.simultaneous_level(LEVEL, FAMILY):.2f} %): all cover"),
        ("bca", "BCa bootstrap 95 % (reference; not printed by the tables)"),
        ("test", "Welch t-test: size at alpha 0.05"),
        ("perm", "permutation test (exchange of values): size"),
        ("holm", f"Holm over {FAMILY} null comparisons, shared student arm: familywise error"),
        ("power", "power of Welch's t at the detectable lift (info; 80 % intended)"),
    ],
}


def fmt(e: Entry) -> str:
    if e.rate is None:
        return "-"
    return f"{100 * e.rate:.1f} ± {100 * e.se:.1f} {e.mark}".rstrip()


def table(results, design: str, reps: int, boot_reps: int, ns=NS) -> str:
    cols = [(d, n) for d in DISTS for n in ns]
    head = "| " + " | ".join(["quantity (target)"] + [f"{d} n={n}" for d, n in cols]) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for key, label in ROWS[design]:
        target = {"interval": "≥ 94", "simultaneous": "≥ 94", "cp": "≥ 94", "bca": "≥ 94", "test": "5 ± 1",
                  "perm": "5 ± 1", "holm": "≤ 6", "power": "info"}[key]
        lines.append("| " + " | ".join([f"{label} ({target})"]
                                       + [fmt(results[(d, design, n)][key]) for d, n in cols]) + " |")
    mdes = " / ".join(f"{100 * results[('normal', design, n)]['_mde']:.2f}" for n in ns)
    sk = {d: skewness(d, design) for d in DISTS}
    lines.append("")
    skews = "; ".join(f"{d} {sk[d]['a']:+.2f}, {sk[d]['b']:+.2f}, {sk[d]['d']:+.2f}" for d in DISTS[1:])
    truth = ", ".join(f"{d} {true_p_improve(d, LIFT):.3f}" for d in DISTS)
    lines.append(f"{design}: {reps} repetitions per cell ({boot_reps} for BCa); entries are % ± Monte Carlo "
                 f"standard error; detectable lift (normal) at n = {' / '.join(map(str, ns))}: {mdes} points; skewness of "
                 f"arm a, arm b, a - b: {skews}"
                 + (f"; true P(d > 0) at lift {100 * LIFT:g} point: {truth}" if design == "paired" else ""))
    return "\n".join(lines)


def misses(results) -> List[str]:
    out = []
    for (d, design, n), cell in results.items():
        for key, label in ROWS[design]:
            e = cell[key]
            if e.mark.startswith("✗"):
                out.append(f"{design} {d} n={n}: {label}: {100 * e.rate:.1f} ± {100 * e.se:.1f} %")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=20000, help="repetitions per cell (closed forms)")
    ap.add_argument("--boot-reps", type=int, default=None, help="repetitions per cell for BCa (default 800)")
    ap.add_argument("--seed", type=int, default=20240612)
    ap.add_argument("--quick", action="store_true", help="2000 repetitions, 100 for BCa")
    ap.add_argument("--ns", type=int, nargs="+", default=list(NS), help="seed counts (default 3 5 10)")
    args = ap.parse_args(argv)
    ns = tuple(args.ns)
    reps = 2000 if args.quick and args.reps == 20000 else args.reps
    boot_reps = args.boot_reps if args.boot_reps is not None else (100 if args.quick else 800)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    results = {}
    for design in DESIGNS:
        for d in DISTS:
            for n in ns:
                t = time.perf_counter()
                check_against_harness(rng, d, design, n)
                results[(d, design, n)] = run_cell(rng, d, design, n, reps, boot_reps)
                print(f"  {design:8s} {d:6s} n={n:2d}: {time.perf_counter() - t:6.1f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0
    cmd = "python benchmarks/coverage.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"# Coverage of the intervals and tests ({cmd}, seed {args.seed})\n")
    for design in DESIGNS:
        print(f"## {design} design\n")
        print(table(results, design, reps, boot_reps, ns))
        print()
    print("✓ at target; ✗↓ below (interval under 94 %, or a test that rejects less than alpha - 1 point); "
          "✗↑ a test that rejects more than alpha + 1 point.")
    miss = misses(results)
    print("\nMisses:" if miss else "\nMisses: none")
    for m in miss:
        print(f"- {m}")
    print(f"\nTotal time: {total:.1f} s on {platform.machine()} ({os.cpu_count()} CPUs visible), "
          f"Python {platform.python_version()}, numpy {np.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
