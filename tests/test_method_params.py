"""Each method's Config is the single source of its settings: the metadata drives validation at
config load, the sweep's $temperatures / $weights, conf/method/*.yaml and docs/methods.md."""
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import pytest
import yaml

from harness.cli import main
from harness.config import PROJECT_ROOT, load_config, run_hash
from harness.errors import ConfigError
from harness.methods import METHODS
from harness.methods import kind_of, path_kind, paths_of_kind
from harness.methods.docs import render_docs
from harness.params import FEATURES, check_section, defaults_of, fields_of, markdown_table, param

PINS = json.loads((PROJECT_ROOT / "tests" / "data" / "pinned_sweeps.json").read_text())["sweeps"]
# units the pins hold that the metadata removes on purpose: these train a head / projectors or weight
# an auxiliary copy of a term (kind aux_weight), they are no distillation strengths to tune
REMOVED = {"brd": {"weights[method.brd.boundary_bce_weight]"},
           "heteroakd": {"weights[method.heteroakd.projector_bce_weight]"},
           "dist": {"weights[method.dist.aux_weight]"}}
# every temperature and loss-weight-like field of every method, by kind
KINDS = {
    "afdcd": {"fd_weight": "weight", "ctr_weight": "weight", "tau": "temperature"},
    "brd": {"boundary_weight": "weight", "relation_weight": "weight", "boundary_bce_weight": "aux_weight",
            "tau": "temperature"},
    "cirkd": {"batch_p2p_weight": "weight", "memory_p2p_weight": "weight", "memory_p2r_weight": "weight",
              "batch_p2p_tau": "temperature", "contrast_tau": "temperature", "contrast_kd_tau": "temperature"},
    "cwd": {"weight": "weight", "tau": "temperature", "feature_weight": "weight", "feature_tau": "temperature"},
    "dist": {"inter_weight": "weight", "intra_weight": "weight", "aux_weight": "aux_weight", "tau": "temperature"},
    "gskd": {"weight": "weight", "tau": "temperature"},
    "heteroakd": {"weight": "weight", "tau": "temperature", "projector_bce_weight": "aux_weight"},
    "ifvd": {"weight": "weight"},
    "kd": {"weight": "weight", "tau": "temperature"},
    "skd": {"weight": "weight", "ho_weight": "weight", "d_loss_scale": "aux_weight", "gp_lambda": "aux_weight"},
}


def _units(cfg):
    """Per arm, (stage name, search space) of every unit a sweep would run (the runner's own plan)."""
    from harness.sweep.plan import plan

    units = {}
    for s in plan(cfg)["stages"]:
        if s["search"] not in ("combine", "rerun") and not s["space"]:
            continue  # nothing to search for this arm (e.g. no temperature): no unit runs
        units.setdefault(s["arm"], []).append({"name": s["stage"], "space": s["space"]})
    return units


def _pinned_form(cfg, keys=None):
    """The config as pinned; `keys`: only those top-level keys (settings that do not define a run,
    such as checkpoint, tensorboard, plugins or report, may be added after the pins were taken)."""
    out = json.loads(json.dumps(cfg))
    out["paths"] = {k: f"<{k}>" for k in out["paths"]}
    out["store"]["url"] = "<store>"
    if keys is not None:
        out = {k: v for k, v in out.items() if k in keys}
    return json.dumps(out, sort_keys=True)


# --------------------------------------------------------------------------- pinned sweeps
@pytest.mark.parametrize("method", sorted(PINS))
def test_default_sweeps_match_the_pins_except_the_intended_removals(method):
    from harness.sweep.runner import arm_config, arm_ids, prepare

    pin = PINS[method]
    from harness.config import RUN_DEFINING_KEYS

    cfg = load_config([f"+method={method}"], check_data=False)
    # every setting that defines what a run computes is byte-equal to the pin; the rest may grow
    assert _pinned_form(cfg, RUN_DEFINING_KEYS) == _pinned_form(json.loads(pin["config_json"]), RUN_DEFINING_KEYS)
    for arm in ("distilled", "student-only"):
        assert run_hash(arm_config(cfg, arm)) == pin[f"run_hash[{arm}]"]
    protocol, ids = prepare(cfg)
    assert ids == arm_ids(cfg, protocol) == pin["arm_ids"]
    units = _units(cfg)
    removed = REMOVED.get(method, set())
    expected = {arm: [u for u in pinned if u["name"] not in removed] for arm, pinned in pin["units"].items()}
    assert units == expected
    assert all(any(u["name"] == name for u in pin["units"]["distilled"]) for name in removed)


# --------------------------------------------------------------------------- metadata
def test_every_temperature_and_weight_is_classified():
    assert set(KINDS) == set(METHODS)
    for method, cls in METHODS.items():
        kinds = {f.name: f.kind for f in fields_of(cls.Config) if f.kind != "structural"}
        assert kinds == KINDS[method], method
        for f in fields_of(cls.Config):
            assert f.doc, f"{method}.{f.name} has no doc"
            if f.kind in ("weight", "aux_weight"):
                assert f.range == ">= 0", f"{method}.{f.name}"
            if f.kind == "temperature":
                assert f.range == "positive" and f.gate, f"{method}.{f.name}"
                assert all(kind_of(method, g) == "weight" for g in f.gate)


def test_kind_of_and_path_kind():
    assert kind_of("cwd", "feature_tau") == "temperature"
    assert kind_of("brd", "boundary_bce_weight") == "aux_weight"
    assert kind_of("brd", "temperature_cap") == "structural"
    assert path_kind("method.dist.aux_weight") == "aux_weight" and path_kind("optim.lr") is None
    with pytest.raises(KeyError):
        kind_of("kd", "nosuch")


def test_paths_of_kind_follow_the_metadata_and_the_gate():
    section = {"cwd": defaults_of(METHODS["cwd"].Config), "brd": defaults_of(METHODS["brd"].Config)}
    assert paths_of_kind(section, "temperature") == {"method.brd.tau": 1.0, "method.cwd.tau": 4.0}
    section["cwd"]["feature_weight"] = 50.0
    assert list(paths_of_kind(section, "temperature")) == ["method.brd.tau", "method.cwd.tau", "method.cwd.feature_tau"]
    assert list(paths_of_kind(section, "weight")) == ["method.brd.boundary_weight", "method.brd.relation_weight",
                                                        "method.cwd.weight", "method.cwd.feature_weight"]
    assert paths_of_kind(section, "aux_weight") == {"method.brd.boundary_bce_weight": 1.0}
    section["brd"].update(boundary_weight=0.0, relation_weight=0.0)   # both terms off: tau not searched
    assert "method.brd.tau" not in paths_of_kind(section, "temperature")


def test_check_section_messages():
    @dataclass
    class Config:
        weight: float = param(1.0, kind="weight", low=0, doc="w")
        tau: float = param(1.0, kind="temperature", low=0, low_open=True, gate="weight", doc="t")
        frac: float = param(0.5, low=0, high=1, high_open=True, doc="f")
        mode: str = param("a", choices=("a", "b"), doc="m")
        stages: List[str] = param(["stage1"], choices=FEATURES, doc="s")
        n: Optional[int] = param(None, low=1, doc="n")

    def message(**values):
        with pytest.raises(ConfigError) as info:
            check_section("toy", Config, values)
        return str(info.value)

    check_section("toy", Config, {})
    check_section("toy", Config, {"n": None, "stages": ["head", "stage4"]})
    assert message(mode="foo") == "'method.toy.mode' must be one of a, b, got 'foo'"
    assert message(tau=0) == "'method.toy.tau' must be positive, got 0"
    assert message(weight=-1) == "'method.toy.weight' must be >= 0, got -1"
    assert message(frac=1.0) == "'method.toy.frac' must be in [0, 1), got 1.0"
    assert message(n=0) == "'method.toy.n' must be >= 1, got 0"
    assert "stage9" in message(stages=["stage9"])
    assert message(nosuch=1).startswith("unknown config key 'method.toy.nosuch'")
    assert Config().stages is not Config().stages  # a list default is copied per instance


# ------------------------------------------------------------------ validated at config load
@pytest.mark.parametrize("overrides, text", [
    (["+method=gskd", "method.gskd.mode=foo"], "'method.gskd.mode' must be one of standalone, plugin, got 'foo'"),
    (["+method=kd", "method.kd.tau=-1", "budget=smoke"], "'method.kd.tau' must be positive, got -1.0"),
    (["+method=cwd", "method.cwd.feature_tau=0"], "'method.cwd.feature_tau' must be positive, got 0.0"),
    (["+method=brd", "method.brd.tau=4", "method.brd.temperature_cap=2"], "'method.brd.temperature_cap' (2.0) must be >= "),
    (["+method=skd", "method.skd.pool_kernel=2.5"], "'method.skd.pool_kernel' must be a fraction"),
    (["+method=[kd,heteroakd]", "method.heteroakd.warmup_fraction=1"], "warmup_fraction' must be in [0, 1)"),
    (["+method=ifvd", "method.ifvd.feature=neck"], "'method.ifvd.feature' must be one of stage1"),
])
def test_a_bad_method_value_is_refused_at_config_load(overrides, text):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert text in str(info.value), str(info.value)


@pytest.mark.parametrize("command", ["config", "train"])
def test_cli_refuses_a_bad_method_value_with_exit_code_2(command, capsys):
    assert main([command, "+method=gskd", "method.gskd.mode=foo", "budget=smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 'method.gskd.mode' must be one of standalone, plugin") and "Traceback" not in err


def test_no_traceback_for_a_bad_method_value_through_the_real_entry_point():
    proc = subprocess.run([sys.executable, "-m", "harness", "config", "+method=cwd", "method.cwd.feature_tau=0"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'method.cwd.feature_tau' must be positive" in proc.stderr


# -------------------------------------------------------------- yaml and docs follow the Config
@pytest.mark.parametrize("method", sorted(METHODS))
def test_yaml_holds_exactly_the_config_keys_and_defaults(method):
    raw = yaml.safe_load((PROJECT_ROOT / "conf" / "method" / f"{method}.yaml").read_text())
    assert list(raw) == [method]
    section, defaults = raw[method], defaults_of(METHODS[method].Config)
    assert list(section) == list(defaults)
    for key, default in defaults.items():
        assert section[key] == default and type(section[key]) is type(default), f"{method}.{key}"


def test_docs_tables_are_generated_from_the_metadata():
    text = (PROJECT_ROOT / "docs" / "methods.md").read_text()
    assert render_docs(text) == text, "run: python -m harness.methods.docs --update-docs docs/methods.md"
    for method, cls in METHODS.items():
        assert markdown_table(cls.Config) in text, method


def test_configs_are_dataclasses_of_declared_fields():
    for method, cls in METHODS.items():
        for f in dataclasses.fields(cls.Config):
            assert "harness.param" in f.metadata, f"{method}.{f.name} is not declared with param()"
