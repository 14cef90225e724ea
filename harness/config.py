"""Compose, validate and hash an experiment configuration.

`load_config(overrides)` composes `conf/` with Hydra 1.3's compose API (no `hydra.main`, so no
working-directory change and no subcommand clash), validates every section against the schemas
below and returns a plain dict: the only form the rest of the harness (and Ray workers) sees.

Validation happens before any work starts: a misspelt key, a value of the wrong type, an unknown
option of a config group or an out-of-range number raises `ConfigError`, whose message names the
valid choices. The CLI turns it into one paragraph and exit code 2.

`run_hash(cfg)` is a stable hash of the parts that define a run (data, models, method, optimiser,
budget, seed, splits); paths, device, threads and logging do not change it.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.errors import ConfigError
from harness.params import check_finite, check_schema, param

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
GROUPS = ("dataset", "student", "teacher", "method", "optim", "budget")
SPLITS = ("train", "tune", "val")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
TEACHER_CHECKPOINT_FORMATS = ("auto", "harness", "torchvision", "mmseg", "cirkd")  # = harness.models.convert.FORMATS
PRETRAINED_SOURCES = ("hub", "imagenet")  # student.pretrained=hub: torchvision's file in the local torch hub cache
# The keys that define what a run computes; everything else (paths, device, logging) does not.
RUN_DEFINING_KEYS = ("dataset", "student", "teacher", "method", "optim", "budget", "seed",
                     "train_split", "eval_split", "precision")


# --------------------------------------------------------------------------------------- schemas
@dataclass
class ModelConfig:
    name: str = MISSING
    backbone: str = MISSING
    head: str = MISSING
    output_stride: int = 8
    head_channels: int = param(128, low=1)
    width: float = 1.0  # channel multiplier of the backbone (CPU presets); 1.0 = the papers' models
    aux: bool = True
    aux_weight: float = param(0.4, low=0)
    dropout: float = param(0.1, low=0, high=1, high_open=True)
    pretrained: Optional[str] = None  # null/false, hub (local torch hub cache) or a state-dict path; never downloaded


TEACHER_THREADS = 2  # teacher.train.threads by default: what the sweep's driver trained teachers with


@dataclass
class TeacherTrainConfig:
    """How the harness trains a teacher that is not given as a checkpoint."""
    lr: float = param(0.02, low=0, low_open=True, high=1000)
    weight_decay: float = param(1e-4, low=0)
    momentum: float = param(0.9, low=0, high=1, high_open=True)
    seed: int = param(0, low=0)  # one teacher serves every student seed
    # torch threads the teacher trains with, whatever the calling run's `threads` (a sweep's trials run
    # with 1): on a CPU the weights depend on the thread count, and a teacher is one artefact per cache
    # key. Left out of the resolved config at the default, so keys and hashes from before it are unchanged.
    threads: int = param(TEACHER_THREADS, low=1, high=1024)


@dataclass
class TeacherConfig(ModelConfig):
    checkpoint: Optional[str] = None  # a trained teacher (state dict); null = train or reuse the cache
    # whose key names teacher.checkpoint uses (harness/models/convert.py); auto detects them. Left out of
    # the resolved config while auto, so configs and run hashes from before this field are unchanged.
    checkpoint_format: str = param("auto", choices=TEACHER_CHECKPOINT_FORMATS)
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = param(0.01, low=0, low_open=True, high=1000)
    momentum: float = param(0.9, low=0, high=1, high_open=True)
    weight_decay: float = param(1e-4, low=0)
    nesterov: bool = False
    poly_power: float = param(0.9, low=0)
    grad_clip_norm: Optional[float] = param(None, low=0, low_open=True)


@dataclass
class BudgetConfig:
    name: str = MISSING
    iterations: int = param(MISSING, low=0, low_open=True)
    batch_size: int = param(MISSING, low=0, low_open=True)
    crop_size: List[int] = MISSING
    scale_range: List[float] = field(default_factory=lambda: [0.5, 2.0])
    flip: bool = True
    eval_interval: int = param(MISSING, low=0, low_open=True)
    eval_batch_size: int = param(16, low=0, low_open=True)
    max_eval_images: Optional[int] = param(None, low=1)  # evaluate on the first N images of the split (smoke tests)
    teacher_iterations: int = param(MISSING, low=0, low_open=True)
    teacher_batch_size: int = param(MISSING, low=0, low_open=True)
    sweep_max_trials: Optional[int] = param(None, low=1)   # caps every search stage's trials (smoke sweeps)
    sweep_rerun_seeds: Optional[int] = param(None, low=1)  # caps the number of rerun seeds (smoke sweeps)


@dataclass
class SyntheticDatasetConfig:
    name: str = "synthetic"
    num_classes: int = MISSING
    ignore_index: int = 255
    image_size: List[int] = MISSING
    sizes: Dict[str, int] = MISSING
    seed: int = 0
    mean: List[float] = MISSING
    std: List[float] = MISSING
    class_names: List[str] = MISSING
    recipe_crops: Dict[str, List[int]] = field(default_factory=dict)  # recipe name -> training crop


@dataclass
class FolderDatasetConfig:
    """Datasets read from disk (harness/data/folder.py); each yaml comments every key."""
    name: str = MISSING
    root: Optional[str] = None  # the user's copy; required, never downloaded
    num_classes: int = MISSING
    ignore_index: int = 255
    class_names: List[str] = MISSING
    mean: List[float] = MISSING
    std: List[float] = MISSING
    crop_size: List[int] = MISSING  # the papers' training crop (budget.crop_size is what a run uses)
    eval_size: Optional[List[int]] = None
    eval_mode: str = "whole"  # whole | pad | resize | slide
    eval_crop: Optional[List[int]] = None    # eval_mode=slide: window [h, w]
    eval_stride: Optional[List[int]] = None  # eval_mode=slide: step [h, w], <= eval_crop
    tune_fraction: float = 0.1
    tune_size: Optional[int] = None  # a count; overrides tune_fraction
    tune_seed: int = 0
    recipe_crops: Dict[str, List[int]] = field(default_factory=dict)  # recipe name -> training crop


@dataclass
class CityscapesDatasetConfig(FolderDatasetConfig):
    name: str = "cityscapes"


@dataclass
class VOCDatasetConfig(FolderDatasetConfig):
    name: str = "voc"
    train_aug: str = "none"  # none | SegmentationClassAug | sbd
    aug_list: str = "ImageSets/Segmentation/train_aug.txt"
    sbd_root: Optional[str] = None


@dataclass
class ADE20KDatasetConfig(FolderDatasetConfig):
    name: str = "ade20k"


@dataclass
class CamVidDatasetConfig(FolderDatasetConfig):
    name: str = "camvid"
    train_folders: List[str] = field(default_factory=lambda: ["train"])
    val_folder: str = "val"


@dataclass
class ConfigFolderDatasetConfig(FolderDatasetConfig):
    """A dataset described by its yaml alone (`type: folder`, harness/data/folder.py ConfigFolder;
    mmsegmentation's img_dir / ann_dir / classes / palette). Paths are relative to `root` when it is
    set, else to the working directory."""
    name: str = MISSING
    type: str = "folder"
    num_classes: Optional[int] = None        # default: len(class_names)
    img_dir: str = MISSING                   # folder of the images (with train_dir/ val_dir/ inside)
    ann_dir: str = MISSING                   # folder of the label PNGs (class ids), same layout and names
    img_suffix: str = ".png"
    ann_suffix: str = ".png"                 # mmsegmentation's seg_map_suffix
    train_dir: Optional[str] = "train"       # sub-folder of img_dir/ann_dir; "" or null = the folders themselves
    val_dir: Optional[str] = "val"
    train_list: Optional[str] = None         # a text file of keys (paths under img_dir without suffix) instead of train_dir
    val_list: Optional[str] = None
    palette: Optional[List[List[int]]] = None  # one [r, g, b] per class; null = the VOC colour map
    reduce_zero_label: bool = False          # label 0 = ignore, k = class k-1 (ADE20K-style files)
    mean: List[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])  # ImageNet, RGB 0-255 units
    std: List[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    crop_size: List[int] = field(default_factory=lambda: [512, 512])  # the training crop a recipe would use


@dataclass
class PathsConfig:
    results: str = "results"
    reports: str = "reports"
    cache: str = "results/cache"


@dataclass
class StoreConfig:
    url: Optional[str] = None  # null = sqlite database in the results folder


@dataclass
class EnergyConfig:
    enabled: bool = True
    country_iso_code: str = "DEU"
    carbon_intensity_g_per_kwh: Optional[float] = param(None, low=0)  # force a fixed intensity (comparability)
    measure_power_secs: int = param(15, low=1)
    gpu_share: Optional[float] = param(None, low=0, low_open=True, high=1)  # fraction of a GPU this run holds; the sweep sets it from gpus_per_trial


@dataclass
class RayConfig:
    address: Optional[str] = None
    num_cpus: Optional[int] = param(None, low=1)


@dataclass
class SweepConfig:
    protocol: str = "default"
    max_concurrent_trials: int = param(2, low=1)
    cpus_per_trial: int = param(1, low=1)
    gpus_per_trial: float = param(0.0, low=0)
    max_failures: int = param(1, low=0)
    collapse_fraction: float = param(0.5, low=0, high=1)
    estimate_tflops: float = param(100.0, low=0, low_open=True)  # effective training TFLOP/s of one GPU, for the --dry-run estimate
    # every trial also recorded in an Optuna study of this RDB storage (optuna-dashboard URL);
    # auto: sqlite:///<paths.results>/optuna.db; null: none (harness/sweep/studies.py)
    optuna_storage: Optional[str] = param("auto", doc="SQLAlchemy URL of the Optuna storage the sweep records "
                                          "its studies in; auto: sqlite:///<paths.results>/optuna.db; null: none")
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class ReportConfig:
    min_seeds: int = param(3, low=0, low_open=True)  # tables mark comparisons with fewer rerun seeds per arm
    after_sweep: bool = True  # regenerate leaderboard, tables and figures when a sweep ends
    measure: bool = True  # measure models now (latency, inference energy, teacher entropy); false: the database only
    remeasure: bool = False  # measure the latency again and replace the stored one (<paths.cache>/efficiency/)


@dataclass
class CheckpointConfig:  # harness/engine/checkpoint.py
    final: bool = True  # save every run's final student: <paths.results>/checkpoints/<run_id>/final.pt
    every: int = param(0, low=0)  # also save the whole training state every N iterations (0: only on Ctrl-C)
    keep_last: int = param(1, low=1)  # training states kept on disk while the run trains


@dataclass
class ShowConfig:  # python -m harness show
    retrain: bool = False  # retrain the students even when their runs saved final.pt


@dataclass
class TopConfig:
    seed: int = param(0, low=0)
    plugins: List[str] = field(default_factory=list)  # modules, .py files or folders loaded first (harness/plugins.py)
    train_split: str = "train"
    eval_split: str = "val"
    recipe: str = "none"  # the training protocol group (conf/recipe/): none | cirkd | niemann2023
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = False
    cudnn_benchmark: bool = False
    threads: int = param(2, low=0, low_open=True)
    num_workers: int = param(0, low=0)
    deterministic: bool = True
    progress: bool = True
    paths: PathsConfig = field(default_factory=PathsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    show: ShowConfig = field(default_factory=ShowConfig)
    tensorboard: bool = True  # event files per run in <paths.results>/tensorboard/ (needs the tensorboard package)


DATASET_SCHEMAS: Dict[str, type] = {"synthetic": SyntheticDatasetConfig, "cityscapes": CityscapesDatasetConfig,
                                    "voc": VOCDatasetConfig, "ade20k": ADE20KDatasetConfig,
                                    "camvid": CamVidDatasetConfig, "folder": ConfigFolderDatasetConfig}
SECTION_SCHEMAS: Dict[str, type] = {"student": ModelConfig, "teacher": TeacherConfig,
                                    "optim": OptimConfig, "budget": BudgetConfig}


# ------------------------------------------------------------------------------------- compose
_PLUGIN_CONF_DIRS: List[Path] = []  # folders of config groups named in `plugins:` (Hydra's search path)


def available_options(group: str, conf_dir: Path = CONF_DIR) -> List[str]:
    """The options of a config group: conf/'s yaml files, plug-in folders' and registered plug-ins."""
    import sys

    found = {p.stem for d in (conf_dir, *_PLUGIN_CONF_DIRS) for p in (d / group).glob("*.yaml")}
    registry = {"method": ("harness.methods", "METHODS"), "dataset": ("harness.data", "CONFIGS")}.get(group)
    if registry and registry[0] in sys.modules:  # plug-ins register only after their registry is imported
        found |= set(getattr(sys.modules[registry[0]], registry[1]))
    return sorted(found)


def load_config(overrides: List[str] | tuple = (), conf_dir: Path | str | None = None,
                check_data: bool = True) -> Dict[str, Any]:
    """Compose `conf/config.yaml` with Hydra overrides, validate, return a plain resolved dict.
    `check_data=False` skips the check of a dataset's files on disk (for plans: `sweep --dry-run`)."""
    conf_dir = Path(conf_dir or os.environ.get("HARNESS_CONF_DIR") or CONF_DIR).resolve()
    if not (conf_dir / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {conf_dir}; the harness expects its conf/ folder there")
    overrides = list(overrides) + _load_plugins(list(overrides), conf_dir)
    composed = _compose(overrides, conf_dir)
    raw = OmegaConf.to_container(composed, resolve=True, throw_on_missing=True)
    cfg = validate(raw, conf_dir, check_data)
    _absolutise_paths(cfg)
    return cfg


def _load_plugins(overrides: List[str], conf_dir: Path) -> List[str]:
    """Load the entry points and the `plugins:` list before composing (plug-ins add config options);
    return the override that puts plug-in config folders on Hydra's search path (none: [])."""
    from harness import plugins

    entries = plugins.from_overrides(overrides, conf_dir)
    plugins.load(entries)
    folders = plugins.search_path(entries)
    _PLUGIN_CONF_DIRS[:] = [Path(f) for f in folders]
    if not folders or any(o.split("=", 1)[0].lstrip("+") == "hydra.searchpath" for o in overrides):
        return []
    return ["hydra.searchpath=[" + ",".join(f"file://{f}" for f in folders) + "]"]


def _compose(overrides: List[str], conf_dir: Path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from hydra.core.global_hydra import GlobalHydra

    _check_override_syntax(overrides, conf_dir)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except MissingConfigException as e:
        raise ConfigError(_explain_missing(str(e), conf_dir)) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain_hydra(str(e), overrides, conf_dir)) from None
    except OSError as e:  # Hydra looks an override's group up as a file: a 5000-character key is ENAMETOOLONG
        long = max(overrides, key=len) if overrides else ""
        raise ConfigError(f"an override could not be read as a config key or group ({e.strerror}): "
                          f"'{long[:60]}...' ({len(long)} characters). Keys are short dotted names such as "
                          f"optim.lr; python -m harness config --info lists the groups.") from None


def _check_override_syntax(overrides: List[str], conf_dir: Path) -> None:
    """Catch the mistakes Hydra reports least clearly, before it parses."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"'{ov}' is not an override: write key=value (e.g. optim.lr=0.02), "
                              f"group=option (e.g. student=deeplabv3_mobilenetv2) or +method=NAME")
        key = ov.split("=", 1)[0].lstrip("+~")
        if key == "method" and not ov.startswith(("+", "~")):
            raise ConfigError(f"methods are added, not replaced: write '+{ov}' "
                              f"(available methods: {', '.join(available_options('method', conf_dir))})")
        if key.startswith("method.") and not any(o.lstrip("+").startswith("method=") for o in overrides):
            name = key.split(".")[1]
            raise ConfigError(f"'{ov}' sets a parameter of method '{name}', but no method is selected: "
                              f"add +method={name} (available methods: "
                              f"{', '.join(available_options('method', conf_dir))})")


def _explain_missing(msg: str, conf_dir: Path) -> str:
    m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    if m:
        group, option = m.groups()
        choices = available_options(group, conf_dir)
        close = difflib.get_close_matches(option, choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"unknown {group} '{option}'. Valid choices for {group}: {', '.join(choices)}.{hint}"
    return " ".join(msg.split())


def _explain_hydra(msg: str, overrides: List[str], conf_dir: Path) -> str:
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    if m:
        return _unknown_key_message(m.group(1), overrides, conf_dir)
    m = re.search(r"Could not append to config. An item is already at '([^']+)'", msg)
    if m:
        return f"'{m.group(1)}' already exists; set it without the leading '+'."
    if "LexerNoViableAltException" in msg or "token recognition error" in msg:
        bad = next((o for o in overrides if any(ord(c) > 127 or c in "\"'$" for c in o)), "")
        quoted = bad.split("=", 1)[0] + "='" + bad.split("=", 1)[1] + "'" if "=" in bad else bad
        return (f"the override '{bad or ' '.join(overrides)}' is not valid Hydra override syntax (characters outside "
                f"Hydra's unquoted grammar, e.g. non-ASCII letters or quotes). Quote the value"
                + (f" ({quoted})" if bad else "") + "; names of config options are plain ASCII (python -m harness "
                f"config --info lists them).")
    m = re.search(r"Ambiguous value for argument '([^']+)'", msg)
    if m:  # Hydra's own hint recommends --multirun, which the harness does not use
        key = m.group(1).split("=", 1)[0]
        return (f"'{m.group(1)}' gives several values. The harness does not run Hydra's --multirun: to tune "
                f"{key.lstrip('+')}, put it in a protocol's search space (sweeps/default.yaml) and run python -m "
                f"harness sweep, which tunes both arms equally; for a list value write {key}=[a,b]; to try a few "
                f"fixed values, run the command once per value.")
    return " ".join(msg.split())


def _unknown_key_message(path: str, overrides: List[str], conf_dir: Path) -> str:
    """Name the keys that do exist next to the misspelt one, read from the config without it."""
    parent, _, leaf = path.rpartition(".")
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != path]
    try:
        node = OmegaConf.select(_compose(rest, conf_dir), parent) if parent else _compose(rest, conf_dir)
        valid = sorted(node.keys()) if OmegaConf.is_dict(node) else []
    except ConfigError:
        valid = []
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean '{(parent + '.' if parent else '') + close[0]}'?" if close else ""
    where = f"'{parent}'" if parent else "the top level"
    return f"unknown config key '{path}'. Valid keys at {where}: {', '.join(valid)}.{hint}"


# ------------------------------------------------------------------------------------ validate
def validate(raw: Dict[str, Any], conf_dir: Path = CONF_DIR, check_data: bool = True) -> Dict[str, Any]:
    """Check every section against its schema and the harness's invariants; return the plain dict."""
    raw = dict(raw)
    groups = {g: raw.pop(g, None) for g in GROUPS}
    out: Dict[str, Any] = _against(TopConfig, raw, "")
    for group in ("dataset", "student", "teacher", "optim", "budget"):
        if groups[group] is None:
            raise ConfigError(f"config group '{group}' is missing; choose one of "
                              f"{', '.join(available_options(group, conf_dir))}")
    from harness.data import CONFIGS, check_config, kind_of

    ds_name = kind_of(groups["dataset"])
    schemas = {**DATASET_SCHEMAS, **CONFIGS}
    if ds_name not in schemas:
        raise ConfigError(f"dataset '{ds_name}' has no schema; known datasets: {', '.join(schemas)}")
    out["dataset"] = _against(schemas[ds_name], groups["dataset"], "dataset")
    if ds_name == "folder" and out["dataset"]["num_classes"] is None:
        out["dataset"]["num_classes"] = len(out["dataset"]["class_names"])

    try:
        check_config(out["dataset"], layout=check_data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for section, schema in SECTION_SCHEMAS.items():
        out[section] = _against(schema, groups[section], section)
    out["method"] = _validate_methods(groups["method"] or {}, conf_dir)
    check_finite(out)  # one rule for every number: NaN and infinities are refused everywhere
    for section, schema in {"": TopConfig, "dataset": schemas[ds_name], **SECTION_SCHEMAS}.items():
        check_schema(section, schema, out[section] if section else out)  # the ranges the schemas declare
    _check_invariants(out, check_data)
    if out["teacher"].get("checkpoint_format") == "auto":  # the default stays out of configs and hashes
        del out["teacher"]["checkpoint_format"]
    if out["teacher"]["train"].get("threads") == TEACHER_THREADS:  # likewise
        del out["teacher"]["train"]["threads"]
    return out


def _against(schema: type, section: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), section)
        return OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain_validation(e, schema, prefix)) from None


def _explain_validation(e: OmegaConfBaseException, schema: type, prefix: str) -> str:
    key = getattr(e, "full_key", "") or ""
    path = f"{prefix}.{key}" if prefix and key else (prefix or key)
    text = str(e).splitlines()[0]
    if "not in" in text or "Key '" in text and "not" in text:
        valid = [f.name for f in dataclasses.fields(schema)]
        leaf = path.rpartition(".")[2]
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" Did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else ""
        return f"unknown config key '{path}'. Valid keys in '{prefix or 'top level'}': {', '.join(valid)}.{hint}"
    if "Missing mandatory value" in text:
        return f"config value '{path}' is required but not set"
    expected = _expected_type(schema, key)
    return f"wrong type for '{path}': {text}" + (f" (expected {expected})" if expected else "")


def _expected_type(schema: type, key: str) -> str:
    leaf = key.split(".")[-1].split("[")[0]
    for f in dataclasses.fields(schema) if dataclasses.is_dataclass(schema) else []:
        if f.name == leaf:
            return str(f.type).replace("typing.", "")
    return ""


def _validate_methods(section: Dict[str, Any], conf_dir: Path) -> Dict[str, Any]:
    """Each selected method's section against its Config: keys and types (the schema), then the
    ranges, choices and cross-field rules its fields declare (`harness.params`)."""
    from harness.methods import METHODS
    from harness.params import check_section

    out = {}
    for name, params in section.items():
        if name not in METHODS:
            raise ConfigError(f"unknown method '{name}'. Valid methods: {', '.join(sorted(METHODS))}")
        out[name] = _against(METHODS[name].Config, params or {}, f"method.{name}")
        check_section(name, METHODS[name].Config, out[name])
    return out


def _check_invariants(cfg: Dict[str, Any], check_data: bool = True) -> None:
    """What relates values to each other or to the machine (single values: the schemas' ranges)."""
    b, o, d = cfg["budget"], cfg["optim"], cfg["dataset"]
    if len(b["crop_size"]) != 2 or min(b["crop_size"]) <= 0:
        raise ConfigError(f"'budget.crop_size' must be two positive integers [height, width], got {b['crop_size']}")
    lo, hi = (b["scale_range"] + [None, None])[:2]
    if len(b["scale_range"]) != 2 or not 0 < lo <= hi:
        raise ConfigError(f"'budget.scale_range' must be [low, high] with 0 < low <= high, got {b['scale_range']}")
    if o["name"] != "sgd":
        raise ConfigError(f"unknown optimiser '{o['name']}'. Valid choices for optim.name: sgd")
    for split_key in ("train_split", "eval_split"):
        if cfg[split_key] not in SPLITS:
            raise ConfigError(f"'{split_key}' must be one of {', '.join(SPLITS)}, got '{cfg[split_key]}'")
    if cfg["device"] not in DEVICES:
        raise ConfigError(f"'device' must be one of {', '.join(DEVICES)}, got '{cfg['device']}'")
    if cfg["precision"] not in PRECISIONS:
        raise ConfigError(f"'precision' must be one of {', '.join(PRECISIONS)}, got '{cfg['precision']}' "
                          f"(fp16 is not offered: it needs loss scaling, bf16 does not)")
    if len(d["class_names"]) != d["num_classes"]:
        raise ConfigError(f"dataset '{d['name']}' lists {len(d['class_names'])} class names "
                          f"but num_classes = {d['num_classes']}")
    _check_optuna_storage(cfg["sweep"].get("optuna_storage"))
    from harness.models import check_model_config

    for section in ("student", "teacher"):
        try:
            check_model_config(cfg[section])
        except ValueError as e:
            raise ConfigError(f"{section} '{cfg[section]['name']}': {e}") from None
        if check_data:
            _check_pretrained(cfg[section], section)


def _check_optuna_storage(url: Optional[str]) -> None:
    """`sweep.optuna_storage`: null, auto, or an SQLAlchemy URL (an RDB storage optuna-dashboard opens)."""
    if url is None or url == "auto":
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None
    if parsed is None or "://" not in url or parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"'sweep.optuna_storage' must be an SQLAlchemy URL of a database file or server "
                          f"(e.g. sqlite:///results/optuna.db), auto (sqlite:///<paths.results>/optuna.db) or null "
                          f"(no Optuna storage), got '{url}'")


def _absolutise_paths(cfg: Dict[str, Any]) -> None:
    """Relative paths are relative to where the command was started; trials must not care."""
    for key, value in cfg["paths"].items():
        cfg["paths"][key] = str(Path(value).expanduser().resolve())
    from harness.plugins import resolve

    cfg["plugins"] = resolve(cfg["plugins"])
    folder_paths = ("img_dir", "ann_dir", "train_list", "val_list")  # type: folder without a root: from here
    relative = folder_paths if cfg["dataset"].get("type") == "folder" and not cfg["dataset"].get("root") else ()
    for key in ("root", "sbd_root", *relative):  # trials may run in another working directory
        if cfg["dataset"].get(key):
            cfg["dataset"][key] = str(Path(cfg["dataset"][key]).expanduser().resolve())
    for section in ("student", "teacher"):
        if str(cfg[section].get("pretrained")).lower() in ("false", "none", "null", "no", ""):
            cfg[section]["pretrained"] = None          # random initialisation (paper 003's ablation)
        for key in ("pretrained", "checkpoint"):
            value = cfg[section].get(key)
            if value and not (key == "pretrained" and value in PRETRAINED_SOURCES):
                cfg[section][key] = str(Path(value).expanduser().resolve())
    if cfg["store"]["url"] is None:
        cfg["store"]["url"] = "sqlite:///" + str(Path(cfg["paths"]["results"]) / "harness.db")
    if cfg["sweep"].get("optuna_storage") == "auto":
        cfg["sweep"]["optuna_storage"] = "sqlite:///" + str(Path(cfg["paths"]["results"]) / "optuna.db")


def _check_pretrained(model: Dict[str, Any], section: str) -> None:
    """Backbone weights must be on this machine before anything starts (they are never downloaded)."""
    value = model.get("pretrained")
    if not value or str(value).lower() in ("false", "none", "null", "no"):
        return
    from harness.models.backbones import hub_weights

    if model.get("width", 1.0) != 1.0:
        raise ConfigError(f"{section}.pretrained: ImageNet weights fit the full-width backbone only, but "
                          f"{section} '{model['name']}' has width {model['width']}; use a full-width preset "
                          f"(e.g. {section}=pspnet_resnet18) or {section}.pretrained=false")
    try:
        path = hub_weights(model["backbone"]) if value in PRETRAINED_SOURCES else Path(value)
    except FileNotFoundError as e:
        raise ConfigError(f"{section}.pretrained: {e}") from None
    if not Path(path).is_file():
        raise ConfigError(f"{section}.pretrained: no file at {path}. Weights are never downloaded: give the path "
                          f"of a local torchvision-layout state dict, pretrained=hub for the torch hub cache, "
                          f"or pretrained=false for random initialisation")


# ---------------------------------------------------------------------------------------- hash
def stable_hash(obj: Any, length: int = 12) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def run_definition(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The parts of a config that define what a run computes (a student-only run has no teacher)."""
    part = {k: cfg.get(k) for k in RUN_DEFINING_KEYS}
    if not cfg.get("method"):
        part.pop("teacher")
    return part


def run_hash(cfg: Dict[str, Any]) -> str:
    return stable_hash(run_definition(cfg))


def methods_of(cfg: Dict[str, Any]) -> List[str]:
    return sorted(cfg.get("method") or {})


def arm_of(cfg: Dict[str, Any]) -> str:
    return "distilled" if cfg.get("method") else "student-only"
