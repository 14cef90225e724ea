"""The sweep's collapse rule: a persistent drop below a fraction of the best ends a trial; noise does not."""
from harness.sweep.trial import CollapseRule


def run(rule, values, every=2):
    out = []
    for i, v in enumerate(values, start=1):
        reason = rule(i * every, v)
        out.append(reason)
        if reason:
            break
    return out


def test_one_low_evaluation_is_noise_not_a_collapse():
    # the smoke-budget trace that ended a healthy trial as "failed": 8.66 -> 4.29 -> recovers
    assert run(CollapseRule(0.5), [0.0866, 0.0429, 0.0912, 0.0950]) == [None] * 4


def test_two_low_evaluations_in_a_row_collapse_and_say_since_when():
    reasons = run(CollapseRule(0.5), [0.30, 0.40, 0.05, 0.04, 0.5])
    assert reasons[:3] == [None, None, None] and len(reasons) == 4
    assert reasons[-1].startswith("tune mIoU collapsed from 0.4000 to 0.0400")
    assert "since iteration 6, 2 evaluations in a row) at iteration 8" in reasons[-1]


def test_a_recovery_resets_the_count_and_low_models_never_collapse():
    assert run(CollapseRule(0.5), [0.40, 0.10, 0.39, 0.10, 0.38]) == [None] * 5
    assert run(CollapseRule(0.5), [0.04, 0.01, 0.005, 0.001]) == [None] * 4   # never above 5 %
    assert run(CollapseRule(0.5, patience=1), [0.40, 0.10])[-1] is not None
