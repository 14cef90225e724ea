"""Config composition, validation, hashing and the CLI's answers to bad input."""
import os
import subprocess
import sys

import pytest

from harness.cli import COMMANDS, main
from harness.config import PROJECT_ROOT, load_config, run_hash
from harness.errors import ConfigError


def test_default_config_is_a_plain_validated_dict():
    cfg = load_config([])
    assert type(cfg) is dict and type(cfg["optim"]) is dict
    assert cfg["dataset"]["name"] == "synthetic" and cfg["budget"]["name"] == "quick"
    assert cfg["method"] == {}  # no method = the student-only arm
    assert os.path.isabs(cfg["paths"]["results"]) and cfg["store"]["url"].startswith("sqlite:///")


def test_method_is_added_and_its_parameters_are_config_paths():
    cfg = load_config(["+method=kd", "method.kd.tau=4", "optim.lr=0.02", "seed=3"])
    assert cfg["method"] == {"kd": {"weight": 1.0, "tau": 4.0}}
    assert cfg["optim"]["lr"] == 0.02 and cfg["seed"] == 3
    assert load_config(["+method=[kd]"])["method"] == {"kd": {"weight": 1.0, "tau": 1.0}}


def test_group_options_are_selectable():
    cfg = load_config(["dataset=synthetic", "student=deeplabv3_mobilenetv2", "budget=smoke"])
    assert cfg["student"]["backbone"] == "mobilenetv2" and cfg["budget"]["iterations"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["student=resnet9000"], "unknown student 'resnet9000'. Valid choices for student: "),
    (["budget=quik"], "Did you mean 'quick'"),
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["+optim.lrr=0.1"], "Did you mean 'optim.lr'"),
    (["optim.lr=abc"], "wrong type for 'optim.lr'"),
    (["budget.iterations=2.5"], "wrong type for 'budget.iterations'"),
    (["budget.iterations=0"], "'budget.iterations' must be positive"),
    (["optim.lr=-1"], "'optim.lr' must be in (0, 1000]"),
    (["eval_split=test"], "'eval_split' must be one of train, tune, val"),
    (["device=tpu"], "'device' must be one of auto, cpu, cuda"),
    (["+method=nosuch"], "unknown method 'nosuch'. Valid choices for method: " + ", ".join(sorted(p.stem for p in (PROJECT_ROOT / "conf" / "method").glob("*.yaml")))),
    (["method=kd"], "write '+method=kd'"),
    (["method.kd.tau=4"], "add +method=kd"),
    (["+method=kd", "method.kd.tau=0"], "'method.kd.tau' must be positive"),
    (["+method=kd", "method.kd.temp=2"], "unknown config key 'method.kd.temp'"),
    (["lr"], "is not an override"),
])
def test_bad_input_is_a_config_error_naming_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(overrides)
    assert message in str(info.value), str(info.value)


def test_cli_exit_code_2_and_one_paragraph(capsys):
    assert main(["train", "student=resnet9000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown student") and "pspnet_resnet18" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_unknown_command_and_flags(capsys):
    assert main(["trian"]) == 2
    assert "Valid commands: " + ", ".join(COMMANDS) in capsys.readouterr().err
    assert main(["train", "--lr", "3"]) == 2
    assert "unknown option --lr" in capsys.readouterr().err
    assert main([]) == 2


def test_help_lists_every_command_on_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert sum(line.strip().startswith(name + " ") for line in out.splitlines()) == 1
    assert main(["train", "--help"]) == 0
    assert "student={" in capsys.readouterr().out


def test_no_traceback_through_the_real_entry_point():
    proc = subprocess.run([sys.executable, "-m", "harness", "train", "optim.lr=abc"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "wrong type for 'optim.lr'" in proc.stderr


def test_run_hash_is_stable_and_covers_only_what_defines_a_run(tmp_path):
    base = load_config(["budget=smoke"])
    assert run_hash(base) == run_hash(load_config(["budget=smoke"]))
    elsewhere = load_config(["budget=smoke", f"paths.results={tmp_path}", "threads=1", "progress=false"])
    assert run_hash(elsewhere) == run_hash(base)
    assert run_hash(load_config(["budget=smoke", "optim.lr=0.5"])) != run_hash(base)
    assert run_hash(load_config(["budget=smoke", "seed=1"])) != run_hash(base)
    # a student-only run does not depend on which teacher is configured; a distilled run does
    assert run_hash(load_config(["budget=smoke", "teacher=pspnet_resnet34"])) == run_hash(base)
    kd = ["budget=smoke", "+method=kd"]
    assert run_hash(load_config(kd + ["teacher=pspnet_resnet34"])) != run_hash(load_config(kd))


def test_recipes_set_the_papers_protocols_per_dataset(tmp_path, monkeypatch):
    """recipe=cirkd|niemann2023 override budget and optimiser with the papers' values; the crop comes
    from the dataset; ImageNet initialisation from the local hub cache (false: random init)."""
    import torch
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cirkd = load_config(["recipe=cirkd", "dataset=cityscapes", "student=deeplabv3_resnet18",
                         "teacher=deeplabv3_resnet101"], check_data=False)
    assert cirkd["recipe"] == "cirkd" and cirkd["budget"]["name"] == "cirkd"
    assert cirkd["budget"]["crop_size"] == [512, 1024] and cirkd["budget"]["batch_size"] == 16
    assert cirkd["budget"]["iterations"] == 40000 and cirkd["budget"]["scale_range"] == [0.5, 2.0]
    assert (cirkd["optim"]["lr"], cirkd["optim"]["weight_decay"]) == (0.02, 1e-4)
    assert cirkd["student"]["pretrained"] == "hub"
    niemann = load_config(["recipe=niemann2023", "dataset=voc", "student=pspnet_resnet18"], check_data=False)
    assert niemann["budget"]["crop_size"] == [473, 473] and niemann["budget"]["batch_size"] == 8
    assert niemann["optim"]["weight_decay"] == 5e-4
    assert load_config(["recipe=niemann2023", "dataset=cityscapes"], check_data=False)["budget"]["crop_size"] == [512, 512]
    assert run_hash(niemann) != run_hash(load_config(["dataset=voc", "student=pspnet_resnet18"], check_data=False))

    # weights must be on this machine when a run starts
    with pytest.raises(ConfigError, match="resnet18-f37072fd.pth is in the torch hub cache"):
        load_config(["recipe=niemann2023", "student=pspnet_resnet18", "teacher=pspnet_resnet101"])
    with pytest.raises(ConfigError, match="full-width backbone only"):
        load_config(["recipe=niemann2023"])               # the CPU preset has width 0.25
    ablation = load_config(["recipe=niemann2023", "student=pspnet_resnet18", "student.pretrained=false",
                            "teacher.pretrained=false"])
    assert ablation["student"]["pretrained"] is None and ablation["budget"]["crop_size"] == [64, 64]
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert load_config(["recipe=niemann2023", "student=pspnet_resnet18", "teacher.pretrained=false"])["student"]["pretrained"] == "hub"
    with pytest.raises(ConfigError, match="unknown recipe 'cirk'.*Did you mean 'cirkd'"):
        load_config(["recipe=cirk"])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", "'optim.lr' must be a finite number, got nan"),
    ("optim.grad_clip_norm=inf", "'optim.grad_clip_norm' must be a finite number, got inf"),
    ("dataset.mean=[1,nan,3]", "'dataset.mean[1]' must be a finite number"),
    ("optim.lr=1e308", "'optim.lr' must be in (0, 1000]"),
    ("seed=-1", "'seed' must be >= 0"),
    ("student.dropout=2", "'student.dropout' must be in [0, 1)"),
    ("optim.poly_power=-1", "'optim.poly_power' must be >= 0"),
    ("energy.measure_power_secs=0", "'energy.measure_power_secs' must be >= 1"),
    ("sweep.gpus_per_trial=-1", "'sweep.gpus_per_trial' must be >= 0"),
    ("sweep.cpus_per_trial=0", "'sweep.cpus_per_trial' must be >= 1"),
    ("sweep.max_concurrent_trials=0", "'sweep.max_concurrent_trials' must be >= 1"),
    ("sweep.collapse_fraction=1.5", "'sweep.collapse_fraction' must be in [0, 1]"),
    ("teacher.train.momentum=1", "'teacher.train.momentum' must be in [0, 1)"),
])
def test_every_number_is_finite_and_in_its_schema_range(override, message):
    """One schema-level rule: NaN/inf anywhere, and each field's declared range (harness.params)."""
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert message in str(err.value)


def test_a_method_temperature_of_inf_is_refused():
    with pytest.raises(ConfigError, match="'method.kd.tau' must be a finite number, got inf"):
        load_config(["+method=kd", "method.kd.tau=inf"])


# ------------------------------------------------------------------------------ Hydra habits
def test_hydra_habits_cfg_job_info_and_multirun(capsys, tmp_path):
    from harness.cli import main

    assert main(["train", "--cfg", "job", "budget=smoke", "optim.lr=0.03", f"paths.results={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.03" in out and "# run hash:" in out and not any(tmp_path.iterdir())
    assert main(["leaderboard", "--cfg", "job", "+method=kd"]) == 0
    assert "# filters: method=['kd']" in capsys.readouterr().out
    assert main(["sweep", "--info"]) == 0
    info = capsys.readouterr().out
    assert "budget: paper, quick, smoke" in info and "protocols (sweep.protocol=NAME): default" in info
    for bad in (["train", "-m", "optim.lr=0.1"], ["train", "--multirun", "optim.lr=0.1"]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert "python -m harness sweep" in err and "--multirun" in err
    assert main(["train", "--cfg", "hydra"]) == 2 and "--cfg job" in capsys.readouterr().err
    # Hydra's own hint would recommend --multirun; ours names the sweep and the list syntax
    assert main(["train", "optim.lr=0.1,0.2"]) == 2
    err = capsys.readouterr().err
    assert "harness sweep" in err and "optim.lr=[a,b]" in err and "add --multirun" not in err


def test_each_command_help_has_its_own_examples_and_keys(capsys):
    from harness.cli import main

    texts = {}
    for command in ("sweep", "train", "leaderboard"):
        assert main([command, "--help"]) == 0
        texts[command] = capsys.readouterr().out
    assert "--dry-run" in texts["sweep"] and "sweep.*" in texts["sweep"]
    assert "test=t|permutation" in texts["leaderboard"] and "--dry-run" not in texts["train"]
    assert len(set(texts.values())) == 3


def test_unicode_and_overlong_overrides_are_one_paragraph(capsys):
    from harness.cli import main

    assert main(["train", "student=é"]) == 2
    err = capsys.readouterr().err
    assert "not valid Hydra override syntax" in err and "student='é'" in err and "Traceback" not in err
    assert main(["train", "x" * 5000 + "=1"]) == 2
    err = capsys.readouterr().err
    assert "5002 characters" in err and "Traceback" not in err and len(err) < 600


def test_predicted_ids_outside_the_classes_are_an_error():
    import torch
    from harness.engine.evaluate import confusion_matrix

    target = torch.tensor([[0, 1], [2, 255]])
    assert confusion_matrix(torch.tensor([[0, 1], [2, 7]]), target, 3, 255).sum() == 3   # ignore pixel: any id
    with pytest.raises(ValueError, match="predicted class ids outside 0..2: found \\[5\\]"):
        confusion_matrix(torch.tensor([[0, 5], [2, 0]]), target, 3, 255)


@pytest.mark.slow
def test_sigterm_to_a_command_is_a_clean_interruption(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "harness", "train", "budget=smoke", "budget.iterations=100000",
                             "progress=false", "energy.enabled=false", "checkpoint.every=1", f"paths.results={tmp_path}",
                             f"paths.cache={tmp_path / 'cache'}"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(tmp_path.glob("checkpoints/*/last*.pt")):
        time.sleep(1)                      # training runs once its first training state is saved
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err and "Fatal Python error" not in err and "Traceback" not in err
    assert "saving the training state" in err              # the run saved its state on the way out
    assert list(tmp_path.glob("checkpoints/*/last*.pt"))
