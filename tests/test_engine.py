"""One training run end to end: records, determinism, teacher cache, failure paths."""
import math

import pytest
import torch

from harness.cli import main
from harness.config import load_config, run_hash
from harness.errors import ConfigError
from harness.engine.loop import poly_lr
from harness.engine.record import store_record
from harness.engine.teacher import MODEL_KEYS, TeacherError, get_teacher, teacher_dir, teacher_for
from harness.engine.train import run
from harness.models import build_segmenter
from harness.store import ResultsStore

NULLABLE = {"failure_reason", "sweep_id", "stage", "trial_id", "params_json", "teacher"}


def test_student_run_stores_a_complete_record(tiny):
    cfg = load_config(tiny(energy=True))
    record = run(cfg, command="pytest").record
    store_record(cfg, record)
    stored = ResultsStore(cfg["store"]["url"]).get(record["run_id"])
    missing = [k for k, v in stored.items() if v is None and k not in NULLABLE]
    assert not missing, f"record fields left empty: {missing}"
    assert stored["arm"] == "student-only" and stored["methods"] == "" and stored["status"] == "completed"
    assert stored["iterations"] == 4 and [h["iteration"] for h in stored["history_json"]] == [2, 4]
    assert 0 <= stored["final_miou"] <= 1 and set(stored["per_class_iou_json"]) == set(cfg["dataset"]["class_names"])
    assert stored["energy_kwh"] > 0 and stored["co2_kg"] > 0
    assert stored["config_json"]["optim"]["lr"] == cfg["optim"]["lr"]


def test_same_seed_same_result_different_seed_differs(tiny):
    def train(seed):
        result = run(load_config(tiny(f"seed={seed}")))
        return result.record, result.model.state_dict()

    (a, wa), (b, wb), (c, wc) = train(0), train(0), train(1)
    assert a["history_json"] == b["history_json"] and a["per_class_iou_json"] == b["per_class_iou_json"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["history_json"] != c["history_json"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_poly_schedule():
    assert poly_lr(0.02, 0, 100, 0.9) == 0.02
    assert poly_lr(0.02, 50, 100, 0.9) == pytest.approx(0.02 * 0.5 ** 0.9)
    assert 0 < poly_lr(0.02, 99, 100, 0.9) < 0.02 * 0.02


def test_distilled_run_trains_the_teacher_once_then_reuses_it(tiny, capsys):
    cfg = load_config(tiny("+method=kd", "method.kd.tau=4", "budget.teacher_iterations=5"))
    first = run(cfg, teacher=teacher_for(cfg)).record
    assert "training it first" in capsys.readouterr().err
    ckpt = teacher_dir(cfg) / "teacher.pt"
    stamp = ckpt.stat().st_mtime_ns
    second = run(cfg, teacher=teacher_for(cfg)).record
    assert "training it first" not in capsys.readouterr().err and ckpt.stat().st_mtime_ns == stamp
    # training the teacher inside the first run must not change what the run computes
    assert first["history_json"] == second["history_json"]
    for rec in (first, second):
        info = rec["extra_json"]["teacher"]
        assert rec["arm"] == "distilled" and rec["methods"] == "kd" and rec["teacher"] == "pspnet_resnet34"
        assert len(info["sha256"]) == 64 and 0 <= info["val_miou"] <= 1
        assert "kd.kd" in rec["extra_json"]["last_loss_terms"]
    teachers = ResultsStore(cfg["store"]["url"]).query(arm="teacher")
    assert len(teachers) == 1 and teachers[0]["iterations"] == 5


def test_teacher_is_frozen_and_in_eval_mode(tiny):
    cfg = load_config(tiny("+method=kd", "budget.teacher_iterations=5"))
    teacher, _ = get_teacher(cfg, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_teacher_checkpoint_errors(tiny, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(TeacherError, match="cannot be read"):
        get_teacher(load_config(tiny("+method=kd", f"teacher.checkpoint={corrupt}")), torch.device("cpu"))

    cfg = load_config(tiny("+method=kd"))
    wrong_classes = tmp_path / "five_classes.pt"
    model_cfg = {k: cfg["teacher"][k] for k in MODEL_KEYS}
    torch.save(build_segmenter(model_cfg, 5).state_dict(), wrong_classes)
    with pytest.raises(TeacherError, match="with 9 classes"):
        get_teacher(load_config(tiny("+method=kd", f"teacher.checkpoint={wrong_classes}")), torch.device("cpu"))

    assert main(["train", *tiny("+method=kd", f"teacher.checkpoint={tmp_path / 'absent.pt'}")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_given_checkpoint_is_used_and_measured(tiny, tmp_path):
    cfg = load_config(tiny("+method=kd"))
    model_cfg = {k: cfg["teacher"][k] for k in MODEL_KEYS}
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": build_segmenter(model_cfg, 9).state_dict()}, path)
    cfg = load_config(tiny("+method=kd", f"teacher.checkpoint={path}"))
    record = run(cfg, teacher=teacher_for(cfg)).record
    info = record["extra_json"]["teacher"]
    assert info["source"] == "checkpoint" and info["checkpoint"] == str(path) and info["val_images"] == 8


def test_diverging_run_is_recorded_as_failed(tiny, monkeypatch):
    """The loss turns infinite at the third step (an absurd learning rate is refused by the config
    now, so the divergence is injected): the run ends there as failed, with the reason, and is stored."""
    import harness.engine.loop as loop

    real, calls = loop.task_terms, []

    def exploding(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 3:
            terms["ce"] = terms["ce"] * float("inf")
        return terms

    monkeypatch.setattr(loop, "task_terms", exploding)
    cfg = load_config(tiny("budget.iterations=6"))
    record = run(cfg).record
    store_record(cfg, record)
    assert record["status"] == "failed" and record["failure_reason"] == "loss became inf at iteration 2"
    assert record["iterations"] == 2
    assert ResultsStore(cfg["store"]["url"]).get(record["run_id"])["status"] == "failed"


def test_callback_sees_each_evaluation_and_can_stop_the_run(tiny):
    seen = []

    def callback(iteration, metrics):
        seen.append((iteration, metrics["miou"]))
        return True  # stop at the first evaluation

    record = run(load_config(tiny()), callback=callback).record
    assert [i for i, _ in seen] == [2] and not math.isnan(seen[0][1])
    assert record["status"] == "stopped" and record["iterations"] == 2


def test_cli_train_prints_miou_per_class_and_stores(tiny, capsys):
    overrides = tiny("+method=kd", "method.kd.tau=4", "optim.lr=0.02", "seed=3", "budget.teacher_iterations=5")
    assert main(["train", *overrides]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "per-class IoU" in out and "traffic sign" in out and "[kd]" in out
    cfg = load_config(overrides)
    rows = ResultsStore(cfg["store"]["url"]).query(arm="distilled")
    assert len(rows) == 1 and rows[0]["seed"] == 3 and rows[0]["config_json"]["method"]["kd"]["tau"] == 4.0


def test_cli_teacher_reports_provenance(tiny, capsys):
    assert main(["teacher", *tiny("budget.teacher_iterations=5")]) == 0
    out = capsys.readouterr().out
    assert "val mIoU" in out and "sha256" in out and "re-measured" in out


def test_progress_bar_shows_iteration_loss_and_lr(tiny, capsys):
    overrides = [o for o in tiny() if o != "progress=false"] + ["progress=true"]
    assert main(["train", *overrides]) == 0
    err = capsys.readouterr().err
    assert "4/4" in err and "loss=" in err and "lr=" in err


def test_precision_choice_and_autocast_up_to_the_device_boundary(tiny):
    """bf16 autocast runs (on CPU here, the same code path as CUDA up to the device), the losses stay
    float32, the record says which precision ran; `auto` is float32 on a CPU."""
    from harness.engine.loop import as_float32
    from harness.engine.train import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    fp32_cfg, bf16_cfg = load_config(tiny("+method=kd")), load_config(tiny("+method=kd", "precision=bf16", "channels_last=true"))
    fp32 = run(fp32_cfg, teacher=teacher_for(fp32_cfg)).record
    bf16 = run(bf16_cfg, teacher=teacher_for(bf16_cfg)).record
    assert fp32["extra_json"]["precision"] == "float32" and bf16["extra_json"]["precision"] == "bfloat16"
    assert bf16["status"] == "completed" and all(math.isfinite(v) for v in bf16["extra_json"]["last_loss_terms"].values())
    assert bf16["config_hash"] != fp32["config_hash"]          # precision defines the run
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = build_segmenter(load_config(tiny())["student"], 3)(torch.randn(2, 3, 17, 19))
    assert out.logits.dtype == torch.bfloat16
    cast = as_float32(out)
    assert cast.logits.dtype == torch.float32 and all(f.dtype == torch.float32 for f in cast.features.values())


def test_fp16_is_refused_with_the_reason(tiny):
    with pytest.raises(ConfigError, match="must be one of auto, fp32, bf16.*loss scaling"):
        load_config(tiny("precision=fp16"))


def test_run_record_has_one_shape_for_every_row(tiny):
    """A RunRecord's row has exactly the store's columns (the store adds created_at); arm and status
    are checked; a pruned trial's record is built the same way as a finished one's."""
    from harness.engine.record import RunRecord
    from harness.store import COLUMNS

    cfg = load_config(tiny("+method=kd"))
    record = RunRecord.of(cfg, "r1", "pytest", status="pruned", final_miou=0.1)
    assert set(record.as_row()) == set(COLUMNS) - {"created_at"}
    assert record["arm"] == "distilled" and record.methods == "kd" and record.teacher == cfg["teacher"]["name"]
    assert record.config_hash == run_hash(cfg) and record.split == cfg["eval_split"]
    assert record.versions_json["torch"] and record.host  # a pruned trial's record says where it ran too
    assert record.replace(arm="teacher").arm == "teacher"
    with pytest.raises(ValueError, match="status"):
        record.replace(status="running")
    with pytest.raises(ValueError, match="arm"):
        record.replace(arm="both")


def test_a_distilled_run_needs_its_teacher(tiny):
    with pytest.raises(ValueError, match="teacher_for"):
        run(load_config(tiny("+method=kd")))


def test_train_refuses_an_unusable_store_before_any_work(tiny, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, not a database " * 50)
    overrides = tiny("+method=kd", f"store.url=sqlite:///{notes}", f"paths.cache={tmp_path / 'cache'}")
    assert main(["train", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot use the results database") and err.count("\n") == 1
    assert not (tmp_path / "cache").exists()            # no teacher trained, no data generated
    assert notes.read_text().startswith("my notes")
    assert main(["train", *tiny("store.url=sqlite:///:memory:")]) == 2
    assert "in-memory" in capsys.readouterr().err


def test_identical_teacher_trainings_give_the_same_checkpoint_bytes(tiny, tmp_path):
    """The checkpoint is saved through a buffer: its archive does not carry the writer's pid."""
    digests = []
    for name in ("a", "b"):
        cfg = load_config(tiny("+method=kd", f"paths.cache={tmp_path / name}", "budget.teacher_iterations=2"))
        digests.append(get_teacher(cfg, torch.device("cpu")).info["sha256"])
    assert digests[0] == digests[1]


def test_a_garbage_cached_meta_json_is_a_teacher_error(tiny, tmp_path):
    cfg = load_config(tiny("+method=kd", f"paths.cache={tmp_path / 'c'}", "budget.teacher_iterations=2"))
    get_teacher(cfg, torch.device("cpu"))
    (teacher_dir(cfg) / "meta.json").write_text("{not json")
    with pytest.raises(TeacherError, match="cannot be read"):
        get_teacher(cfg, torch.device("cpu"))


def test_a_model_name_cannot_leave_the_cache_folder(tiny):
    with pytest.raises(ConfigError, match="names cache folders"):
        load_config(tiny("+method=kd", "teacher.name=../../x"))


def test_the_teacher_trains_with_its_own_threads_never_the_callers():
    """A sweep's trials run with 1 thread, its driver with 2: whoever trains the teacher first, it is
    trained with teacher.train.threads (the CPU weights depend on the thread count), which is part of
    its key when not the default. A stored config from before the setting trains with the default."""
    from harness.engine import teacher as tm

    base = load_config(["+method=kd"])
    trial = load_config(["+method=kd", "threads=1"])
    assert tm.teacher_training_config(trial)["threads"] == tm.teacher_training_config(base)["threads"] == 2
    assert tm.teacher_key(trial) == tm.teacher_key(base)
    assert "threads" not in base["teacher"]["train"]                 # the default stays out of hashes
    four = load_config(["+method=kd", "teacher.train.threads=4"])
    assert tm.teacher_training_config(four)["threads"] == 4 and tm.teacher_key(four) != tm.teacher_key(base)
    old = {**trial, "teacher": {**trial["teacher"], "train": {k: v for k, v in trial["teacher"]["train"].items()
                                                               if k != "threads"}}}
    assert tm.teacher_training_config(old)["threads"] == 2
    with pytest.raises(ConfigError, match="threads"):
        load_config(["+method=kd", "teacher.train.threads=0"])


def test_the_teacher_cache_key_changes_with_the_code_that_trains_it(tiny, tmp_path, monkeypatch):
    """A change in training code never reuses a stale teacher: the key hashes the training source."""
    from harness.engine import teacher as tm

    cfg = load_config(tiny())
    before_key, before_digest = tm.teacher_key(cfg), tm.training_code_digest()
    assert tm.teacher_key(cfg) == before_key                      # deterministic
    root = tmp_path / "harness"
    import shutil
    from pathlib import Path
    shutil.copytree(Path(tm.__file__).resolve().parents[1], root, ignore=shutil.ignore_patterns("__pycache__"))
    fake = root / "engine" / "teacher.py"
    monkeypatch.setattr(tm, "__file__", str(fake))
    assert tm.training_code_digest() == before_digest              # same bytes, another place: same key
    loop = root / "engine" / "loop.py"
    loop.write_text(loop.read_text() + "\n# a change in how every run trains\n")
    assert tm.training_code_digest() != before_digest and tm.teacher_key(cfg) != before_key
    loop.write_text(loop.read_text().replace("\n", "\r\n"))        # line endings alone change nothing
    changed = tm.training_code_digest()
    loop.write_text(loop.read_text().replace("\r\n", "\n"))
    assert tm.training_code_digest() == changed
    methods = root / "methods" / "kd.py"                           # a method's code: not the teacher's
    methods.write_text(methods.read_text() + "\n# kd only\n")
    assert tm.training_code_digest() == changed
