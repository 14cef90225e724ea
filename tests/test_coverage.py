"""The coverage benchmark (benchmarks/coverage.py) on a small scale: its closed forms are what the
tables compute, and its coverage / size estimates behave as the theory says they must."""
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as st

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cov():
    spec = importlib.util.spec_from_file_location("coverage_benchmark", ROOT / "benchmarks" / "coverage.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def within_binomial(rate: float, target: float, reps: int, z: float = 4.0) -> bool:
    return abs(rate - target) <= z * math.sqrt(target * (1 - target) / reps)


@pytest.mark.parametrize("design", ["paired", "unpaired"])
@pytest.mark.parametrize("n", [3, 5, 10])
def test_closed_forms_equal_the_harness(cov, design, n):
    """t interval, p, simultaneous level, Clopper-Pearson, permutation p and Holm equal harness.stats
    (compare_seeds, permutation_test, holm) on a few draws of every distribution."""
    rng = np.random.default_rng(n)
    for dist in cov.DISTS:
        cov.check_against_harness(rng, dist, design, n, draws=1)


def test_exact_intervals_and_tests_hit_their_level_on_normal_data(cov):
    """Normal data: the paired t interval and the Welch interval cover about 95 %, the paired t-test
    rejects about 5 % under the null (binomial tolerance); the permutation test at n = 3 cannot reject."""
    reps = 6000
    paired = cov.run_cell(np.random.default_rng(1), "normal", "paired", 5, reps, boot_reps=0)
    assert within_binomial(paired["interval"].rate, 0.95, reps)
    assert within_binomial(paired["test"].rate, 0.05, reps)
    assert paired["simultaneous"].rate >= 0.95 - 4 * math.sqrt(0.05 * 0.95 / reps)
    assert within_binomial(paired["power"].rate, 0.80, reps)
    unpaired = cov.run_cell(np.random.default_rng(2), "normal", "unpaired", 10, reps, boot_reps=0)
    assert within_binomial(unpaired["interval"].rate, 0.95, reps, z=5)
    small = cov.run_cell(np.random.default_rng(3), "normal", "paired", 3, 500, boot_reps=0)
    assert small["perm"].rate == 0.0          # min p = 2 / 2^3 = 0.25 > alpha
    assert small["perm"].mark == "✗↓" and paired["interval"].mark == "✓"


def test_the_benchmark_sees_an_interval_that_is_too_short(cov):
    """An 80 % interval presented as if it were a 95 % one: the coverage estimate says ~80 % and marks it."""
    rng = np.random.default_rng(4)
    a, b = cov.draw(rng, "normal", "paired", 5, 4000, cov.LIFT)
    _, lo, hi, _ = cov.paired_t(a[0] - b, level=0.80)
    rate = float(np.mean((lo <= cov.LIFT) & (cov.LIFT <= hi)))
    assert within_binomial(rate, 0.80, 4000)
    assert cov.Entry(rate, 4000, "interval").mark == "✗↓"


def test_clopper_pearson_coverage_matches_the_exact_binomial_sum(cov):
    """The Monte Carlo coverage of the Clopper-Pearson interval agrees with the exact coverage
    sum_k Binom(k; n, p) [p in CI(k)] and is never below 95 % (the interval is conservative)."""
    reps = 6000
    for dist in ("normal", "skew-opp"):
        p_true = cov.true_p_improve(dist, cov.LIFT)
        for n in (3, 10):
            lo, hi = cov.clopper_pearson_table(n)
            k = np.arange(n + 1)
            exact = float(np.sum(st.binom.pmf(k, n, p_true) * ((lo <= p_true) & (p_true <= hi))))
            assert exact >= 0.95
            cell = cov.run_cell(np.random.default_rng(n), dist, "paired", n, reps, boot_reps=0)
            assert within_binomial(cell["cp"].rate, exact, reps, z=4.5) or cell["cp"].rate == exact == 1.0


def test_true_probability_of_improvement_matches_monte_carlo(cov):
    rng = np.random.default_rng(5)
    for dist in cov.DISTS:
        a, b = cov.draw(rng, dist, "paired", 1, 400_000, cov.LIFT)
        mc = float(np.mean(a[0, :, 0] - b[:, 0] > 0))
        assert abs(mc - cov.true_p_improve(dist, cov.LIFT)) < 4 * math.sqrt(0.25 / 400_000)


def test_skewness_of_the_simulated_seeds(cov):
    rng = np.random.default_rng(6)
    for dist in cov.DISTS:
        for design in cov.DESIGNS:
            a, b = cov.draw(rng, dist, design, 1, 400_000, 0.0)
            want = cov.skewness(dist, design)
            x, y = a[0, :, 0], b[:, 0]
            assert st.skew(x) == pytest.approx(want["a"], abs=0.1)
            assert st.skew(y) == pytest.approx(want["b"], abs=0.1)
            assert st.skew(x - y) == pytest.approx(want["d"], abs=0.1)
            assert np.std(x) == pytest.approx(cov.SD, rel=0.02)


def test_bca_undercovers_at_three_seeds(cov):
    """The harness's BCa bootstrap interval (the one the tables dropped) covers clearly less than
    95 % at n = 3: the benchmark shows why."""
    reps = 250
    cell = cov.run_cell(np.random.default_rng(7), "normal", "unpaired", 3, 200, boot_reps=reps)
    hits = round(cell["bca"].rate * reps)
    assert st.binomtest(hits, reps, 0.95, alternative="less").pvalue < 1e-3
    assert cell["bca"].mark == "✗↓"


def test_holm_vectorised_equals_stepdown(cov):
    from harness import stats

    p = np.random.default_rng(8).uniform(size=(4, 50)) ** 2
    adj = cov.holm_adjusted(p)
    for r in range(p.shape[1]):
        assert adj[:, r] == pytest.approx(stats.holm(list(p[:, r])).adjusted, rel=1e-12)


def test_cli_prints_the_tables(cov, capsys):
    assert cov.main(["--reps", "200", "--boot-reps", "3", "--ns", "3"]) == 0
    out = capsys.readouterr().out
    assert "## paired design" in out and "## unpaired design" in out
    assert "| paired t interval, 95 %" in out and "| Welch interval, 95 %" in out
    assert "Total time:" in out and "Misses:" in out
