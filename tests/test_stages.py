"""The reruns' stage features: the compute-matched control (iteration scaling from measured cost ratios)
and adaptive seeds (`seeds: auto`, a stopping rule on the paired interval's width), their protocol
validation, and one tiny sweep with both."""
import pytest
import yaml

from harness.config import load_config
from harness.errors import ConfigError
from harness.store import ResultsStore
from harness.sweep.budget import (auto_seeds_decision, auto_seeds_stop, control_plan, measured_cost_ratio,
                                  run_cost, scaled_budget, stands_for)
from harness.sweep.protocol import COMPUTE_MATCHED, load_protocol, parse_protocol

STUDENT = [0.30, 0.32, 0.28, 0.31, 0.29, 0.30, 0.33, 0.27, 0.30, 0.31]
DIFFS = [0.0, 0.04, -0.02, 0.012, 0.011, 0.01, 0.013, 0.009, 0.011, 0.01]
DISTILLED = [s + d for s, d in zip(STUDENT, DIFFS)]


# ------------------------------------------------------------------------ compute-matched scaling
def rerun(seconds, iterations, kwh=None):
    return {"train_time_s": seconds, "iterations": iterations, "energy_kwh": kwh}


def test_cost_ratio_is_measured_from_both_arms_reruns():
    distilled = [rerun(30.0, 600, 0.003), rerun(36.0, 600, 0.005)]   # 0.055 s/it, 0.004 kWh
    student = [rerun(12.0, 600, 0.002), rerun(10.0, 500, None)]      # 0.02 s/it, 0.002 kWh (one unmeasured)
    assert run_cost(distilled, "time") == pytest.approx(0.055)
    assert measured_cost_ratio(distilled, student, "time") == (pytest.approx(2.75), None)
    assert measured_cost_ratio(distilled, student, "energy") == (pytest.approx(2.0), None)
    ratio, why = measured_cost_ratio(distilled, [rerun(12.0, 600)], "energy")
    assert ratio is None and "no energy (kWh) recorded on the student-only reruns" in why


@pytest.mark.parametrize("iterations, every, ratio, expected", [
    (600, 200, 2.5, (1500, 500)),      # 3 evaluations, as the reruns
    (600, 200, 2.4717, (1483, 494)),   # round(600 x 2.4717) = 1483; 200 x 1483 / 600 = 494.3
    (12, 6, 0.7, (8, 4)),              # a distilled arm cheaper than the student: fewer iterations
    (4, 2, 2.38, (10, 5)),
    (4, 2, 0.01, (1, 1)),              # never below one iteration
])
def test_iterations_and_eval_interval_scale_by_the_measured_ratio(iterations, every, ratio, expected):
    assert scaled_budget(iterations, every, ratio) == expected


def test_two_measures_that_scale_to_the_same_budget_share_one_control():
    """On a CPU without energy counters the energy ratio is the time ratio to 0.1 % (1.934x vs 1.935x
    in the main job: both 1161 iterations): the same configuration, run once, stands for both."""
    measured = {"time": (1.9352, None), "energy": (1.9348, None)}   # both round to 1161 iterations
    time_, energy = control_plan(["time", "energy"], [], measured, 600, 200)
    assert (time_.iterations, time_.eval_interval, time_.shared_with, time_.also) == (1161, 387, None, ["energy"])
    assert (energy.iterations, energy.shared_with, energy.ratio) == (1161, "time", 1.9348)
    # 1.935 and 1.934 scale to 1161 and 1160 iterations: exact matching (the default) runs both ...
    measured = {"time": (1.935, None), "energy": (1.934, None)}
    time_, energy = control_plan(["time", "energy"], [], measured, 600, 200)
    assert (time_.iterations, energy.iterations, energy.shared_with) == (1161, 1160, None)
    # ... share_within 0.01 (the default protocol's) shares them, at the first measure's length
    time_, energy = control_plan(["time", "energy"], [], measured, 600, 200, share_within=0.01)
    assert (energy.shared_with, energy.iterations, energy.eval_interval, energy.ratio) == ("time", 1161, 387, 1.934)
    time_, energy = control_plan(["time", "energy"], [], {"time": (2.0, None), "energy": (2.03, None)}, 600, 200,
                                 share_within=0.01)
    assert energy.shared_with is None and energy.iterations == 1218          # 1.5 % apart: two controls
    # ratios that give different lengths run two controls
    time_, energy = control_plan(["time", "energy"], [], {"time": (2.0, None), "energy": (2.5, None)}, 600, 200)
    assert (time_.iterations, energy.iterations) == (1200, 1500) and not time_.also and energy.shared_with is None
    # an unmeasured energy is skipped with the reason, the time control runs alone
    time_, energy = control_plan(["time", "energy"], [], {"time": (2.0, None), "energy": (None, "no energy")}, 600, 200)
    assert energy.skipped == "no energy" and not time_.also


def test_a_resumed_control_keeps_what_its_stored_rows_say():
    measured = {"time": (1.935, None), "energy": (1.934, None)}
    # rows of a control that ran for both measures (this code): both keep their values, still shared
    both = {"measure": "time", "cost_ratio": 1.935, "iterations": 1161, "eval_interval": 387,
            "also_measures": {"energy": {"cost_ratio": 1.934, "iterations": 1161, "eval_interval": 387}}}
    time_, energy = control_plan(["time", "energy"], [both], measured, 600, 200)
    assert time_.kept and time_.also == ["energy"] and energy.kept and energy.shared_with == "time"
    assert stands_for(both, "energy") == (1.934, 1161, 387) and stands_for({"measure": "time"}, "energy") is None
    # rows stored separately per measure (older sweeps): each measure keeps its own, nothing shared
    old = [{"measure": "time", "cost_ratio": 1.935, "iterations": 1161, "eval_interval": 387},
           {"measure": "energy", "cost_ratio": 1.934, "iterations": 1161, "eval_interval": 387}]
    time_, energy = control_plan(["time", "energy"], old, measured, 600, 200)
    assert time_.kept and energy.kept and energy.shared_with is None and not time_.also
    # time kept from rows that do not list energy: energy is run on its own, never read into old rows
    time_, energy = control_plan(["time", "energy"], old[:1], measured, 600, 200, share_within=0.01)
    assert energy.shared_with is None and not energy.kept and energy.iterations == 1160
    # kept values win over a ratio measured again (a resumed sweep runs its missing seeds the same length)
    time_, = control_plan(["time"], [dict(old[0], cost_ratio=2.0, iterations=1200, eval_interval=400)], measured, 600, 200)
    assert (time_.ratio, time_.iterations, time_.eval_interval) == (2.0, 1200, 400)


def test_the_sweep_trains_a_shared_control_once_and_reports_it_for_both_measures(tmp_path, monkeypatch, capsys):
    """run_compute_matched with a time and an energy ratio 0.05 % apart: one unit of runs (the time
    control, its rows listing energy in also_measures), both measures in the sweep's result."""
    from types import SimpleNamespace

    from harness.sweep import runner

    # 600 iterations evaluated every 200, whatever the quick preset's length: 600 x 1.935 -> 1161
    cfg = load_config(["+method=kd", "budget.iterations=600", "budget.eval_interval=200", f"paths.results={tmp_path}"])
    stage = next(st for st in load_protocol("default").stages if st.search == COMPUTE_MATCHED)
    student = runner.Winner({"optim.lr": 0.02}, 0.3)
    sweep = SimpleNamespace(cfg=cfg, seeds={stage.matches: [1, 2]}, store=ResultsStore(tmp_path / "h.db"),
                            ids={"student-only": "student-only:S", "distilled": "distilled:kd:K"})
    d_rows = [{"train_time_s": 38.7, "iterations": 600, "energy_kwh": 0.0019348, "extra_json": {"device": "cpu"}}]
    s_rows = [{"train_time_s": 20.0, "iterations": 600, "energy_kwh": 0.001, "extra_json": {"device": "cpu"}}]
    monkeypatch.setattr(runner, "rerun_rows", lambda sw, st, arm, w, seeds: d_rows if arm == "distilled" else s_rows)
    units = []

    def unit_rows(sw, unit):
        units.append(unit)
        return [{"status": "completed", "final_miou": 0.35 + seed / 100, "seed": seed} for seed in (1, 2)]

    monkeypatch.setattr(runner, "unit_rows", unit_rows)
    out = runner.run_compute_matched(sweep, stage, {("student-only", stage.matches): student,
                                                    ("distilled", stage.matches): student}, {})
    assert len(units) == 1 and units[0].match == {"matched_to": "distilled:kd:K", "measure": "time"}
    assert units[0].base["budget"]["iterations"] == 1161
    assert units[0].extra["also_measures"] == {"energy": {"cost_ratio": pytest.approx(1.9348), "iterations": 1161,
                                                          "eval_interval": 387}}
    assert out["energy"]["by_seed"] == out["time"]["by_seed"] == {1: 0.36, 2: 0.37}
    assert out["energy"]["shared_with"] == "time" and out["energy"]["ratio"] == pytest.approx(1.9348)
    assert "the time control's runs stand for both; nothing trained again" in capsys.readouterr().out


# ------------------------------------------------------------------------------- adaptive seeds
def test_auto_seeds_stop_when_the_paired_halfwidth_reaches_the_target():
    # paired half-widths after 3..10 seeds: .0759 .0399 .0270 .0204 .0165 .0138 .0119 .0104
    assert auto_seeds_stop(DISTILLED, STUDENT, 0.02, 10) == (7, "halfwidth 0.0165 <= 0.02 after 7 seeds")
    assert auto_seeds_stop(DISTILLED, STUDENT, 0.01, 10) == (10, "max_seeds 10 reached (halfwidth 0.0104)")
    assert auto_seeds_stop(DISTILLED, STUDENT, 0.01, 6) == (6, "max_seeds 6 reached (halfwidth 0.0204)")
    # never before min_seeds, even when two seeds are already narrow
    steady = [s + 0.01 for s in STUDENT]
    assert auto_seeds_stop(steady, STUDENT, 0.01, 10)[0] == 3
    assert auto_seeds_stop(steady, STUDENT, 0.01, 10, min_seeds=5)[0] == 5


def test_auto_seeds_rule_reads_the_width_never_p_and_counts_failed_seeds_out_of_the_pairs():
    # a huge, clearly significant lift with a wide interval does not stop the rule
    noisy = [s + d for s, d in zip(STUDENT, [0.2, 0.3, 0.1, 0.25])]
    assert auto_seeds_decision(dict(enumerate(noisy, 1)), dict(enumerate(STUDENT[:4], 1)), 4, 0.01, 10) is None
    # seed 2 failed in the distilled arm: after 3 seeds only 2 pairs (< min_seeds 3), so a 4th seed runs
    d = [0.31, None, 0.291, 0.32]
    assert auto_seeds_stop(d, STUDENT, 0.01, 10) == (4, "halfwidth 0.0014 <= 0.01 after 4 seeds")


# --------------------------------------------------------------------------------- validation
BASE = [{"name": "lr", "arms": ["student-only", "distilled"], "search": "tpe", "trials": 2,
         "space": {"optim.lr": {"loguniform": [0.001, 0.1]}}}]


def reruns(**extra):
    return {"name": "reruns", "arms": ["student-only", "distilled"], "inherits": ["lr"], **extra}


@pytest.mark.parametrize("stages, message", [
    ([reruns(seeds="auto", max_seeds=5)], "seeds: auto needs target_halfwidth"),
    ([reruns(seeds="auto", target_halfwidth=1.5, max_seeds=5)], "mIoU fraction in (0, 1)"),
    ([reruns(seeds="auto", target_halfwidth=0.01)], "seeds: auto needs max_seeds"),
    ([reruns(seeds="auto", target_halfwidth=0.01, max_seeds=2)], "a whole number >= min_seeds (3)"),
    ([reruns(seeds="auto", target_halfwidth=0.01, max_seeds=5, min_seeds=1)], "min_seeds must be a whole number >= 2"),
    ([{**reruns(seeds="auto", target_halfwidth=0.01, max_seeds=5), "arms": ["distilled"]}],
     "seeds: auto reruns both arms on the same seeds"),
    ([reruns(seeds=5, target_halfwidth=0.01)], "target_halfwidth only go with seeds: auto"),
    ([reruns(seeds="some")], "seeds must be a positive integer or auto"),
    ([reruns(seeds=5), {"name": "cm", "search": COMPUTE_MATCHED}], "measures must be a non-empty list"),
    ([reruns(seeds=5), {"name": "cm", "search": COMPUTE_MATCHED, "measures": ["time", "flops"]}],
     "distinct cost measures among ['time', 'energy']"),
    ([reruns(seeds=5), {"name": "cm", "search": COMPUTE_MATCHED, "measures": ["time", "time"]}],
     "distinct cost measures"),
    ([{"name": "cm", "search": COMPUTE_MATCHED, "measures": ["time"]}, reruns(seeds=5)],
     "there is no earlier rerun stage"),
    ([reruns(seeds=5), {"name": "cm", "search": COMPUTE_MATCHED, "measures": ["time"], "matches": "lr"}],
     "'lr' is not an earlier rerun stage (earlier: reruns)"),
    ([reruns(seeds=5), {"name": "cm", "search": COMPUTE_MATCHED, "measures": ["time"], "arms": ["distilled"]}],
     "reruns the student-only arm only"),
    ([reruns(seeds=5), {"name": "cm", "search": COMPUTE_MATCHED, "measures": ["time"], "seeds": 3}],
     "unknown key 'seeds' for a compute_matched stage"),
    ([{**reruns(seeds=5), "arms": ["distilled"]}, {"name": "cm", "search": COMPUTE_MATCHED, "measures": ["time"]}],
     "must rerun both arms"),
    ([reruns(seeds=5), {"name": "cm", "search": COMPUTE_MATCHED, "measures": ["time"], "share_within": 0.5}],
     "share_within is the relative difference"),
    ([reruns(seeds=5), {"name": "cm", "search": COMPUTE_MATCHED, "measures": ["time"], "share_within": "1%"}],
     "share_within is the relative difference"),
])
def test_bad_stage_features_are_config_errors(stages, message):
    with pytest.raises(ConfigError) as info:
        parse_protocol({"name": "p", "stages": [*BASE, *stages]})
    assert message in str(info.value)


def test_good_stage_features_parse():
    p = parse_protocol({"name": "p", "stages": [*BASE, reruns(seeds="auto", target_halfwidth=0.01, max_seeds=8),
                                                {"name": "cm", "search": COMPUTE_MATCHED, "measures": ["energy"]}]})
    auto, cm = p.stages[1], p.stages[2]
    assert auto.auto_seeds and auto.split == "val" and auto.seeds_rule == {
        "rule": "auto", "target_halfwidth": 0.01, "max_seeds": 8, "min_seeds": 3}
    assert (cm.arms, cm.matches, cm.split, cm.measures, cm.is_search) == (["student-only"], "reruns", "val",
                                                                          ["energy"], False)
    default = load_protocol("default")
    assert [(s.name, s.search, s.measures) for s in default.stages][-1] == ("compute_matched", COMPUTE_MATCHED,
                                                                             ["time", "energy"])


def test_the_compute_matched_stage_changes_no_arm_id(tmp_path):
    from harness.sweep.runner import arm_ids

    cfg = load_config(["+method=kd", f"paths.results={tmp_path}"])
    stages = [*BASE, reruns(seeds=2)]
    plain = arm_ids(cfg, parse_protocol({"name": "p", "stages": stages}))
    matched = arm_ids(cfg, parse_protocol({"name": "p", "stages": [
        *stages, {"name": "cm", "search": COMPUTE_MATCHED, "measures": ["time"]}]}))
    assert plain == matched


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_sweep_with_auto_seeds_and_the_compute_matched_control(tmp_path, tiny, capsys):
    from harness.cli import main

    protocol = tmp_path / "p.yaml"
    protocol.write_text(yaml.safe_dump({"name": "p", "sampler_seed": 0, "stages": [
        {**BASE[0], "trials": 1, "grow": True},
        reruns(seeds="auto", target_halfwidth=0.0001, max_seeds=3, min_seeds=2),
        {"name": "cm", "search": COMPUTE_MATCHED, "measures": ["time", "energy"]}]}))
    overrides = tiny("+method=kd", f"sweep.protocol={protocol}", "budget.sweep_rerun_seeds=3")
    assert main(["sweep", *overrides, "report.after_sweep=false"]) == 0
    out = capsys.readouterr().out
    db = ResultsStore(load_config(overrides)["store"]["url"]).query()
    reruns_ = [r for r in db if r["stage"] == "reruns"]
    assert sorted((r["arm"], r["seed"]) for r in reruns_) == sorted(
        (a, s) for a in ("student-only", "distilled") for s in (1, 2, 3))   # same seeds, both arms
    rules = {str(r["extra_json"]["seeds_rule"]["stopped"]) for r in reruns_}
    assert len(rules) == 1 and rules.pop().startswith("max_seeds 3 reached (halfwidth")
    assert "seeds: auto stopped: max_seeds 3 reached" in out
    matched = [r for r in db if r["stage"] == "cm"]
    distilled_id = next(r["sweep_id"] for r in reruns_ if r["arm"] == "distilled")
    student_id = next(r["sweep_id"] for r in reruns_ if r["arm"] == "student-only")
    assert sorted(r["seed"] for r in matched) == [1, 2, 3]
    for r in matched:
        e = r["extra_json"]
        assert (r["arm"], r["sweep_id"], r["split"], e["stage_kind"], e["matched_to"], e["measure"]) == (
            "student-only", student_id, "val", "compute_matched", distilled_id, "time")
        assert e["iterations"] == r["iterations"] == max(1, round(4 * e["cost_ratio"]))
        assert e["device"] == "cpu" and e["winner_run_id"]
    assert "energy: skipped: no energy (kWh) recorded" in out   # energy.enabled=false in tiny sweeps
    assert "lift at equal iterations:" in out and "lift at equal compute (time: cost ratio" in out

    # resume: nothing runs again, the kept rows keep their ratio
    assert main(["sweep", *overrides, "report.after_sweep=false"]) == 0
    out = capsys.readouterr().out
    assert len(ResultsStore(load_config(overrides)["store"]["url"]).query()) == len(db)
    assert "cost ratio" in out and "kept from the 3 row(s) already stored" in out

    assert main(["leaderboard", *overrides]) == 0
    board = (tmp_path / "results" / "leaderboard.md").read_text()
    assert "Lift at equal compute" in board and "seeds: max_seeds 3 reached" in board
    line = next(l for l in board.splitlines() if l.startswith("| kd") and "x, " in l)
    assert "(stage not run)" in line   # energy: not run; time: its lift and ratio
