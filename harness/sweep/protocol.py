"""Tuning protocols as data: `sweeps/<name>.yaml` -> validated stages.

A stage names its arms, its search (`tpe` over distributions, `grid` over explicit values,
`combine` = the isolated winners of the stages it inherits, or reruns with `seeds`), its space,
its trial budget, its early stopping and the stages whose winners it inherits. `$temperatures`
and `$weights` expand to the selected methods' config paths, so one protocol serves every method.
Everything is checked before any work starts; a bad protocol raises ConfigError (exit 2).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from harness.config import PROJECT_ROOT
from harness.errors import ConfigError

SWEEPS_DIR = PROJECT_ROOT / "sweeps"
ARMS = ("student-only", "distilled")
RERUN = "rerun"  # the search kind of the stage whose rows are the evidence (fresh seeds, on val)
SEARCHES = ("tpe", "grid", "combine", RERUN)
PLACEHOLDERS = {"$temperatures": "temperature", "$weights": "weight"}  # -> the methods' settings of that kind
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid", "grid_scale")


@dataclass
class Stage:
    name: str
    arms: List[str]
    search: str                          # tpe | grid | combine | rerun
    space: Dict[str, Dict[str, Any]]     # config path (or $placeholder) -> distribution
    trials: Optional[int] = None         # tpe only
    inherits: List[str] = field(default_factory=list)
    early_stopping: Optional[str] = None  # asha | None
    each: bool = False                   # one sub-stage per expanded path
    seeds: Optional[int] = None          # reruns
    split: str = "tune"


@dataclass
class Protocol:
    name: str
    metric: str
    sampler_seed: int
    tpe_startup_trials: int
    asha: Dict[str, int]
    stages: List[Stage]
    raw: Dict[str, Any]


def sub_stage_name(stage: str, path: str) -> str:
    """The stage name of one path of an `each` stage: `weights[method.kd.weight]`."""
    return f"{stage}[{path}]"


def parse_stage_name(name: str) -> Tuple[str, Optional[str]]:
    """(stage, path) of a stored stage name; path is None for a whole stage. Inverse of `sub_stage_name`."""
    if name.endswith("]") and "[" in name:
        stage, _, path = name[:-1].partition("[")
        return stage, path
    return name, None


def rerun_stages(protocol: "Protocol") -> List[str]:
    """Names of the protocol's rerun stages (search kind `rerun`), in order."""
    return [s.name for s in protocol.stages if s.search == RERUN]


def available_protocols(sweeps_dir: Path = SWEEPS_DIR) -> List[str]:
    return sorted(p.stem for p in sweeps_dir.glob("*.yaml"))


def load_protocol(name: str, sweeps_dir: Path = SWEEPS_DIR) -> Protocol:
    """`name` is a protocol of sweeps/ (`default`) or the path of a protocol file."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else sweeps_dir / f"{name}.yaml"
    if not path.is_file():
        choices = available_protocols(sweeps_dir)
        close = difflib.get_close_matches(name, choices, n=1)
        raise ConfigError(f"unknown sweep protocol '{name}'. Valid protocols (sweeps/*.yaml): "
                          f"{', '.join(choices)}." + (f" Did you mean '{close[0]}'?" if close else ""))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep protocol {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_protocol(raw, str(path))


def parse_protocol(raw: Dict[str, Any], where: str = "protocol") -> Protocol:
    known = {"name", "metric", "sampler_seed", "tpe_startup_trials", "asha", "stages", "description"}
    _no_unknown(raw, known, where)
    if raw.get("metric", "miou") != "miou":
        raise ConfigError(f"{where}: metric must be 'miou' (the mean IoU on the tune split)")
    stages_raw = raw.get("stages") or []
    if not stages_raw:
        raise ConfigError(f"{where}: no stages")
    stages: List[Stage] = []
    for i, s in enumerate(stages_raw):
        stages.append(_parse_stage(s, f"{where}, stage {i + 1}", [st.name for st in stages]))
    asha = {"grace_period": 1, "reduction_factor": 2, **(raw.get("asha") or {})}
    return Protocol(name=raw.get("name", Path(where).stem), metric="miou",
                    sampler_seed=int(raw.get("sampler_seed", 0)),
                    tpe_startup_trials=int(raw.get("tpe_startup_trials", 3)),
                    asha=asha, stages=stages, raw=raw)


def _parse_stage(s: Dict[str, Any], where: str, earlier: List[str]) -> Stage:
    known = {"name", "arms", "search", "space", "trials", "inherits", "early_stopping", "each", "seeds", "split"}
    _no_unknown(s, known, where)
    name = s.get("name")
    if not name:
        raise ConfigError(f"{where}: every stage needs a name")
    where = f"{where.rsplit(',', 1)[0]}, stage '{name}'"
    if name in earlier:
        raise ConfigError(f"{where}: two stages are named '{name}'")
    arms = list(s.get("arms") or [])
    bad = [a for a in arms if a not in ARMS]
    if not arms or bad:
        raise ConfigError(f"{where}: arms must be a non-empty subset of {list(ARMS)}, got {arms}")
    for parent in s.get("inherits") or []:
        if parent not in earlier:
            raise ConfigError(f"{where} inherits from '{parent}', which is not an earlier stage "
                              f"(earlier stages: {', '.join(earlier) or 'none'})")
    stage = Stage(name=name, arms=arms, search=s.get("search", RERUN if s.get("seeds") else ""),
                  space=dict(s.get("space") or {}), trials=s.get("trials"), inherits=list(s.get("inherits") or []),
                  early_stopping=s.get("early_stopping"), each=bool(s.get("each", False)),
                  seeds=s.get("seeds"), split=s.get("split", "val" if s.get("seeds") else "tune"))
    if stage.search == RERUN:
        if not isinstance(stage.seeds, int) or stage.seeds < 1:
            raise ConfigError(f"{where}: seeds must be a positive integer")
        return stage
    if stage.search not in SEARCHES:
        raise ConfigError(f"{where}: search must be one of {', '.join(SEARCHES)} (or give seeds: N for "
                          f"reruns), got '{stage.search}'")
    if stage.split != "tune":
        raise ConfigError(f"{where}: search stages choose on the tune split; only reruns report on val")
    if stage.early_stopping not in (None, "asha"):
        raise ConfigError(f"{where}: early_stopping must be asha or absent, got '{stage.early_stopping}'")
    if stage.search == "combine":
        if not stage.inherits:
            raise ConfigError(f"{where}: a combine stage combines the winners of the stages it inherits")
        return stage
    if not stage.space:
        raise ConfigError(f"{where}: empty search space")
    for path, dist in stage.space.items():
        _check_distribution(path, dist, stage.search, where)
    if stage.search == "tpe" and (not isinstance(stage.trials, int) or stage.trials < 1):
        raise ConfigError(f"{where}: a tpe stage needs trials: N (N >= 1)")
    return stage


def _check_distribution(path: str, dist: Any, search: str, where: str) -> None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: '{path}' must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
                          f"{{choice: [values]}}, {{grid: [values]}}, {{grid_scale: [factors]}}; got {dist}")
    kind, values = next(iter(dist.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: '{path}': {kind} needs a non-empty list (empty search space)")
    if kind in ("loguniform", "uniform"):
        if len(values) != 2 or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
            raise ConfigError(f"{where}: '{path}': {kind} needs [low, high] with "
                              f"{'0 < ' if kind == 'loguniform' else ''}low < high, got {values}")
    grid_kind = kind in ("grid", "grid_scale")
    if grid_kind != (search == "grid"):
        raise ConfigError(f"{where}: '{path}': {kind} does not fit search '{search}' "
                          f"(grid stages take grid/grid_scale, tpe stages distributions)")
    if kind == "grid_scale" and not path.startswith("$"):
        raise ConfigError(f"{where}: grid_scale (multiples of a default) only applies to $weights/$temperatures")
    if path.startswith("$") and path not in PLACEHOLDERS:
        raise ConfigError(f"{where}: unknown placeholder '{path}' (known: {', '.join(PLACEHOLDERS)})")


def _no_unknown(d: Dict[str, Any], known: set, where: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(f"{where}: unknown key '{key}'. Valid keys: {', '.join(sorted(known))}."
                              + (f" Did you mean '{close[0]}'?" if close else ""))


# ------------------------------------------------------------------------------- expansion
def method_paths(cfg: Dict[str, Any], kind: str) -> Dict[str, float]:
    """Config paths (and default values) of the selected methods' temperatures (`$temperatures`) or
    loss weights (`$weights`), as the methods' Config metadata declares them (kind `temperature` /
    `weight`; `aux_weight`s are not tuned). A temperature whose gate weights are all 0 (its term
    switched off, e.g. cwd `feature_tau` while `feature_weight` is 0) is left out."""
    from harness.methods import paths_of_kind

    return paths_of_kind(cfg.get("method") or {}, PLACEHOLDERS[kind])


def expand_space(space: Dict[str, Dict[str, Any]], cfg: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Replace placeholders by the concrete paths of this config; grid_scale -> grid of multiples.
    A weight whose default is 0 (a term switched off) is not searched."""
    out: Dict[str, Dict[str, Any]] = {}
    for path, dist in space.items():
        if not path.startswith("$"):
            out[path] = dist
            continue
        kind, values = next(iter(dist.items()))
        for concrete, default in method_paths(cfg, path).items():
            if kind == "grid_scale":
                if default == 0:
                    continue
                out[concrete] = {"grid": [round(default * f, 10) for f in values]}
            elif kind == "grid" and path == "$temperatures" and 0 < default < 1:
                # a similarity temperature (contrastive terms: 0.07, 0.1), not a softening one: the
                # same grid as multiples of its default, not [1, 2, 4, 8] themselves
                out[concrete] = {"grid": [round(default * v, 10) for v in values]}
            else:
                out[concrete] = dist
    return out


def check_paths(space: Dict[str, Dict[str, Any]], cfg: Dict[str, Any], where: str) -> None:
    for path in space:
        node = cfg
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{where}: '{path}' is not a config path of this run")
            node = node[part]
