"""Checkpoints, resume inside a run, TensorBoard events, progress lines (issue 13 items 2-4)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config import PROJECT_ROOT, load_config
from harness.engine.checkpoint import final_path, run_dir
from harness.engine.record import store_record
from harness.engine.train import run, tensorboard_dir
from harness.errors import ConfigError
from harness.reproduce import main as reproduce_main
from harness.store import ResultsStore

LONGER = ("budget.iterations=6", "budget.eval_interval=2")


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def same_weights(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def interrupt_at(iteration):
    def callback(it, metrics):
        if it == iteration:
            raise KeyboardInterrupt
    return callback


@pytest.mark.parametrize("extra", [(), ("+method=skd", "budget.teacher_iterations=2")], ids=["student", "skd"])
def test_an_interrupted_run_resumes_to_the_same_metrics_and_weights(tiny, tmp_path, extra):
    """Stopped at iteration 4 with a state saved at 3 (every=3): the run started again replays 4..6 and
    ends bit-identical to an uninterrupted run (history, per-class IoU, final weights); skd adds a
    discriminator with its own optimiser and the methods' generator."""
    from harness.engine.teacher import teacher_for

    base = load_config(tiny(*LONGER, *extra, "checkpoint.every=3", f"paths.results={tmp_path / 'a'}"))
    teacher = teacher_for(base)
    whole = run(base, teacher=teacher).record

    cfg = load_config(tiny(*LONGER, *extra, "checkpoint.every=3", f"paths.results={tmp_path / 'b'}"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, teacher=teacher, callback=interrupt_at(4))
    [meta] = (tmp_path / "b" / "checkpoints").glob("*/last.json")
    saved = json.loads(meta.read_text())
    assert saved["iteration"] == 3

    resumed = run(cfg, teacher=teacher).record
    assert resumed.run_id == saved["run_id"] and resumed.extra_json["resumed_at_iteration"] == 3
    assert resumed.iterations == 6 and resumed.status == "completed"
    assert resumed.history_json == whole.history_json and resumed.per_class_iou_json == whole.per_class_iou_json
    assert resumed.final_miou == whole.final_miou
    assert same_weights(weights(final_path(cfg, resumed.run_id)), weights(final_path(base, whole.run_id)))
    assert not list(run_dir(cfg, resumed.run_id).glob("last.*")), "a finished run leaves no state to resume"
    again = run(cfg, teacher=teacher).record  # the same command once more: a new run, not a resume
    assert again.run_id != resumed.run_id and "resumed_at_iteration" not in again.extra_json


def test_an_unreadable_state_is_ignored_with_a_warning(tiny, tmp_path, capsys):
    cfg = load_config(tiny(f"paths.results={tmp_path / 'r'}", "checkpoint.every=2"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, callback=interrupt_at(4))
    [meta] = (tmp_path / "r" / "checkpoints").glob("*/last.json")
    (meta.parent / "last.pt").write_bytes(b"not a checkpoint")
    record = run(cfg).record
    assert record.status == "completed" and "resumed_at_iteration" not in record.extra_json
    assert "cannot be read" in capsys.readouterr().err
    reference = run(load_config(tiny(f"paths.results={tmp_path / 's'}"))).record
    assert record.history_json == reference.history_json


def test_tensorboard_holds_every_loss_term_lr_and_each_evaluation(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(tiny(f"paths.results={tmp_path / 'r'}", "tensorboard=true"))
    record = run(cfg, label="mine").record
    folder = tensorboard_dir(cfg, "mine", record.run_id)
    acc = EventAccumulator(str(folder))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/ce", "loss/aux", "loss/total", "lr", "eval/miou", "eval/pixel_accuracy"} <= tags
    steps = [h["iteration"] for h in record.history_json]
    assert [e.step for e in acc.Scalars("eval/miou")] == steps
    for h in record.history_json:
        at = lambda tag: next(e.value for e in acc.Scalars(tag) if e.step == h["iteration"])  # noqa: E731
        assert at("eval/miou") == pytest.approx(h["miou"], rel=1e-6, abs=1e-7)
        assert at("eval/pixel_accuracy") == pytest.approx(h["pixel_accuracy"], rel=1e-6)
        assert at("loss/total") == pytest.approx(h["loss"], rel=1e-6)
        for term, value in h["terms"].items():
            assert at(f"loss/{term}") == pytest.approx(value, rel=1e-6)
    assert acc.Scalars("lr")[0].value == pytest.approx(cfg["optim"]["lr"], rel=1e-6)
    off = load_config(tiny(f"paths.results={tmp_path / 'off'}", "tensorboard=false"))
    run(off)
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_progress_prints_one_line_per_evaluation_and_nothing_without_it(tiny, capsys):
    run(load_config([o for o in tiny() if o != "progress=false"] + ["progress=true"]))
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "mIoU" in line]
    assert len(lines) == 2 and "iteration 2/4" in lines[0] and "iteration 4/4" in lines[1]
    assert "val mIoU" in lines[0] and "elapsed" in lines[0] and "ETA" in lines[0]
    run(load_config(tiny()))
    assert "mIoU" not in capsys.readouterr().err


def test_checkpoint_settings_are_validated(tiny):
    for bad in ("checkpoint.every=-1", "checkpoint.keep_last=0"):
        with pytest.raises(ConfigError, match="checkpoint"):
            load_config(tiny(bad))


def test_reproduce_weights_and_show_use_the_saved_student(tiny, tmp_path, capsys, monkeypatch):
    from harness.measure import show

    cfg = load_config(tiny(f"paths.results={tmp_path / 'r'}"))
    record = run(cfg).record
    store_record(cfg, record)
    overrides = tiny(f"paths.results={tmp_path / 'r'}")
    assert reproduce_main([record.run_id, "--weights", *overrides]) == 0
    out = capsys.readouterr().out
    assert "saved final student" in out and "identical      yes" in out

    def no_training(*args, **kwargs):
        raise AssertionError("show retrained a student whose weights were saved")
    monkeypatch.setattr("harness.reproduce.reproduce", no_training)
    row = ResultsStore(cfg["store"]["url"]).get(record.run_id)
    model, info = show.trained_student(row, cfg)
    assert info["saved"] and not model.training
    with pytest.raises(AssertionError, match="retrained"):
        show.trained_student(row, {**cfg, "show": {"retrain": True}})


@pytest.mark.slow
def test_cli_train_interrupted_by_sigint_resumes_to_the_same_metrics(tiny, tmp_path):
    """The acceptance check: `python -m harness train budget=smoke` stopped with SIGINT during the
    run and started again ends with the metrics of an uninterrupted run (CPU, deterministic)."""
    def command(results):
        args = [o for o in tiny(*LONGER, f"paths.results={results}") if o != "progress=false"]
        return [sys.executable, "-m", "harness", "train", *args, "progress=true", "device=cpu"]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command(tmp_path / "b"), cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in iter(proc.stderr.readline, ""):
        if "iteration 2/6" in line:
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    [meta] = (tmp_path / "b" / "checkpoints").glob("*/last.json")
    assert 2 <= json.loads(meta.read_text())["iteration"] < 6
    again = subprocess.run(command(tmp_path / "b"), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming run" in again.stderr
    whole = subprocess.run(command(tmp_path / "a"), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0
    rows = {}
    for name in ("a", "b"):
        [rows[name]] = ResultsStore(f"sqlite:///{tmp_path / name / 'harness.db'}", readonly=True).query()
    assert rows["a"]["history_json"] == rows["b"]["history_json"]
    assert rows["a"]["final_miou"] == rows["b"]["final_miou"]
    assert rows["a"]["per_class_iou_json"] == rows["b"]["per_class_iou_json"]
