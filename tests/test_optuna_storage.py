"""Tracking the usual viewers open (issue 13, items 2 and 3): a smoke sweep records one Optuna study per
(arm, stage unit) in `sweep.optuna_storage` (pruned trials with their intermediate values, no
duplicate on resume), every trial writes TensorBoard event files with its loss terms, the sweep prints
one progress line per trial, and `report` prints paths and one line per comparison, not the tables."""
import math
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import load_config
from harness.errors import ConfigError
from harness.store import ResultsStore

pytestmark = pytest.mark.slow


def protocol_file(tmp_path, stages, name="p"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "sampler_seed": 0, "tpe_startup_trials": 2,
                                    "asha": {"grace_period": 1, "reduction_factor": 2, "min_fraction": 0.5},
                                    "stages": stages}))
    return str(path)


def test_optuna_storage_setting_is_validated():
    cfg = load_config([])
    assert cfg["sweep"]["optuna_storage"] == "sqlite:///" + str(Path(cfg["paths"]["results"]) / "optuna.db")
    assert load_config(["sweep.optuna_storage=null"])["sweep"]["optuna_storage"] is None
    assert load_config(["sweep.optuna_storage=sqlite:////tmp/x.db"])["sweep"]["optuna_storage"] == "sqlite:////tmp/x.db"
    for bad in ("optuna.db", "sqlite://"):
        with pytest.raises(ConfigError, match="sweep.optuna_storage"):
            load_config([f"sweep.optuna_storage={bad}"])


@pytest.mark.timeout(600)
def test_sweep_records_optuna_studies_tensorboard_and_progress(ray_local, tiny, tmp_path, capsys):
    import optuna
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    protocol = protocol_file(tmp_path, [
        {"name": "lr_wd", "arms": ["student-only", "distilled"], "search": "tpe", "trials": 6,
         "early_stopping": "asha",
         "space": {"optim.lr": {"loguniform": [0.0001, 0.1]}, "optim.weight_decay": {"choice": [5.0e-5, 5.0e-4]}}},
        {"name": "reruns", "arms": ["student-only", "distilled"], "inherits": ["lr_wd"], "seeds": 1, "split": "val"},
    ])
    overrides = tiny("+method=kd", f"sweep.protocol={protocol}", "budget.sweep_max_trials=null",
                     "sweep.max_concurrent_trials=1", "report.measure=false", "report.after_sweep=false")
    assert main(["sweep", *overrides]) == 0
    out = capsys.readouterr().out
    cfg = load_config(overrides)
    url = cfg["sweep"]["optuna_storage"]
    assert url.endswith("/results/optuna.db") and Path(url.replace("sqlite:///", "")).is_file()
    rows = [r for r in ResultsStore(cfg["store"]["url"]).query() if r["stage"]]

    # one study per (arm, stage unit), named <arm id>/<stage>, holding every row once
    units = {(r["sweep_id"], r["stage"]) for r in rows}
    names = {s.study_name for s in optuna.get_all_study_summaries(storage=url)}
    assert names == {f"{arm_id}/{stage}" for arm_id, stage in units}

    def trials_by_run(study_name):
        study = optuna.load_study(study_name=study_name, storage=url)
        return {t.user_attrs["run_id"]: t for t in study.get_trials(deepcopy=False)}

    states = {"completed": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED,
              "failed": optuna.trial.TrialState.FAIL}
    recorded = {}
    for arm_id, stage in units:
        trials = trials_by_run(f"{arm_id}/{stage}")
        mine = [r for r in rows if (r["sweep_id"], r["stage"]) == (arm_id, stage)]
        assert set(trials) == {r["run_id"] for r in mine}
        for r in mine:
            t = trials[r["run_id"]]
            assert t.state == states[r["status"]] and t.user_attrs["status"] == r["status"]
            if r["status"] == "completed":
                assert math.isclose(t.value, r["final_miou"])
                assert t.intermediate_values and max(t.intermediate_values) == r["iterations"]
            if stage == "lr_wd":
                assert set(t.params) == {"optim.lr", "optim.weight_decay"}
                assert t.params["optim.lr"] == pytest.approx(r["params_json"]["optim.lr"])
        recorded.update(trials)
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert pruned, "ASHA pruned nothing: the test needs a pruned trial"
    for r in pruned:
        steps = recorded[r["run_id"]].intermediate_values
        assert steps and max(steps) == r["iterations"] and math.isclose(steps[r["iterations"]], r["final_miou"])
    assert {r["seed"] for r in rows if r["stage"] == "reruns"} == {1}
    assert all(recorded[r["run_id"]].params == {"seed": 1} for r in rows if r["stage"] == "reruns")

    # a progress line per finished trial: trial k/N, best so far, elapsed and ETAs
    progress = [l for l in out.splitlines() if l.startswith("  [lr_wd]") and " trial " in l]
    assert len(progress) == sum(r["stage"] == "lr_wd" for r in rows)
    assert any("trial 6/6" in l for l in progress)
    assert all("best " in l and "elapsed " in l and "ETA stage " in l and ", sweep ~" in l for l in progress)
    assert "optuna studies: sqlite:///" in out
    assert "lift at equal iterations" in out

    # TensorBoard: every trial's event files hold its loss terms
    from harness.engine.train import tensorboard_dir

    for r in rows:  # pruned ones included: their events end at the cut
        folder = tensorboard_dir(cfg, r["arm"], r["run_id"])
        assert list(folder.glob("events.out.tfevents.*")), f"no TensorBoard events for {r['run_id']} in {folder}"
        acc = EventAccumulator(str(folder))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert "loss/total" in tags and "loss/ce" in tags and "eval/miou" in tags
        if r["arm"] == "distilled":
            assert any(t.startswith("loss/kd") for t in tags)

    # resume: the same command again adds no trial to any study
    before = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage=url)}
    assert main(["sweep", *overrides]) == 0
    capsys.readouterr()
    after = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage=url)}
    assert after == before

    # report (as at the end of a sweep): paths and one line per comparison, not the tables
    assert main(["report", *[o for o in overrides if o.startswith(("paths.", "report.measure"))],
                 "budget=smoke"]) == 0
    text = capsys.readouterr().out
    print(text)
    assert len(text) < 5000 and "leaderboard.md" in text and "significance.md" in text and "energy.md" in text
    assert "kd: " in text and " lift " in text and "| " not in text


@pytest.mark.timeout(300)
def test_null_optuna_storage_writes_no_optuna_db(ray_local, tiny, tmp_path, capsys):
    protocol = protocol_file(tmp_path, [
        {"name": "lr", "arms": ["student-only", "distilled"], "search": "grid", "space": {"optim.lr": {"grid": [0.01]}}},
    ], name="q")
    overrides = tiny("+method=kd", f"sweep.protocol={protocol}", "sweep.optuna_storage=null", "report.after_sweep=false")
    assert main(["sweep", *overrides]) == 0
    assert "optuna studies" not in capsys.readouterr().out
    results = Path(load_config(overrides)["paths"]["results"])
    assert (results / "harness.db").is_file() and not list(results.rglob("optuna.db"))
