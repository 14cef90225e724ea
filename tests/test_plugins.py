"""Plug-in methods and datasets from outside the package, and the tutorials that describe them.

The tutorials' code is executed as written: `docs/add_a_method.md` and `docs/add_a_dataset.md` are
parsed, their ```` ```lang file=PATH ```` blocks are written into a temporary folder outside the
package and their ```` ```bash run ```` commands are run there as subprocesses (with the tiny
overrides of tests/conftest.py added), so the docs and this test cannot drift apart.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from harness.config import load_config
from harness.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOCS = PROJECT_ROOT / "docs"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)

# conftest's `tiny`, less the synthetic dataset's sizes (the folder dataset has none)
TINY_RUN = ["budget.crop_size=[32,32]", "budget.iterations=4", "budget.eval_interval=2",
            "budget.teacher_iterations=4", "student.head_channels=16", "teacher=pspnet_resnet34",
            "teacher.head_channels=16", "progress=false", "threads=2", "energy.enabled=false",
            "report.after_sweep=false", "report.measure=false"]
TINY_SYNTHETIC = ["dataset.sizes.train=24", "dataset.sizes.tune=8", "dataset.sizes.val=8"]


# ------------------------------------------------------------------------------ the tutorials
def blocks(doc: str):
    """(language, info string, body) of every fenced block of a docs page."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in BLOCK.finditer((DOCS / doc).read_text())]


def write_files(doc: str, folder: Path) -> list:
    written = []
    for _, info, body in blocks(doc):
        m = re.match(r"file=(\S+)", info)
        if m:
            path = folder / m.group(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            written.append(path)
    assert written, f"{doc} has no ```lang file=PATH blocks"
    return written


def commands(doc: str) -> list:
    out = [line for lang, info, body in blocks(doc) if lang == "bash" and info == "run"
           for line in body.splitlines() if line.strip()]
    assert out, f"{doc} has no ```bash run block"
    return out


def run_command(line: str, cwd: Path, extra: list, timeout: int = 600) -> subprocess.CompletedProcess:
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "harness"], line
    command = [sys.executable, *argv[1:], *extra]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def outputs(tmp: Path, cache: Path) -> list:
    return [f"paths.results={tmp / 'results'}", f"paths.reports={tmp / 'reports'}", f"paths.cache={cache}"]


def make_streets(root: Path, n_train: int = 8, n_val: int = 2, size: int = 32, seed: int = 0) -> None:
    """The layout of docs/add_a_dataset.md: tiny RGB PNGs and 8-bit label PNGs (ids 0..2, some 255)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = np.zeros((size, size), np.uint8)
            label[: size // 3] = 2                        # sky on top, road below, a car in the middle
            label[size // 2:, size // 4: size // 2] = 1
            label[0, 0] = 255
            colours = np.array([[128, 64, 128], [0, 0, 142], [70, 130, 180]], np.uint8)
            image = colours[np.minimum(label, 2)] + rng.integers(0, 30, (size, size, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{split}_{i:03d}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{split}_{i:03d}.png")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # four subprocesses: about 2 minutes on an idle 2-core machine, far more on a busy one
def test_the_method_tutorial_runs_from_a_folder_outside_the_package(tmp_path, shared_cache):
    write_files("add_a_method.md", tmp_path)
    for line in commands("add_a_method.md"):
        done = run_command(line, tmp_path, [*TINY_RUN, *TINY_SYNTHETIC, *outputs(tmp_path, shared_cache)])
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        if "--dry-run" in line:  # the plug-in's Config kinds feed $temperatures / $weights
            assert "temperature[method.prob_mse.tau]" in done.stdout
            assert "weights[method.prob_mse.weight]" in done.stdout
        else:
            assert "prob_mse" in done.stdout
    docs = subprocess.run([sys.executable, "-m", "harness.methods.docs", "--plugins", "my_kd/prob_mse.py",
                           "--markdown", "prob_mse"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert docs.returncode == 0, docs.stderr[-2000:]
    assert "<!-- params:prob_mse" in docs.stdout and "| `tau` | 2.0 | temperature |" in docs.stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_dataset_tutorial_runs_from_a_folder_outside_the_package(tmp_path, shared_cache):
    write_files("add_a_dataset.md", tmp_path)
    make_streets(tmp_path / "data" / "my_streets")
    for line in commands("add_a_dataset.md"):
        done = run_command(line, tmp_path, [*TINY_RUN, *outputs(tmp_path, shared_cache)])
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "my_streets" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_sweep_loads_the_plug_ins_in_its_ray_trials(tmp_path, shared_cache):
    """A real (tiny) sweep: the trials run in Ray worker processes, which load the plug-ins themselves."""
    from harness.store import ResultsStore

    write_files("add_a_method.md", tmp_path)
    write_files("add_a_dataset.md", tmp_path)
    make_streets(tmp_path / "data" / "my_streets")
    protocol = tmp_path / "tiny.yaml"
    protocol.write_text(yaml.safe_dump({"name": "tiny", "sampler_seed": 0, "stages": [
        {"name": "lr", "arms": ["student-only", "distilled"], "search": "grid", "space": {"optim.lr": {"grid": [0.01]}}},
        {"name": "reruns", "arms": ["student-only", "distilled"], "inherits": ["lr"], "seeds": 1}]}))
    overrides = ["plugins=[my_kd/prob_mse.py,my_project]", "dataset=my_streets", "+method=prob_mse", "budget=smoke",
                 f"sweep.protocol={protocol}", "sweep.ray.num_cpus=2", *TINY_RUN, *outputs(tmp_path, shared_cache)]
    done = subprocess.run([sys.executable, "-m", "harness", "sweep", *overrides], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    url = f"sqlite:///{tmp_path / 'results' / 'harness.db'}"
    rows = [r for r in ResultsStore(url).query() if r["sweep_id"]]
    distilled = [r for r in rows if r["methods"] == "prob_mse"]
    assert distilled and all(r["status"] == "completed" for r in rows), [(r["run_id"], r["status"]) for r in rows]
    assert {r["dataset"] for r in rows} == {"my_streets"}


# ------------------------------------------------------------------------------ registration
@pytest.fixture
def clean_registries(monkeypatch):
    """Plug-ins registered by a test leave the process's registries as they were."""
    import harness.data as data
    import harness.methods as methods
    import harness.plugins as plugins

    saved = (dict(methods.METHODS), dict(methods._SOURCES), dict(data.DATASETS), dict(data.CONFIGS),
             dict(data._SOURCES), dict(plugins._loaded), set(plugins._entry_points_loaded), list(sys.path))
    yield
    for target, value in zip((methods.METHODS, methods._SOURCES, data.DATASETS, data.CONFIGS, data._SOURCES,
                              plugins._loaded), saved):
        target.clear()
        target.update(value)
    plugins._entry_points_loaded = saved[6]
    sys.path[:] = saved[7]


METHOD = textwrap.dedent('''
    from dataclasses import dataclass
    from harness.methods import Method, register
    from harness.params import param

    @register
    class Clash(Method):
        name = "{name}"

        @dataclass
        class Config:
            weight: float = param(1.0, kind="weight", low=0)

        def terms(self, student, teacher, batch, progress):
            return {{"{name}": (student.logits - teacher.logits).pow(2).mean()}}
''')


def test_a_method_name_that_is_taken_is_refused_naming_both_sources(tmp_path, clean_registries):
    (tmp_path / "clash.py").write_text(METHOD.format(name="kd"))
    with pytest.raises(ConfigError, match=r"method 'kd' is registered twice: by built-in \(harness\.methods\.kd\) "
                                          r"and by plugins entry '.*clash\.py'"):
        load_config([f"plugins=[{tmp_path / 'clash.py'}]"])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "one.py").write_text(METHOD.format(name="twin"))
    (tmp_path / "b" / "two.py").write_text(METHOD.format(name="twin"))
    with pytest.raises(ConfigError) as e:
        load_config([f"plugins=[{tmp_path / 'a'},{tmp_path / 'b' / 'two.py'}]", "+method=twin"])
    assert "method 'twin' is registered twice" in str(e.value)
    assert str(tmp_path / "a") in str(e.value) and str(tmp_path / "b" / "two.py") in str(e.value)


def test_loading_the_same_plug_in_twice_is_harmless(tmp_path, clean_registries):
    (tmp_path / "once.py").write_text(METHOD.format(name="once"))
    for _ in range(2):
        cfg = load_config([f"plugins=[{tmp_path / 'once.py'}]", "+method=once", "method.once.weight=2"])
    assert cfg["method"] == {"once": {"weight": 2.0}} and cfg["plugins"] == [str(tmp_path / "once.py")]


def test_reproduce_loads_the_plug_ins_its_run_was_trained_with(tmp_path, monkeypatch, clean_registries, capsys):
    """`reproduce <id>` of a plug-in method's run: the row's stored `plugins:` are loaded before the
    configuration is rebuilt (a fresh process knows only the built-in methods); a plug-in that has
    gone since is a ConfigError naming it, never an 'unknown method'."""
    import harness.methods as methods
    import harness.reproduce as rep

    (tmp_path / "mine.py").write_text(METHOD.format(name="from_the_row"))
    row = {"run_id": "r1", "arm": "distilled", "seed": 1, "split": "val", "status": "completed", "final_miou": 0.5,
           "config_json": {"plugins": [str(tmp_path / "mine.py")]}, "config_hash": "h", "created_at": "",
           "git_commit": ""}
    seen = []

    def reproduce(row_, current, device, command):
        seen.append("from_the_row" in methods.METHODS)
        return {"new": {"split": "val", "final_miou": 0.5, "status": "completed"}, "same": {"final_miou": True},
                "config": {"device": "cpu", "threads": 1}}

    monkeypatch.setattr(rep, "runs_behind", lambda store, ident: ([row], "run r1"))
    monkeypatch.setattr(rep, "reproduce", reproduce)
    store = tmp_path / "runs.jsonl"
    store.write_text("")
    assert "from_the_row" not in methods.METHODS
    assert rep.main(["r1", f"store.url={store}"]) == 0 and seen == [True]
    row["config_json"]["plugins"] = [str(tmp_path / "gone.py")]
    with pytest.raises(ConfigError, match=r"gone\.py"):
        rep.main(["r1", f"store.url={store}"])
    assert seen == [True]


@pytest.mark.parametrize("entry, message", [
    ("no_such_plugin_module", "plugins entry 'no_such_plugin_module': no module named 'no_such_plugin_module'"),
    ("./no_such_file.py", "no such file or folder"),
])
def test_a_missing_plug_in_is_a_config_error(entry, message, clean_registries):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([f"plugins=[{entry}]"])


def test_a_missing_plug_in_exits_2_through_the_cli(capsys, clean_registries):
    from harness.cli import main

    assert main(["train", "plugins=[no_such_plugin_module]"]) == 2
    assert "no module named 'no_such_plugin_module'" in capsys.readouterr().err


def test_a_broken_plug_in_names_its_error(tmp_path, clean_registries):
    (tmp_path / "broken.py").write_text("import not_installed_dependency_xyz\n")
    with pytest.raises(ConfigError, match=r"broken\.py' failed to import: ModuleNotFoundError"):
        load_config([f"plugins=[{tmp_path / 'broken.py'}]"])


def test_an_unknown_plug_in_method_lists_the_registered_ones(tmp_path, clean_registries):
    (tmp_path / "extra.py").write_text(METHOD.format(name="extra_l2"))
    with pytest.raises(ConfigError, match=r"extra_l2"):
        load_config([f"plugins=[{tmp_path / 'extra.py'}]", "+method=extra_l3"])


def test_entry_points_register_methods_and_datasets(tmp_path, monkeypatch, clean_registries):
    import harness.plugins as plugins
    from harness.data import build_dataset

    (tmp_path / "ep_kd.py").write_text(METHOD.replace("@register\n", "").format(name="ep_kd") + textwrap.dedent('''
        from dataclasses import dataclass as _dc, field as _field
        from typing import Dict, List
        from harness.data import SyntheticStreets
        from harness.data.synthetic import DEFAULT_CONFIG as _D

        class EpStreets(SyntheticStreets):
            @_dc
            class Config:
                name: str = "ep_streets"
                num_classes: int = _D["num_classes"]
                ignore_index: int = 255
                image_size: List[int] = _field(default_factory=lambda: [32, 32])
                sizes: Dict[str, int] = _field(default_factory=lambda: {"train": 4, "tune": 2, "val": 2})
                seed: int = 0
                mean: List[float] = _field(default_factory=lambda: list(_D["mean"]))
                std: List[float] = _field(default_factory=lambda: list(_D["std"]))
                class_names: List[str] = _field(default_factory=lambda: list(_D["class_names"]))
    '''))
    info = tmp_path / "ep_kd-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-kd\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[harness.methods]\nep_kd = ep_kd:Clash\n\n"
                                           "[harness.datasets]\nep_streets = ep_kd:EpStreets\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins._entry_points_loaded.clear()
    cfg = load_config(["+method=ep_kd", "dataset=ep_streets", "budget=smoke"])
    assert cfg["method"] == {"ep_kd": {"weight": 1.0}} and cfg["dataset"]["name"] == "ep_streets"
    from harness.methods import source

    assert source("ep_kd").startswith("entry point 'ep_kd = ep_kd:Clash'")
    assert len(build_dataset(cfg["dataset"], "val", cache_dir=str(tmp_path / "cache"))) == 2


# ------------------------------------------------------------------------- the folder dataset
def folder_yaml(tmp_path: Path, **changes) -> Path:
    """A plug-in folder with dataset/streets.yaml over tmp_path/data (made by make_streets)."""
    spec = {"name": "streets", "type": "folder", "root": str(tmp_path / "data"), "img_dir": "images",
            "ann_dir": "labels", "class_names": ["road", "car", "sky"], "tune_fraction": 0.25, **changes}
    (tmp_path / "conf" / "dataset").mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / "dataset" / "streets.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "conf"


def test_the_folder_dataset_reads_its_splits_classes_and_palette(tmp_path, clean_registries):
    from harness.data import build_dataset

    make_streets(tmp_path / "data")
    conf = folder_yaml(tmp_path, palette=[[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    cfg = load_config([f"plugins=[{conf}]", "dataset=streets"])
    assert cfg["dataset"]["num_classes"] == 3
    train, tune, val = (build_dataset(cfg["dataset"], s) for s in ("train", "tune", "val"))
    assert (len(train), len(tune), len(val)) == (6, 2, 2)
    assert val.class_names == ["road", "car", "sky"] and val.palette == [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    image, mask = val[0]
    assert tuple(image.shape) == (3, 32, 32) and set(mask.unique().tolist()) == {0, 1, 2, 255}
    assert np.allclose(val.class_frequencies().sum(), 1.0)


def test_the_folder_dataset_reads_split_lists(tmp_path, monkeypatch, clean_registries):
    from harness.data import build_dataset

    make_streets(tmp_path / "data")
    (tmp_path / "data" / "val.txt").write_text("val/val_001\n")
    folder_yaml(tmp_path, val_list="val.txt")
    monkeypatch.chdir(tmp_path)  # a folder named without a '/' is a folder, not a module name
    cfg = load_config(["plugins=[conf]", "dataset=streets"])
    assert cfg["plugins"] == [str(tmp_path / "conf")]
    val = build_dataset(cfg["dataset"], "val")
    assert [s.key for s in val.samples] == ["val/val_001"]


def test_folder_dataset_mistakes_are_named(tmp_path, clean_registries):
    from harness.data import build_dataset

    make_streets(tmp_path / "data")
    conf = folder_yaml(tmp_path, ann_dir="annotations")
    with pytest.raises(ConfigError, match=r"dataset 'streets' \(type: folder\): the train labels folder .*annotations/train "
                                          r"does not exist"):
        load_config([f"plugins=[{conf}]", "dataset=streets"])

    conf = folder_yaml(tmp_path)
    orphan = tmp_path / "data" / "labels" / "train" / "lost.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(orphan)
    cfg = load_config([f"plugins=[{conf}]", "dataset=streets"])
    with pytest.raises(ConfigError, match=r"1 label file\(s\) have no image .*lost\.png"):
        build_dataset(cfg["dataset"], "train")
    orphan.unlink()

    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(tmp_path / "data" / "labels" / "val" / "val_000.png")
    val = build_dataset(cfg["dataset"], "val")
    with pytest.raises(ConfigError, match=r"val_000\.png holds value\(s\) \[7\], but there are 3 classes"):
        val[0]

    conf = folder_yaml(tmp_path, ignore_index=1)
    with pytest.raises(ConfigError, match=r"ignore_index=1 collides with a class id"):
        load_config([f"plugins=[{conf}]", "dataset=streets"])
    conf = folder_yaml(tmp_path, palette=[[0, 0, 0]])
    with pytest.raises(ConfigError, match=r"palette must give one \[r, g, b\] \(0-255\) per class \(3\)"):
        load_config([f"plugins=[{conf}]", "dataset=streets"])
