"""Protocol files are checked before any work (issue 14, item 6): encoding, types, `asha` keys and
values, finite bounds, and every grid/choice value (and every range bound) against the config's own
rules for the path it sets, the same rules that decide `path=value` on the command line."""
import math
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.config import load_config
from harness.errors import ConfigError
from harness.sweep.protocol import config_verdict, load_protocol, parse_protocol
from harness.sweep.runner import prepare

LR_WD = {"name": "lr_wd", "arms": ["student-only", "distilled"], "search": "tpe", "trials": 2,
         "space": {"optim.lr": {"loguniform": [0.002, 0.1]}}}
RERUNS = {"name": "reruns", "arms": ["student-only", "distilled"], "inherits": ["lr_wd"], "seeds": 1}


def raw(**top):
    stages = top.pop("stages", [LR_WD, RERUNS])
    return {"name": "p", "sampler_seed": 0, "stages": stages, **top}


def write(tmp_path, data, name="p") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def refused(data, *words):
    with pytest.raises(ConfigError) as e:
        parse_protocol(data)
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    for w in words:
        assert w in text, text
    return text


# ------------------------------------------------------------------------------ file and types
def test_a_protocol_that_is_not_utf8_is_one_paragraph_naming_the_file(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(yaml.safe_dump(raw()).encode() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_protocol(str(path))
    assert str(path) in str(e.value) and "UTF-8" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("seed", [1.5, "x", True, -1, 2 ** 32, None])
def test_sampler_seed_must_be_a_whole_number(seed):
    refused(raw(sampler_seed=seed), "sampler_seed")


@pytest.mark.parametrize("value", [2.5, "3", False])
def test_tpe_startup_trials_must_be_a_whole_number(value):
    refused(raw(tpe_startup_trials=value), "tpe_startup_trials")


@pytest.mark.parametrize("dist", [{"loguniform": [0.001, math.inf]}, {"uniform": [-math.inf, 0.1]},
                                  {"uniform": [math.nan, 0.1]}, {"loguniform": ["a", "b"]},
                                  {"loguniform": [True, 0.1]}])
def test_range_bounds_must_be_finite_numbers(dist):
    refused(raw(stages=[{**LR_WD, "space": {"optim.lr": dist}}, RERUNS]), "optim.lr")


def test_infinite_bounds_written_in_yaml_are_refused(tmp_path):
    text = yaml.safe_dump(raw()).replace("0.1", ".inf")
    path = tmp_path / "inf.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="finite"):
        load_protocol(str(path))


def test_placeholder_grids_take_numbers():
    stage = {"name": "t", "arms": ["distilled"], "inherits": ["lr_wd"], "search": "grid",
             "space": {"$temperatures": {"grid": ["hot"]}}}
    refused(raw(stages=[LR_WD, stage, RERUNS]), "$temperatures")


@pytest.mark.parametrize("key,value", [("space", ["optim.lr"]), ("inherits", "lr_wd"), ("each", "yes"),
                                       ("trials", True)])
def test_stage_fields_of_the_wrong_type(key, value):
    refused(raw(stages=[{**LR_WD, key: value}, RERUNS]), key)


def test_stages_must_be_a_list():
    refused(raw(stages={"lr_wd": LR_WD}), "stages")


# ------------------------------------------------------------------------------------- asha
@pytest.mark.parametrize("asha,word", [({"grace_period": 0}, "grace_period"), ({"grace_period": 1.5}, "grace_period"),
                                       ({"reduction_factor": -2}, "reduction_factor"),
                                       ({"reduction_factor": 1}, "reduction_factor"),
                                       ({"reduction_factor": math.inf}, "reduction_factor"),
                                       ({"reduction_factor": math.nan}, "reduction_factor"),
                                       ({"min_fraction": math.nan}, "min_fraction"),
                                       ({"min_completed": 0}, "min_completed"),
                                       ({"grace": 1}, "unknown key 'grace'"), ({"brackets": 2}, "brackets"),
                                       ([1, 2], "mapping")])
def test_asha_keys_and_values(asha, word):
    refused(raw(asha=asha), word)


def test_valid_protocols_parse_as_before():
    p = parse_protocol(raw(asha={"grace_period": 2, "reduction_factor": 3}))
    assert (p.sampler_seed, p.tpe_startup_trials, p.asha["grace_period"]) == (0, 3, 2)
    assert load_protocol("default").stages[0].name == "lr_wd"


# ------------------------------------------------------------ values against the config schema
@pytest.fixture(scope="module")
def kd_cfg():
    return load_config(["+method=kd", "budget=smoke"], check_data=False)


def prepared(tmp_path, cfg, stages):
    return prepare({**cfg, "sweep": {**cfg["sweep"], "protocol": write(tmp_path, raw(stages=stages))}})


def grid(path, values, arms=("distilled",)):
    return {"name": "g", "arms": list(arms), "inherits": ["lr_wd"], "search": "grid", "space": {path: {"grid": values}}}


@pytest.mark.parametrize("stage,words", [
    (grid("optim.lr", [-1.0, 0.0], arms=("student-only", "distilled")), ["optim.lr", "-1.0", "(0, 1000]"]),
    ({**LR_WD, "name": "lr2", "inherits": ["lr_wd"], "space": {"optim.lr": {"choice": [0.01, 0]}}}, ["optim.lr", "choice"]),
    ({**LR_WD, "name": "lr2", "inherits": ["lr_wd"], "space": {"optim.lr": {"loguniform": [0.001, 2000.0]}}},
     ["optim.lr", "2000.0", "bound"]),
    ({**LR_WD, "name": "lr2", "inherits": ["lr_wd"], "space": {"optim.lr": {"choice": ["fast"]}}}, ["optim.lr", "fast"]),
    (grid("method.kd.tau", [1, 0]), ["method.kd.tau", "positive"]),
    (grid("$temperatures", [1, 0]), ["method.kd.tau"]),
    (grid("optim.momentum", [0.9, 1.0]), ["optim.momentum"]),
    (grid("budget.batch_size", [2, 0.5]), ["budget.batch_size"]),
    (grid("seed", [0, -1]), ["seed"]),
])
def test_grid_and_choice_values_are_checked_against_the_config(tmp_path, kd_cfg, stage, words):
    with pytest.raises(ConfigError) as e:
        prepared(tmp_path, kd_cfg, [LR_WD, stage, RERUNS])
    text = str(e.value)
    assert "\n" not in text and "stage" in text
    for w in words:
        assert w in text, text


def test_the_same_rule_as_the_command_line(kd_cfg):
    """What the protocol refuses for a path is what `path=value` on the command line refuses."""
    for path, value in [("optim.lr", 0.0), ("method.kd.tau", 0), ("optim.weight_decay", -1e-4), ("optim.lr", 1e308)]:
        with pytest.raises(ConfigError) as cli:
            load_config(["+method=kd", "budget=smoke", f"{path}={value}"], check_data=False)
        assert config_verdict(kd_cfg, path, value) == str(cli.value)
    assert config_verdict(kd_cfg, "optim.lr", 0.05) is None
    assert config_verdict(kd_cfg, "method.kd.tau", 8) is None


def test_valid_values_pass_for_every_method(tmp_path):
    from harness.methods import METHODS

    for name in sorted(METHODS):
        prepare(load_config([f"+method={name}", "budget=smoke"], check_data=False))  # the shipped protocol


def test_a_bad_protocol_value_exits_2_before_anything_is_written(tiny, tmp_path, capsys):
    protocol = write(tmp_path, raw(stages=[LR_WD, grid("optim.lr", [-1.0, 0.0], arms=("student-only",)), RERUNS]))
    overrides = tiny("+method=kd", f"sweep.protocol={protocol}")
    assert main(["sweep", *overrides]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "Traceback" not in err
    assert not (tmp_path / "results" / "harness.db").exists()


# ------------------------------------------------------------- the teacher, before the database
@pytest.mark.parametrize("meta", [b"{not json", b'{"sha256": "0000"}', b"\xff\xfe"])
def test_a_corrupt_teacher_cache_exits_2_before_the_sweep_creates_its_database(tiny, tmp_path, capsys, meta):
    """Issue 14 item 9: the teacher cache is checked (engine.teacher.check_teacher) before run_sweep
    opens the store, so the exit-2 error leaves no database behind."""
    from harness.engine.teacher import teacher_dir

    overrides = [o for o in tiny("+method=kd") if not o.startswith("paths.cache=")] + [f"paths.cache={tmp_path / 'cache'}"]
    folder = teacher_dir(load_config(overrides))
    folder.mkdir(parents=True)
    (folder / "teacher.pt").write_bytes(b"not a checkpoint")
    (folder / "meta.json").write_bytes(meta)
    assert main(["sweep", *overrides]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "Traceback" not in err
    assert not (tmp_path / "results" / "harness.db").exists()
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").glob("*.db"))


def test_a_missing_given_teacher_checkpoint_exits_2_before_the_database(tiny, tmp_path, capsys):
    overrides = tiny("+method=kd", f"teacher.checkpoint={tmp_path / 'nowhere.pt'}")
    assert main(["sweep", *overrides]) == 2
    assert "nowhere.pt" in capsys.readouterr().err
    assert not (tmp_path / "results" / "harness.db").exists()
