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


def test_mann_whitney_with_ties_matches_r():
    r = stats.mann_whitney(SLEEP_1, SLEEP_2)
    assert r.statistic == pytest.approx(25.5)        # R: W = 25.5
    assert r.p == pytest.approx(0.06933, abs=5e-6)   # R: p-value = 0.06933 (normal approx, ties)
    assert "ties" in r.note and r.warning == ""


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
