"""Phase 2 of benchmarks/fidelity_bias.py on synthetic histories: the offline replay of the sweep's
GuardedASHA prunes a late-blooming full-fidelity winner when the order lets it, and cannot prune a
winner that leads at every evaluation, nor anything when the guard or the first cut forbids it."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
spec = importlib.util.spec_from_file_location("fidelity_bias", Path(__file__).resolve().parents[1] / "benchmarks"
                                              / "fidelity_bias.py")
fb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fb)

# tune mIoU at evaluations 1..3 (the quick budget: 200, 400, 600 iterations)
LEADER, RUNNER_UP, LATE, FLAT = [0.50, 0.55, 0.60], [0.45, 0.50, 0.55], [0.10, 0.30, 0.70], [0.30, 0.30, 0.30]


def test_a_late_bloomer_is_pruned_when_it_arrives_after_the_leaders():
    out = fb.replay_order([LEADER, RUNNER_UP, LATE, FLAT], first_cut=1, reduction_factor=2, min_completed=2,
                          concurrency=1, rng=np.random.default_rng(0), order=[0, 1, 2, 3])
    # 0 sets the bar at the first rung; 1 and 2 fall below it and use up the allowance (4 - 2); 3 is spared
    assert out["status"] == ["completed", "pruned", "pruned", "completed"]
    assert out["ended_at"][2] == 1
    # arriving first it cannot be pruned (nothing recorded at the rung yet)
    out = fb.replay_order([LEADER, RUNNER_UP, LATE, FLAT], first_cut=1, reduction_factor=2, min_completed=2,
                          concurrency=1, rng=np.random.default_rng(0), order=[2, 0, 1, 3])
    assert out["status"][2] == "completed"
    # over random orders: the winner (LATE) is pruned in some, and then the chosen one loses 10 points
    res = fb.arm_outcomes([LEADER, RUNNER_UP, LATE, FLAT], [True] * 4, first_cut=1, reduction_factor=2,
                          min_completed=2, concurrency=2, orders=60, seed=0)
    assert 0 < res["pruned_winner"].mean() < 1
    assert set(np.round(res["loss"][res["pruned_winner"] == 1], 6)) == {10.0}
    assert (res["loss"][res["pruned_winner"] == 0] == 0).all()


def test_a_winner_that_leads_at_every_evaluation_is_never_pruned():
    res = fb.arm_outcomes([LEADER, RUNNER_UP, FLAT, [0.2, 0.25, 0.28]], [True] * 4, first_cut=1, reduction_factor=2,
                          min_completed=2, concurrency=2, orders=40, seed=1)
    assert res["pruned_winner"].sum() == 0 and (res["loss"] == 0).all()


def test_no_pruning_without_a_first_cut_or_without_allowance():
    hists = [LEADER, RUNNER_UP, LATE, FLAT]
    for cut, min_completed in ((None, 2), (1, 4)):   # min_fraction past the last cut; min_completed = all
        res = fb.arm_outcomes(hists, [True] * 4, first_cut=cut, reduction_factor=2, min_completed=min_completed,
                              concurrency=2, orders=20, seed=2)
        assert res["pruned_winner"].sum() == 0 and (res["loss"] == 0).all()


def test_a_collapsed_trial_fails_and_never_wins():
    assert fb.collapse_evaluation([0.5, 0.1, 0.1], 0.5) == 3
    assert fb.collapse_evaluation([0.5, 0.1, 0.5], 0.5) is None
    out = fb.replay_order([LEADER, [0.9, 0.1, 0.1]], first_cut=None, reduction_factor=2, min_completed=2,
                          concurrency=2, rng=np.random.default_rng(0), failed_at=[None, 3])
    assert out["status"] == ["completed", "failed"]


def test_summary_bias_is_distilled_minus_student_paired():
    table = [{"min_fraction": 0.5, "min_completed": None, "reduction_factor": 2, "min_completed_n": 3,
              "first_cut_iteration": 400,
              "arms": {"student-only": {"pruned_winner": np.array([0., 1.]), "loss": np.array([0., 2.])},
                       "kd": {"pruned_winner": np.array([1., 1.]), "loss": np.array([1., 3.])}}}]
    s = fb.summarise(table)[0]
    assert s["arms"]["kd"]["bias"] == pytest.approx(1.0) and s["arms"]["kd"]["bias_se"] == pytest.approx(0.0)
    assert s["arms"]["student-only"]["loss"] == pytest.approx(1.0) and s["reaches_target"] is False
    assert "| 2 | 0.5 | 400 | half (= 3) |" in fb.markdown([s])


def test_grid_points_cover_the_space():
    pts = fb.grid_points({"optim.lr": {"loguniform": [0.002, 0.1]},
                          "optim.weight_decay": {"choice": [5e-6, 5e-5, 5e-4]}}, 6)
    assert pts[0]["optim.lr"] == 0.002 and pts[-1]["optim.lr"] == 0.1
    assert [p["optim.weight_decay"] for p in pts] == [5e-6, 5e-5, 5e-4] * 2


def test_phase1_writes_an_ignored_cache_started_from_the_shipped_histories(tmp_path):
    import json
    import subprocess

    root = Path(fb.ROOT)
    path, shipped = fb.cache_paths("quick", None)
    assert shipped == root / "benchmarks" / "data" / "fidelity_bias_quick.json"
    assert path.resolve().is_relative_to((root / "results").resolve())
    # where it writes is ignored by git; the shipped file is tracked and never the write target
    assert subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=root).returncode == 0
    assert path != shipped
    # a cache that does not exist yet starts from the shipped histories; an existing one wins
    ship = tmp_path / "shipped.json"
    ship.write_text(json.dumps({"budget": "quick", "runs": {"a": 1}}))
    assert fb.load_cache(tmp_path / "none.json", ship)["runs"] == {"a": 1}
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"budget": "quick", "runs": {"b": 2}}))
    assert fb.load_cache(own, ship)["runs"] == {"b": 2}
    assert fb.load_cache(tmp_path / "none.json", None) == {"runs": {}}
    # --cache given: that file only, nothing shipped mixed in
    assert fb.cache_paths("quick", str(own)) == (own, None)


def test_histories_of_another_budget_preset_are_stale_and_the_shipped_ones_are_current():
    import json

    current = fb.budget_settings("quick")
    point = {"optim.lr": 0.01, "optim.weight_decay": 5e-5}
    row = {"history": [{"iteration": 100, "miou": 0.2}], "status": "completed"}
    older = dict(row, budget_settings={**current, "iterations": current["iterations"] + 200})
    cache = {"budget": "quick", "runs": {fb.key_of("kd", point): older, fb.key_of("cwd", point): dict(row),
                                         fb.key_of("student-only", point): dict(row, budget_settings=current)}}
    # a longer preset's history, or one that does not say its preset, is never replayed
    assert fb.trials_of(cache, "kd", [point]) == [] and fb.trials_of(cache, "cwd", [point]) == []
    assert fb.trials_of(cache, "student-only", [point]) == [cache["runs"][fb.key_of("student-only", point)]]
    # the shipped histories were measured with today's preset: phase 2 replays every one of them
    shipped = json.loads((Path(fb.ROOT) / "benchmarks" / "data" / "fidelity_bias_quick.json").read_text())
    assert shipped["runs"] and all(fb.is_current(r, current) for r in shipped["runs"].values())
    assert all(len(r["history"]) == current["iterations"] // current["eval_interval"] for r in shipped["runs"].values())
