"""Budget parity and early stopping that cannot starve an arm: pure functions (harness.sweep.budget),
the guarded ASHA scheduler driven with fake results (no training), the first cut, protocol keys."""
from types import SimpleNamespace

import pytest
import yaml

from harness.config import load_config
from harness.errors import ConfigError
from harness.sweep.budget import (Budget, arm_budget, growth_step, parity_prefix, rank_agreement, row_iterations,
                                  student_prefix, student_reruns_for, unequal, winner)
from harness.sweep.protocol import load_protocol, parse_protocol


def row(i, status="completed", iterations=12, miou=0.5, kwh=0.001, stage="lr_wd", history=None, **extra):
    return {"run_id": f"r{i:02d}", "created_at": f"2026-01-01T00:00:{i:02d}", "status": status, "stage": stage,
            "iterations": iterations, "final_miou": miou, "energy_kwh": kwh, "history_json": history,
            "params_json": {"optim.lr": 0.01 * (i + 1)}, "extra_json": extra or None}


# ------------------------------------------------------------------------------ counting
def test_arm_budget_counts_trials_iterations_and_kwh_none_safe():
    rows = [row(0), row(1, "pruned", iterations=6, kwh=None), row(2, "failed", iterations=3),
            row(3, "pruned", iterations=None, kwh=None, history=[{"iteration": 6, "miou": 0.1}])]
    b = arm_budget(rows)
    assert (b.started, b.completed, b.pruned, b.failed) == (4, 1, 2, 1)
    assert b.iterations == 12 + 6 + 3 + 6            # a pruned trial counts what it ran
    assert b.kwh == pytest.approx(0.002) and b.kwh_missing == 2
    assert row_iterations({"iterations": None, "history_json": None}) == 0
    assert Budget.from_dict(b.as_dict()) == b
    assert "4 trials started (1 completed, 2 pruned, 1 failed), 27 iterations" in b.text()


def test_budget_equality_per_comparison():
    """Each comparison's student prefix is the smallest that reaches its distilled arm in trials and
    iterations; a larger composition needs a longer prefix of the same sequence, an earlier one's
    prefix and winner are unchanged by the growth."""
    sequence = [row(i, "pruned" if i % 3 == 1 else "completed", iterations=6 if i % 3 == 1 else 12,
                    miou=0.3 + 0.01 * (i % 5)) for i in range(30)]
    kd = arm_budget([row(100 + i) for i in range(13)])                  # 13 trials, 156 iterations
    n_kd = parity_prefix(sequence, kd, start=6)
    mine = arm_budget(student_prefix(sequence, n_kd))
    assert unequal(mine, kd) is None and mine.started >= kd.started and mine.iterations >= kd.iterations
    assert mine.iterations - kd.iterations < 12                         # within one trial's length
    assert unequal(arm_budget(student_prefix(sequence, n_kd - 1)), kd) is not None   # the smallest
    both = arm_budget([row(100 + i) for i in range(21)])
    n_both = parity_prefix(sequence, both, start=6)
    assert n_both > n_kd
    assert student_prefix(sequence, n_both)[:n_kd] == student_prefix(sequence, n_kd)   # a prefix
    assert winner(student_prefix(sequence[:n_kd] + [row(99, miou=0.99)], n_kd)) == winner(sequence[:n_kd])
    assert parity_prefix(sequence[:5], both, start=1) is None                          # must grow
    # stored order, not list order
    assert student_prefix(list(reversed(sequence)), 3) == sequence[:3]
    # other search stages of the student arm are counted whole, the growing stage by prefix
    mixed = sequence[:4] + [row(50, stage="batch"), row(51, stage="batch")]
    assert [r["run_id"] for r in student_prefix(mixed, 2, stage="lr_wd")] == ["r00", "r01", "r50", "r51"]


def test_growth_step_asks_for_what_is_missing_at_least_one():
    d = Budget(started=13, iterations=13 * 12)
    assert growth_step(Budget(started=6, iterations=72), d, 12) == 7
    assert growth_step(Budget(started=13, iterations=100), d, 12) == 5     # ceil(56 / 12)
    assert growth_step(Budget(started=13, iterations=156), d, 12) == 1


def test_unequal_budget_mark_names_both_numbers():
    s, d = Budget(started=6, iterations=3600), Budget(started=13, iterations=7800)
    mark = unequal(s, d)
    assert mark.startswith("unequal tuning budget") and "6 trials" in mark and "7800 iterations" in mark
    assert unequal(d, d) is None
    assert unequal(Budget(started=13, iterations=7000), d) is not None    # fewer iterations is enough
    assert unequal(Budget(started=20, iterations=9000), d) is None        # more is conservative


def test_student_reruns_are_found_by_the_winner_they_belong_to():
    d = {"extra_json": {"student_arm": {"winner_run_id": "w2", "trials": 13}}}
    reruns = [{"run_id": "a", "extra_json": {"winner_run_id": "w1", "tuned_trials": 6}},
              {"run_id": "b", "extra_json": {"winner_run_id": "w2", "tuned_trials": 13}},
              {"run_id": "c", "extra_json": None}]
    assert [r["run_id"] for r in student_reruns_for(d, reruns)] == ["b"]
    assert [r["run_id"] for r in student_reruns_for({"extra_json": {}}, reruns)] == ["c"]   # old rows


def test_rank_agreement_needs_three_completed_trials():
    def r(i, first, final, status="completed"):
        return row(i, status, miou=final, history=[{"iteration": 6, "miou": first}, {"iteration": 12, "miou": final}])

    same = rank_agreement([r(0, 0.1, 0.2), r(1, 0.2, 0.3), r(2, 0.3, 0.4), r(3, 0.0, 0.1, "pruned")], 6)
    assert same["rho"] == pytest.approx(1.0) and same["n"] == 3
    swapped = rank_agreement([r(0, 0.3, 0.2), r(1, 0.2, 0.3), r(2, 0.1, 0.4)], 6)
    assert swapped["rho"] == pytest.approx(-1.0)
    few = rank_agreement([r(0, 0.1, 0.2), r(1, 0.2, 0.3)], 6)
    assert few["rho"] is None and "< 3" in few["reason"]
    assert rank_agreement([r(0, 0.1, 0.2)], None)["reason"].startswith("no evaluation before the end")


# ------------------------------------------------------------------------------ early stopping
def fake_trials(n):
    return [SimpleNamespace(trial_id=f"t{i}") for i in range(n)]


def drive(scheduler, trials, results):
    """Feed (trial index, evaluation, miou) results; returns the trials stopped."""
    from ray.tune.schedulers import TrialScheduler

    for t in trials:
        scheduler.on_trial_add(None, t)
    stopped = set()
    for i, evaluation, miou in results:
        if i in stopped:
            continue
        action = scheduler.on_trial_result(None, trials[i], {"training_iteration": evaluation, "miou": miou,
                                                             "failed": ""})
        if action == TrialScheduler.STOP:
            stopped.add(i)
    return stopped


def adversarial(n, evaluations=4):
    """Each trial, one after the other, is worse at every evaluation than every trial before it: plain
    ASHA stops every one after the first."""
    return [(i, e, 0.9 - 0.1 * i + 0.01 * e) for i in range(n) for e in range(1, evaluations + 1)]


def test_min_completed_is_honoured_with_an_adversarial_metric_sequence():
    from ray.tune.schedulers import AsyncHyperBandScheduler

    from harness.sweep.runner import GuardedASHA

    plain = AsyncHyperBandScheduler(time_attr="training_iteration", metric="miou", mode="max", max_t=4,
                                    grace_period=1, reduction_factor=2, stop_last_trials=False)
    assert len(drive(plain, fake_trials(6), adversarial(6))) == 5       # the starvation this prevents
    guarded = GuardedASHA(max_t=4, first_cut=1, reduction_factor=2, trials=6, min_completed=3)
    stopped = drive(guarded, fake_trials(6), adversarial(6))
    assert len(stopped) == 3 and 6 - len(stopped) >= 3 and guarded.spared > 0
    # a failed trial uses up the allowance: 2 pruned, not 3
    guarded = GuardedASHA(max_t=4, first_cut=1, reduction_factor=2, trials=6, min_completed=3, failed=1)
    assert len(drive(guarded, fake_trials(6), adversarial(6))) == 2
    # stored rows of the stage (resume, growth) count too
    guarded = GuardedASHA(max_t=4, first_cut=1, reduction_factor=2, trials=6, min_completed=3, pruned=3)
    assert drive(guarded, fake_trials(3), adversarial(3)) == set()


def test_no_trial_is_stopped_before_the_first_cut_or_at_its_last_evaluation():
    from harness.sweep.runner import GuardedASHA

    guarded = GuardedASHA(max_t=4, first_cut=2, reduction_factor=2, trials=20, min_completed=1)
    trials = fake_trials(6)
    results = [(i, e, 0.9 - 0.1 * i) for i in range(6) for e in (1, 2, 3, 4)]
    stopped_at = {}
    from ray.tune.schedulers import TrialScheduler

    for t in trials:
        guarded.on_trial_add(None, t)
    for i, e, m in results:
        if i in stopped_at:
            continue
        if guarded.on_trial_result(None, trials[i], {"training_iteration": e, "miou": m}) == TrialScheduler.STOP:
            stopped_at[i] = e
    assert stopped_at and min(stopped_at.values()) >= 2 and max(stopped_at.values()) < 4


def test_the_first_cut_waits_for_min_fraction_and_every_warmup(tmp_path):
    from harness.sweep.runner import first_cut

    protocol = load_protocol("default")
    length = ["budget.iterations=600", "budget.eval_interval=200"]   # independent of the preset's length
    cfg = load_config(["+method=heteroakd", *length, f"paths.results={tmp_path}"], check_data=False)
    assert first_cut(cfg, protocol, "student-only") == {"evaluation": 2, "iteration": 400}   # 0.5 x 600 -> 400
    quick = load_config(["+method=heteroakd", f"paths.results={tmp_path}"], check_data=False)
    assert first_cut(quick, protocol, "student-only") == {"evaluation": 2, "iteration": 200}  # quick: 400, every 100
    early = parse_protocol({**protocol.raw, "asha": {"min_fraction": 0.0}})
    assert first_cut(cfg, early, "student-only") == {"evaluation": 1, "iteration": 200}
    long_warmup = load_config(["+method=heteroakd", "method.heteroakd.warmup_fraction=0.4", *length,
                               f"paths.results={tmp_path}"], check_data=False)
    assert first_cut(long_warmup, early, "distilled") == {"evaluation": 2, "iteration": 400}  # after 240
    at_400 = load_config(["+method=heteroakd", "method.heteroakd.warmup_fraction=0.6666", *length,
                          f"paths.results={tmp_path}"], check_data=False)
    assert first_cut(at_400, early, "distilled") is None    # warm-up ends at 400: no evaluation after it but the end


# ------------------------------------------------------------------------------ protocol keys
def stages(**lr_wd):
    return [{"name": "lr_wd", "arms": ["student-only", "distilled"], "search": "tpe", "trials": 4,
             "space": {"optim.lr": {"loguniform": [0.001, 0.1]}}, **lr_wd},
            {"name": "t", "arms": ["distilled"], "inherits": ["lr_wd"], "search": "grid",
             "space": {"$temperatures": {"grid": [1, 2]}}},
            {"name": "reruns", "arms": ["student-only", "distilled"], "inherits": ["lr_wd", "t"], "seeds": 2}]


@pytest.mark.parametrize("raw, message", [
    ({"asha": {"min_fractoin": 0.5}}, "Did you mean 'min_fraction'"),
    ({"asha": {"min_fraction": 1.5}}, "min_fraction must be a fraction of training in [0, 1]"),
    ({"asha": {"min_completed": 0}}, "min_completed must be a whole number of trials >= 1, or null"),
    ({"asha": {"reduction_factor": 1}}, "reduction_factor must be a number > 1"),
    ({"asha": {"grace_period": 0.5}}, "grace_period must be a whole number"),
    ({"stages": [*stages()[:1], {**stages()[1], "early_stopping": "asha"}, stages()[2]]},
     "a grid stage runs at full fidelity"),
    ({"stages": [*stages()[:1], {**stages()[1], "full_fidelity": False}, stages()[2]]},
     "full_fidelity only qualifies early_stopping: asha"),
    ({"stages": stages(early_stopping="asha", full_fidelity=True)}, "contradicts itself"),
    ({"stages": stages(grow="yes")}, "grow must be true or false"),
    ({"stages": [*stages()[:2], {**stages()[2], "grow": True}]}, "grows nothing; remove grow"),
    ({"stages": [stages()[0], {**stages()[1], "grow": True}, stages()[2]]}, "grow: true needs a tpe stage of the "
                                                                            "student-only arm"),
    ({"stages": [stages(grow=True)[0], {**stages()[0], "name": "again", "arms": ["student-only"]}, *stages()[1:]]},
     "must be on the student-only arm's last search stage"),
    ({"stages": [*stages(), {**stages()[1], "name": "late", "inherits": ["reruns"]}]}, "inherits from the rerun"),
])
def test_protocol_keys_are_validated_with_clear_errors(raw, message):
    with pytest.raises(ConfigError) as info:
        parse_protocol({"name": "p", "stages": stages(), **raw})
    assert message in str(info.value)


def test_the_default_protocol_states_the_rule():
    protocol = load_protocol("default")
    assert protocol.asha == {"grace_period": 1, "reduction_factor": 2, "min_fraction": 0.5, "min_completed": None}
    assert protocol.grow_stage.name == "lr_wd"
    assert [s.name for s in protocol.stages if s.prunes] == ["lr_wd"]      # grids at full fidelity
    assert [protocol.min_completed(n) for n in (2, 4, 6, 13)] == [2, 3, 3, 7]
    pruned_grid = parse_protocol({"name": "p", "stages": [stages()[0], {**stages()[1], "early_stopping": "asha",
                                                                         "full_fidelity": False}, stages()[2]]})
    assert pruned_grid.stages[1].prunes and parse_protocol({"name": "p", "stages": stages(), "asha": {
        "min_completed": 5}}).min_completed(4) == 4
