"""`reproduce <run-id>` of a run that did not finish (issue 14, item 7): a pruned sweep trial is
replayed on its own split to the iteration where it stopped and compared there; a row that cannot
be replayed says why (exit 2). The rows are written as the sweep's driver writes them for a pruned
trial (`runner`'s `_finish`: the trial's config, no history, the last reported mIoU)."""
import copy

import pytest

from harness.cli import main
from harness.config import load_config
from harness.engine.record import RunRecord, store_record
from harness.engine.train import run
from harness.reproduce import main as reproduce_main
from harness.store import ResultsStore


@pytest.fixture
def trial(tiny, tmp_path):
    """(overrides, the trial's config, the full run's history): a tune-split trial of 4 iterations,
    evaluated at 2 and 4, run to the end once to know what it reports at iteration 2."""
    overrides = tiny()
    cfg = load_config(overrides)
    cfg.update(eval_split="tune", progress=False, threads=1)  # what TrialSpec.config sets
    full = run(copy.deepcopy(cfg)).record
    assert [h["iteration"] for h in full.history_json] == [2, 4]
    return overrides, cfg, full.history_json


def store_pruned(cfg, run_id, iterations, miou, **values):
    values = {"status": "pruned", "failure_reason": "stopped by ASHA after 2 iterations", **values}
    record = RunRecord.of(cfg, run_id, "test", final_miou=miou, best_miou=miou, iterations=iterations,
                          sweep_id="arm", stage="lr_wd", trial_id=run_id, **values)
    store_record(cfg, record)
    return record


def test_a_pruned_trial_is_replayed_to_where_it_stopped_on_its_split(trial, capsys):
    overrides, cfg, history = trial
    store_pruned(cfg, "arm:lr_wd:t1", 2, history[0]["miou"])
    assert reproduce_main(["arm:lr_wd:t1", *overrides]) == 0
    out = capsys.readouterr().out
    assert "pruned at iteration 2 of 4" in out and "split tune" in out
    assert f"stored         tune mIoU at iteration 2 {100 * history[0]['miou']:.6f}" in out
    assert f"reproduced     tune mIoU at iteration 2 {100 * history[0]['miou']:.6f}" in out
    assert "identical      yes" in out


def test_a_pruned_trial_with_its_history_compares_the_history_too(trial, capsys):
    overrides, cfg, history = trial
    store_pruned(cfg, "arm:lr_wd:t2", 2, history[0]["miou"], history_json=history[:1])
    assert reproduce_main(["arm:lr_wd:t2", *overrides]) == 0
    assert "miou at stop, history match exactly" in capsys.readouterr().out


def test_a_different_stored_value_is_reported_as_a_mismatch(trial, capsys):
    overrides, cfg, history = trial
    store_pruned(cfg, "arm:lr_wd:t3", 2, history[0]["miou"] + 0.125)
    assert reproduce_main(["arm:lr_wd:t3", *overrides]) == 1
    assert "identical      no (miou_at_stop differ)" in capsys.readouterr().out


def test_rows_that_cannot_be_replayed_say_why(trial, capsys):
    overrides, cfg, history = trial
    store_pruned(cfg, "arm:lr_wd:t4", None, None, status="failed", failure_reason="RayTaskError: worker died")
    assert main(["reproduce", "arm:lr_wd:t4", *overrides]) == 2
    err = capsys.readouterr().err
    assert "cannot reproduce run arm:lr_wd:t4" in err and "before its first iteration" in err

    store_pruned(cfg, "arm:lr_wd:t5", 2, history[0]["miou"])
    ResultsStore(cfg["store"]["url"]).update("arm:lr_wd:t5", config_json=None)
    assert main(["reproduce", "arm:lr_wd:t5", *overrides]) == 2
    assert "no stored configuration" in capsys.readouterr().err
