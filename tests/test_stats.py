"""harness.stats against known values: R's outputs on the `sleep` data (Student 1908), exact
Mann-Whitney distributions enumerated here, Holm by hand, bootstrap against an own resampling loop."""
import itertools
import math
import statistics

import numpy as np
import pytest

from harness import stats

# R: t.test(extra ~ group, data = sleep) / wilcox.test(extra ~ group, data = sleep)
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def welch_by_hand(a, b):
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, df


def test_welch_sleep_matches_r_and_the_formula():
    r = stats.welch(SLEEP_1, SLEEP_2)
    t, df = welch_by_hand(SLEEP_1, SLEEP_2)
    assert r.statistic == pytest.approx(t, rel=1e-12)
    assert r.df == pytest.approx(df, rel=1e-12)
    assert r.statistic == pytest.approx(-1.8608, abs=5e-5)      # R: t = -1.8608
    assert r.df == pytest.approx(17.776, abs=5e-4)               # R: df = 17.776
    assert r.p == pytest.approx(0.07939, abs=5e-6)               # R: p-value = 0.07939
    assert r.note == "" and r.available


def test_welch_is_antisymmetric():
    a, b = stats.welch(SLEEP_1, SLEEP_2), stats.welch(SLEEP_2, SLEEP_1)
    assert a.statistic == pytest.approx(-b.statistic) and a.p == pytest.approx(b.p)


@pytest.mark.parametrize("a,b", [([0.5], [0.4, 0.41, 0.42]), ([0.5, 0.6], [0.4]), ([], [0.1, 0.2])])
def test_welch_needs_two_seeds_per_arm(a, b):
    r = stats.welch(a, b)
    assert r.p is None and r.statistic is None and not r.available
    assert "no test" in r.note and "at least 2" in r.note


def test_welch_zero_variance_in_both_arms_is_no_test_not_p_zero():
    r = stats.welch([0.5, 0.5, 0.5], [0.4, 0.4, 0.4])
    assert r.p is None and "zero variance" in r.note and "+0.1" in r.note
    same = stats.welch([0.5, 0.5], [0.5, 0.5, 0.5])
    assert same.p is None and "equal values" in same.note


def test_welch_zero_variance_in_one_arm_uses_the_other():
    a, b = [0.5, 0.5, 0.5], [0.40, 0.42, 0.47]
    r = stats.welch(a, b)
    se = math.sqrt(statistics.variance(b) / 3)
    assert r.statistic == pytest.approx((0.5 - statistics.fmean(b)) / se, rel=1e-12)
    assert r.df == pytest.approx(2.0, rel=1e-12)   # all the variance from b: df = n_b - 1
    assert "zero variance" in r.note and r.p is not None


def exact_mw_p(a, b):
    """Two-sided exact p by enumerating every split of the pooled ranks (no ties)."""
    pooled = sorted(a + b)
    rank = {v: i + 1 for i, v in enumerate(pooled)}
    n, m = len(a), len(b)
    u_obs = sum(rank[v] for v in a) - n * (n + 1) / 2
    us = [sum(c) - n * (n + 1) / 2 for c in itertools.combinations(range(1, n + m + 1), n)]
    centre = n * m / 2
    extreme = sum(abs(u - centre) >= abs(u_obs - centre) - 1e-12 for u in us)
    return u_obs, min(1.0, extreme / len(us))


@pytest.mark.parametrize("a,b", [([1.0, 3.0, 5.0], [2.0, 4.0, 6.0, 7.0]),
                                 ([0.61, 0.64, 0.66, 0.70], [0.55, 0.58, 0.60, 0.62, 0.57]),
                                 ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])])
def test_mann_whitney_exact_matches_enumeration(a, b):
    u, p = exact_mw_p(a, b)
    r = stats.mann_whitney(a, b)
    assert r.statistic == pytest.approx(u) and r.p == pytest.approx(p, rel=1e-12)


def tied_mw_p(a, b):
    """Two-sided permutation p of U with midranks: every split of the pooled values enumerated."""
    pooled = a + b
    order = sorted(pooled)
    midrank = {v: (order.index(v) + 1 + len(order) - order[::-1].index(v)) / 2 for v in order}
    n, m = len(a), len(b)
    u_of = lambda idx: sum(midrank[pooled[i]] for i in idx) - n * (n + 1) / 2  # noqa: E731
    u_obs = u_of(range(n))
    us = [u_of(c) for c in itertools.combinations(range(n + m), n)]
    low = sum(u <= u_obs + 1e-12 for u in us) / len(us)
    high = sum(u >= u_obs - 1e-12 for u in us) / len(us)
    return u_obs, min(1.0, 2 * min(low, high))  # scipy's two-sided convention: twice the smaller tail


@pytest.mark.parametrize("a,b", [([1.0, 1.0, 2.0], [1.0, 3.0, 3.0]),
                                 ([0.30, 0.31, 0.31, 0.33], [0.29, 0.30, 0.30, 0.28, 0.31]),
                                 ([0.5, 0.6, 0.6, 0.7, 0.8], [0.6, 0.6, 0.4, 0.5, 0.5])])
def test_mann_whitney_with_ties_is_the_exact_permutation_p(a, b):
    u, p = tied_mw_p(a, b)
    r = stats.mann_whitney(a, b)
    assert r.statistic == pytest.approx(u) and r.p == pytest.approx(p, rel=1e-9)
    assert r.p >= r.min_p and "ties" in r.note


def test_mann_whitney_with_ties_never_below_its_minimum_p():
    # the normal approximation gave p < 0.05 here, below the 2 / C(6, 3) = 0.1 any 3 vs 3 data allow
    r = stats.mann_whitney([0.31, 0.32, 0.33], [0.30, 0.30, 0.29])
    assert r.p >= r.min_p == pytest.approx(0.1)
    big = stats.mann_whitney(SLEEP_1, SLEEP_2)        # 10 vs 10: Monte Carlo permutation, seeded
    assert big.statistic == pytest.approx(25.5)       # R: W = 25.5
    assert big.p == pytest.approx(0.069, abs=0.01)    # R (normal approximation with ties): 0.06933


def test_mann_whitney_minimum_p_and_warning():
    assert stats.mann_whitney_min_p(3, 3) == pytest.approx(0.1)           # 2 / C(6, 3)
    assert stats.mann_whitney_min_p(4, 4) == pytest.approx(2 / 70)
    assert stats.mann_whitney_min_p(1, 5) == pytest.approx(1 / 3)
    r = stats.mann_whitney([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert r.p == pytest.approx(0.1) and r.min_p == pytest.approx(0.1)   # best case reaches the floor
    assert "impossible" in r.warning and "0.1" in r.warning
    assert stats.mann_whitney([1.0, 2, 3, 4], [5.0, 6, 7, 8]).warning == ""


def test_mann_whitney_all_tied_and_n1():
    r = stats.mann_whitney([0.5, 0.5], [0.5, 0.5, 0.5])
    assert r.p == 1.0 and r.statistic == 3.0 and "tied" in r.note
    one = stats.mann_whitney([0.9], [0.1, 0.2, 0.3])
    assert one.p == pytest.approx(0.5) and one.min_p == pytest.approx(0.5) and one.warning
    empty = stats.mann_whitney([], [0.1])
    assert empty.p is None and "no values" in empty.note


def test_holm_textbook():
    r = stats.holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(1*0.04, 0.06)
    assert r.adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert r.rejected == [True, False, False, True] and r.m == 4


def test_holm_skips_missing_caps_at_one_and_keeps_order():
    r = stats.holm([0.5, None, 0.2, 0.9])
    assert r.adjusted[1] is None and r.rejected[1] is None and r.m == 3
    # sorted 0.2, 0.5, 0.9 -> 3*0.2, 2*0.5, max(1*0.9, 1.0)
    assert r.adjusted[2] == pytest.approx(0.6) and r.adjusted[0] == pytest.approx(1.0)
    assert r.adjusted[3] == pytest.approx(1.0)
    assert stats.holm([]).adjusted == [] and stats.holm([None]).note
    with pytest.raises(ValueError):
        stats.holm([1.5])


def own_percentile_bootstrap(a, b, n, seed, level=0.95):
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a), np.asarray(b)
    d = [rng.choice(a, a.size).mean() - rng.choice(b, b.size).mean() for _ in range(n)]
    return np.quantile(d, [(1 - level) / 2, (1 + level) / 2])


def test_bootstrap_percentile_matches_own_resampling():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.6, 0.02, 8), rng.normal(0.55, 0.03, 7)
    ours = stats.bootstrap_diff(a, b, method="percentile", n_resamples=4000, seed=3)
    low, high = own_percentile_bootstrap(a, b, 4000, seed=11)
    assert ours.method == "percentile" and ours.diff == pytest.approx(a.mean() - b.mean())
    width = high - low
    assert ours.low == pytest.approx(low, abs=0.08 * width) and ours.high == pytest.approx(high, abs=0.08 * width)


def test_bootstrap_bca_close_to_normal_theory_for_large_samples():
    rng = np.random.default_rng(2)
    a, b = rng.normal(1.0, 1.0, 200), rng.normal(0.7, 1.0, 200)
    ci = stats.bootstrap_diff(a, b, n_resamples=2000, seed=0)
    se = math.sqrt(a.var(ddof=1) / 200 + b.var(ddof=1) / 200)
    assert ci.method == "BCa" and ci.low < ci.diff < ci.high
    assert ci.low == pytest.approx(ci.diff - 1.96 * se, abs=0.1 * se)
    assert ci.high == pytest.approx(ci.diff + 1.96 * se, abs=0.1 * se)


def test_bootstrap_is_seeded():
    a, b = [0.61, 0.64, 0.66, 0.70], [0.55, 0.58, 0.60]
    one, two = stats.bootstrap_diff(a, b, n_resamples=500, seed=5), stats.bootstrap_diff(a, b, n_resamples=500, seed=5)
    assert (one.low, one.high) == (two.low, two.high)


def test_bootstrap_degenerate_cases():
    flat = stats.bootstrap_diff([0.5, 0.5, 0.5], [0.4, 0.4])
    assert flat.low == flat.high == pytest.approx(0.1) and flat.method == "degenerate" and flat.note
    single = stats.bootstrap_diff([0.5], [0.4, 0.45])
    assert single.low is None and single.diff == pytest.approx(0.075) and "at least 2" in single.note


def test_bootstrap_falls_back_to_percentile_when_bca_is_nan(monkeypatch):
    from scipy import stats as sst

    real = sst.bootstrap

    def fake(*args, method="BCa", **kw):
        res = real(*args, method=method, **kw)
        if method == "BCa":
            res.confidence_interval = type(res.confidence_interval)(np.nan, np.nan)
        return res

    monkeypatch.setattr(sst, "bootstrap", fake)
    ci = stats.bootstrap_diff([0.61, 0.64, 0.66], [0.55, 0.58, 0.60], n_resamples=500)
    assert ci.method == "percentile" and ci.low < ci.high and "percentile" in ci.note


def test_compare_collects_notes():
    c = stats.compare([0.6, 0.61, 0.62], [0.5, 0.52, 0.51], n_resamples=500)
    assert c.welch.p < 0.05 and c.interval.low > 0 and any("impossible" in n for n in c.notes)
    with pytest.raises(ValueError):
        stats.welch([float("nan"), 1.0], [1.0, 2.0])


# ------------------------------------------------------------------------- the paired verdict
A = {1: 0.301, 2: 0.322, 3: 0.287, 4: 0.335, 5: 0.296}
B = {1: 0.290, 2: 0.301, 3: 0.289, 4: 0.310, 5: 0.281}


def test_paired_verdict_is_scipys_paired_t_on_the_common_seeds():
    from scipy import stats as st

    v = stats.compare_seeds(A, B)
    a, b = [A[s] for s in sorted(A)], [B[s] for s in sorted(B)]
    ref = st.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert v.design == "paired" and v.test == "paired t" and v.seeds == [1, 2, 3, 4, 5]
    assert v.p == pytest.approx(ref.pvalue) and v.statistic == pytest.approx(ref.statistic)
    assert (v.low, v.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    d = np.subtract(a, b)
    assert v.lift == pytest.approx(d.mean()) and v.effect == pytest.approx(d.mean() / d.std(ddof=1))
    assert v.p_improve == pytest.approx(4 / 5)          # seed 3 is the one loss
    cp = st.binomtest(4, 5).proportion_ci(0.95, method="exact")
    assert (v.p_improve_low, v.p_improve_high) == (pytest.approx(cp.low), pytest.approx(cp.high))


def test_paired_verdict_pairs_by_seed_not_by_position_and_says_what_it_left_out():
    shuffled = {s: A[s] for s in (5, 3, 1, 4, 2)}
    b = dict(B)
    b[9] = 0.5                                           # a seed the other arm does not have
    v = stats.compare_seeds(shuffled, b)
    assert v.lift == pytest.approx(stats.compare_seeds(A, B).lift)
    assert v.n_pairs == 5 and v.n_b == 6 and any("seed(s) 9 left out" in n for n in v.notes)


def test_detectable_lift_uses_statsmodels_and_reproduces_the_issue_numbers():
    from statsmodels.stats.power import TTestIndPower, TTestPower

    # n = 5 per arm, sd 2 points: 4.05 points at 80 % power, 5.28 at Holm's first step over 4 rows
    assert 100 * stats.minimum_detectable(5, 0.02, paired=False, n_b=5) == pytest.approx(4.05, abs=0.01)
    assert 100 * stats.minimum_detectable(5, 0.02, 0.05 / 4, paired=False, n_b=5) == pytest.approx(5.28, abs=0.01)
    es = TTestPower().solve_power(effect_size=None, nobs=7, alpha=0.05, power=0.8)
    assert stats.minimum_detectable(7, 0.01) == pytest.approx(es * 0.01)
    es = TTestIndPower().solve_power(effect_size=None, nobs1=4, ratio=6 / 4, alpha=0.05, power=0.8)
    assert stats.minimum_detectable(4, 0.01, paired=False, n_b=6) == pytest.approx(es * 0.01)
    assert stats.minimum_detectable(1, 0.01) is None and stats.minimum_detectable(5, 0.0) is None


def test_seeds_for_halfwidth_is_the_smallest_n_by_enumeration():
    from scipy import stats as st

    for sd, h in ((0.02, 0.01), (0.005, 0.01), (0.03, 0.005)):
        n = stats.seeds_for_halfwidth(sd, h)
        assert st.t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= h
        assert n == 2 or st.t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1) > h


def test_underpowered_flag_and_family_size():
    v = stats.compare_seeds(A, B, family_size=4)
    assert v.mde_family > v.mde > 0
    assert v.underpowered == (abs(v.lift) < v.mde)
    assert stats.simultaneous_level(0.95, 4) == pytest.approx(0.9875)


def test_unpaired_fallback_is_welch_with_its_interval():
    from scipy import stats as st

    a, b = {1: 0.30, 2: 0.31, 3: 0.33}, {11: 0.28, 12: 0.29, 13: 0.27, 14: 0.30}
    v = stats.compare_seeds(a, b)
    ref = st.ttest_ind(list(a.values()), list(b.values()), equal_var=False)
    assert v.design == "unpaired" and v.test == "Welch t" and v.p == pytest.approx(ref.pvalue)
    assert v.low == pytest.approx(ref.confidence_interval().low)
    assert v.p_improve == pytest.approx(st.mannwhitneyu(list(a.values()), list(b.values())).statistic / 12)
    assert v.p_improve_low is None and v.effect_name == "Hedges' g"


def test_verdict_without_enough_seeds_or_variance_says_so():
    v = stats.compare_seeds({1: 0.3}, {1: 0.2})
    assert v.p is None and v.lift == pytest.approx(0.1) and any("fewer than 2" in n for n in v.notes)
    flat = stats.compare_seeds({1: 0.3, 2: 0.4}, {1: 0.2, 2: 0.3})
    assert flat.p is None and flat.low == flat.high == pytest.approx(0.1) and any("zero variance" in n for n in flat.notes)
    with pytest.raises(ValueError):
        stats.compare_seeds({1: float("nan"), 2: 0.3}, {1: 0.2, 2: 0.3})


def test_permutation_test_is_exact_and_never_below_its_floor():
    d = np.array([A[s] - B[s] for s in sorted(A)])
    flips = np.array(list(itertools.product([1, -1], repeat=5)))
    means = (flips * d).mean(axis=1)
    expected = np.mean(np.abs(means) >= abs(d.mean()) - 1e-12)
    r = stats.permutation_test(A, B)
    assert r.test == "permutation (paired)" and r.p == pytest.approx(expected)
    assert r.min_p == pytest.approx(2 / 32) and r.p >= r.min_p
    tied = stats.permutation_test({1: 0.3, 2: 0.3, 3: 0.3}, {1: 0.2, 2: 0.2, 3: 0.2})
    assert tied.p == pytest.approx(0.25) and "0.25" in tied.warning
