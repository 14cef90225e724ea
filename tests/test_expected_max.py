"""Expected best vs tuning budget (issue 11, item 5): the estimators against brute-force enumeration,
the budget at which a distilled curve stays above, which trial rows feed a curve, and the figure of a
tiny hand-made store."""
import itertools
import math
import random
import statistics

import pytest

from harness.report import tuning
from harness.report.blocks import load_blocks
from harness.report.tuning import (expected_max, expected_max_curve, expected_max_with_replacement,
                                   smallest_budget_above, tuning_values)
from harness.store import ResultsStore


def brute_without(values, n):
    """Mean over all C(N, n) subsets (by position, so ties count as distinct trials) of their max."""
    return statistics.fmean(max(s) for s in itertools.combinations(values, n))


def brute_with(values, n):
    """Mean over all N^n sequences of draws with replacement of their max."""
    return statistics.fmean(max(s) for s in itertools.product(values, repeat=n))


def random_cases(count, max_n, seed=0):
    rng = random.Random(seed)
    for k in range(count):
        size = rng.randint(1, max_n)
        if k % 2:  # ties: few distinct values
            yield [rng.choice([0.1, 0.25, 0.25, 0.4]) for _ in range(size)]
        else:
            yield [rng.uniform(-1, 1) for _ in range(size)]


# ----------------------------------------------------------------------------------- estimators
@pytest.mark.parametrize("values", list(random_cases(40, 8)))
def test_without_replacement_equals_enumeration_of_subsets(values):
    for n in range(1, len(values) + 1):
        assert expected_max(values, n) == pytest.approx(brute_without(values, n), abs=1e-12)
    assert expected_max_curve(values) == pytest.approx([brute_without(values, n) for n in range(1, len(values) + 1)],
                                                       abs=1e-12)


@pytest.mark.parametrize("values", list(random_cases(20, 4, seed=1)))
def test_with_replacement_equals_enumeration_of_sequences(values):
    for n in range(1, 5):  # n may exceed N with replacement
        assert expected_max_with_replacement(values, n) == pytest.approx(brute_with(values, n), abs=1e-12)


def test_the_hand_computed_case():
    # sorted 1 2 3 4; n = 2: (1*0 + 2*1 + 3*2 + 4*3) / C(4, 2) = 20 / 6
    assert expected_max([3, 1, 4, 2], 2) == pytest.approx(20 / 6)
    # Dodge: 1*(1/16) + 2*(4/16 - 1/16) + 3*(9/16 - 4/16) + 4*(16/16 - 9/16) = 50 / 16
    assert expected_max_with_replacement([3, 1, 4, 2], 2) == pytest.approx(50 / 16)
    # the with-replacement estimate falls below the unbiased one as n approaches N
    assert expected_max_with_replacement([3, 1, 4, 2], 4) < expected_max([3, 1, 4, 2], 4) == 4


@pytest.mark.parametrize("values", list(random_cases(20, 12, seed=2)))
def test_curve_is_monotone_from_the_mean_to_the_max(values):
    curve = expected_max_curve(values)
    assert len(curve) == len(values)
    assert curve[0] == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert curve[-1] == max(values)
    assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
    dodge = [expected_max_with_replacement(values, n) for n in range(1, len(values) + 3)]
    assert all(b >= a - 1e-12 for a, b in zip(dodge, dodge[1:]))


def test_stable_for_a_hundred_trials():
    rng = random.Random(3)
    values = [rng.gauss(0.3, 0.05) for _ in range(120)]
    curve = expected_max_curve(values)
    assert all(math.isfinite(v) for v in curve)
    assert curve[0] == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert curve[-1] == pytest.approx(max(values), abs=1e-15)
    assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
    assert min(values) <= min(curve) and max(curve) <= max(values)


@pytest.mark.parametrize("call, message", [
    (lambda: expected_max([], 1), "empty"),
    (lambda: expected_max_curve([]), "empty"),
    (lambda: expected_max_with_replacement([], 1), "empty"),
    (lambda: expected_max([0.1, 0.2], 0), "1 <= n <= N = 2"),
    (lambda: expected_max([0.1, 0.2], 3), "1 <= n <= N = 2"),
    (lambda: expected_max([0.1, 0.2], 1.5), "integer"),
    (lambda: expected_max([0.1, 0.2], True), "integer"),
    (lambda: expected_max_with_replacement([0.1], 0), "n >= 1"),
    (lambda: expected_max([0.1, float("nan")], 1), "finite"),
    (lambda: expected_max_curve([0.1, float("inf")]), "finite"),
    (lambda: expected_max_with_replacement([float("-inf")], 1), "finite"),
    (lambda: expected_max([0.1, None], 1), "real numbers"),
    (lambda: smallest_budget_above([0.1, float("nan")], [0.1, 0.2]), "finite"),
])
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- smallest budget
@pytest.mark.parametrize("distilled, student, expected", [
    ([0.3, 0.4, 0.5], [0.1, 0.2, 0.3], 1),                 # above everywhere
    ([0.1, 0.2, 0.5, 0.6], [0.2, 0.3, 0.4, 0.5], 3),       # crosses once, stays above
    ([0.3, 0.1, 0.2, 0.6], [0.2, 0.3, 0.4, 0.5], 4),       # above, below, above: crossing twice
    ([0.3, 0.4, 0.2, 0.3], [0.2, 0.3, 0.4, 0.5], None),    # above, then below at the end: never
    ([0.1, 0.2, 0.3], [0.2, 0.3, 0.4], None),              # never above
    ([0.3, 0.3, 0.5], [0.1, 0.3, 0.4], 3),                 # a tie is not above
    ([0.3, 0.4, 0.5, 0.1, 0.1], [0.2, 0.3], 1),            # only the common n count
    ([0.3], [0.2, 0.4, 0.6], 1),
    ([], [0.2, 0.3], None),
])
def test_smallest_budget_above(distilled, student, expected):
    assert smallest_budget_above(distilled, student) == expected


# ------------------------------------------------------------------------------ trial rows
def _row(arm, stage, seed, miou, sweep, created, status="completed", kind="tpe", run_id=None, methods=None,
         teacher=None, budget="smoke", split="tune", protocol="default"):
    extra = {"stage_kind": kind} if kind is not None else {}
    return {"run_id": run_id, "created_at": created, "arm": arm, "methods": methods, "dataset": "synthetic",
            "student": "s", "teacher": teacher, "seed": seed, "split": split, "status": status, "stage": stage,
            "sweep_id": sweep, "final_miou": miou, "params_json": {}, "git_commit": "abc123",
            "config_json": {"budget": {"name": budget}, "sweep": {"protocol": protocol}}, "extra_json": extra}


def test_tuning_values_takes_the_trials_in_run_order_pruned_at_their_cut():
    rows = [
        _row("student-only", "lr_wd", 0, 0.30, "so", "2026-01-01T00:00:03", run_id="b"),
        _row("student-only", "lr_wd", 0, 0.10, "so", "2026-01-01T00:00:01", status="pruned", run_id="z"),
        _row("student-only", "lr_wd", 0, 0.20, "so", "2026-01-01T00:00:03", run_id="a"),  # same time: run id
        _row("student-only", "lr_wd", 0, 0.00, "so", "2026-01-01T00:00:04", status="failed", run_id="f"),
        _row("student-only", "lr_wd", 0, None, "so", "2026-01-01T00:00:05", status="pruned", run_id="p"),
        _row("student-only", "reruns", 1, 0.90, "so", "2026-01-01T00:00:06", kind="rerun", split="val", run_id="r"),
        # recorded before rows carried a stage kind: the default protocol's rerun stage decides
        _row("student-only", "reruns", 2, 0.91, "so", "2026-01-01T00:00:07", kind=None, split="val", run_id="s"),
        _row("student-only", "lr_wd", 0, 0.25, "so", "2026-01-01T00:00:02", kind=None, run_id="o"),
    ]
    t = tuning_values(rows)
    assert t.values == [0.10, 0.25, 0.20, 0.30]
    assert [r["run_id"] for r in t.rows] == ["z", "o", "a", "b"]
    assert (t.n, t.pruned, t.failed, t.lower_bound) == (4, 1, 1, True)
    assert any("1 failed" in n for n in t.notes) and any("1 pruned trial row(s) without a tune mIoU" in n
                                                         for n in t.notes)
    assert t.curve == pytest.approx(expected_max_curve([0.10, 0.25, 0.20, 0.30]))
    assert "lower bound" in t.describe()
    clean = tuning_values([r for r in rows if r["status"] == "completed"])
    assert not clean.lower_bound and clean.describe() == "3 trials"
    assert not any("failed" in n or "without a tune mIoU" in n for n in clean.notes)
    assert tuning_values([]).curve == []


# ---------------------------------------------------------------------------------- figure
@pytest.fixture
def tiny_store(tmp_path):
    """A student-only and a kd sweep by hand: tuning trials (one pruned, one failed) and reruns."""
    store = ResultsStore(f"sqlite:///{tmp_path / 'results' / 'harness.db'}")
    clock = iter(f"2026-01-01T00:{m:02d}:00" for m in range(60))
    so, kd = "student-only:s1", "distilled:kd:k1"
    for miou, status in ((0.20, "completed"), (0.05, "pruned"), (0.24, "completed"), (0.0, "failed")):
        store.append(_row("student-only", "lr_wd", 0, miou, so, next(clock), status=status))
    for stage, miou in (("lr_wd", 0.22), ("lr_wd", 0.26), ("temperature[method.kd.tau]", 0.27),
                        ("weights[method.kd.weight]", 0.21)):
        store.append(_row("distilled", stage, 0, miou, kd, next(clock), kind="tpe" if stage == "lr_wd" else "grid",
                          methods="kd", teacher="t"))
    for seed in (1, 2, 3):
        store.append(_row("student-only", "reruns", seed, 0.30 + seed / 100, so, next(clock), kind="rerun", split="val"))
        store.append(_row("distilled", "reruns", seed, 0.33 + seed / 100, kd, next(clock), kind="rerun", split="val",
                          methods="kd", teacher="t"))
    return store


def test_the_figure_is_written_for_a_tiny_store(tiny_store, tmp_path, monkeypatch):
    import matplotlib.image

    blocks = load_blocks(tiny_store)
    assert len(blocks) == 1
    by_arm = tuning.block_tuning(tiny_store, blocks[0])
    assert by_arm["student-only"].values == [0.20, 0.05, 0.24] and by_arm["student-only"].failed == 1
    assert by_arm["kd"].values == [0.22, 0.26, 0.27, 0.21] and not by_arm["kd"].lower_bound
    assert smallest_budget_above(by_arm["kd"].curve, by_arm["student-only"].curve) == 1

    footers = []
    save = tuning._save
    monkeypatch.setattr(tuning, "_save", lambda fig, path, lines: footers.append(lines) or save(fig, path, lines))
    out = tuning.expected_best_figures(tiny_store, blocks, tmp_path / "reports")
    [(path, text)] = out
    assert path.name == "tuning_synthetic_s_t_smoke.png" and path.is_file()
    assert matplotlib.image.imread(path).ndim == 3
    assert "kd above student-only from n = 1" in text
    footer = "\n".join(footers[0])
    assert "Tang et al. 2020" in footer and "1 failed trial(s) left out" in footer
    assert "7 trial row(s)" in footer and "<outside the repository>/harness.db" in footer
    assert str(tmp_path) not in footer


def test_report_figures_include_it_and_say_why_not(tiny_store, tmp_path):
    from harness.report.figures import write_figures

    cfg = {"paths": {"reports": str(tmp_path / "reports")}}
    outputs = write_figures(tiny_store, cfg, load_blocks(tiny_store))
    assert (tmp_path / "reports" / "tuning_synthetic_s_t_smoke.png").is_file()
    assert "tuning_synthetic_s_t_smoke.png" in (tmp_path / "reports" / "figures.md").read_text()
    assert any(p is not None and p.name.startswith("tuning_") for p, _ in outputs)

    empty = ResultsStore(tmp_path / "empty.db")
    [(path, why)] = tuning.expected_best_figures(empty, load_blocks(empty), tmp_path / "reports")
    assert path is None and "no completed rerun rows" in why
