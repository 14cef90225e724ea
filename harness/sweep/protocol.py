"""Tuning protocols as data: `sweeps/<name>.yaml` -> validated stages.

A stage names its arms, its search (`tpe` over distributions, `grid` over explicit values,
`combine` = the isolated winners of the stages it inherits, or reruns with `seeds`), its space,
its trial budget, its early stopping and the stages whose winners it inherits. `$temperatures`
and `$weights` expand to the selected methods' config paths, so one protocol serves every method.
Everything is checked before any work starts; a bad protocol raises ConfigError (exit 2).

Early stopping (`asha:` at the top, `early_stopping: asha` on a stage): Ray's ASHA, guarded so that
it cannot starve an arm (`runner.GuardedASHA`): every pruned stage of every arm ends with at least
`min_completed` trials not pruned (null: half its trials, at least 3, at most all of them); the
first pruning decision is at the first evaluation at or after `min_fraction` of training and after
the end of every selected method's warm-up. Grid stages run at full fidelity unless they say
`early_stopping: asha` together with `full_fidelity: false`. `grow: true` marks the student-only
arm's TPE stage that grows until the arm's tuning budget reaches the distilled arm's (budget.py).

Reruns: `seeds: N` (fixed), or `seeds: auto` with `target_halfwidth: H` (mIoU fraction: 0.01 = +-1
point), `max_seeds: M` and `min_seeds` (default 3): both arms rerun seeds 1, 2, ... together until the
paired 95 % interval of the lift has half-width <= H or M seeds ran (a rule on the width, never on p;
`budget.auto_seeds_decision`).

Compute-matched control (`search: compute_matched`, `measures: [time, energy]`, optional `matches:
<rerun stage>`, default the last rerun stage before it): the student-only arm's tuned configuration
rerun on the rerun stage's seeds and split with its iterations scaled by the measured cost ratio
distilled / student-only of the two arms' reruns (`budget.measured_cost_ratio`, `budget.scaled_budget`).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from harness.config import PROJECT_ROOT
from harness.errors import ConfigError

SWEEPS_DIR = PROJECT_ROOT / "sweeps"
ARMS = ("student-only", "distilled")
RERUN = "rerun"  # the search kind of the stage whose rows are the evidence (fresh seeds, on val)
COMPUTE_MATCHED = "compute_matched"  # the student-only arm rerun at the distilled arm's training compute
SEARCHES = ("tpe", "grid", "combine", RERUN, COMPUTE_MATCHED)
MEASURES = ("time", "energy")        # compute_matched: train seconds per iteration, kWh per run
AUTO = "auto"                        # seeds: auto (adaptive seeds)
AUTO_KEYS = ("target_halfwidth", "max_seeds", "min_seeds")
MIN_SEEDS_DEFAULT = 3
PLACEHOLDERS = {"$temperatures": "temperature", "$weights": "weight"}  # -> the methods' settings of that kind
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid", "grid_scale")
# asha: grace_period (evaluations), reduction_factor, min_fraction (of training before the first cut;
# 0.5: measured by benchmarks/fidelity_bias.py, README), min_completed (null: the default rule)
ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 2, "min_fraction": 0.5, "min_completed": None}


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
    seeds: Optional[Any] = None          # reruns: N, or "auto"
    split: str = "tune"
    full_fidelity: Optional[bool] = None  # grid stages: pruned only with early_stopping: asha + full_fidelity: false
    grow: bool = False                   # the student-only arm's growing TPE sequence (budget parity)
    target_halfwidth: Optional[float] = None  # seeds: auto
    max_seeds: Optional[int] = None
    min_seeds: int = MIN_SEEDS_DEFAULT
    measures: List[str] = field(default_factory=list)  # compute_matched
    matches: Optional[str] = None                       # compute_matched: the rerun stage it matches
    share_within: float = 0.0                           # compute_matched: measures whose ratios agree this closely share runs

    @property
    def auto_seeds(self) -> bool:
        return self.search == RERUN and self.seeds == AUTO

    @property
    def seeds_rule(self) -> Optional[Dict[str, Any]]:
        """What the rerun rows of an auto-seeds stage record (`stopped` is added when it stops)."""
        if not self.auto_seeds:
            return None
        return {"rule": AUTO, "target_halfwidth": self.target_halfwidth, "max_seeds": self.max_seeds,
                "min_seeds": self.min_seeds}

    @property
    def is_search(self) -> bool:
        """A stage that chooses hyperparameters (tpe, grid, combine); not reruns nor the compute-matched control."""
        return self.search not in (RERUN, COMPUTE_MATCHED)

    @property
    def prunes(self) -> bool:
        """Whether early stopping may stop this stage's trials: asha, and not a full-fidelity grid."""
        return self.early_stopping == "asha" and self.full_fidelity is not True and (
            self.search != "grid" or self.full_fidelity is False)


@dataclass
class Protocol:
    name: str
    metric: str
    sampler_seed: int
    tpe_startup_trials: int
    asha: Dict[str, Any]                 # ASHA_DEFAULTS, as the protocol sets them
    stages: List[Stage]
    raw: Dict[str, Any]

    def min_completed(self, trials: int) -> int:
        """Trials of a pruned stage (of one arm) that pruning must leave: `asha.min_completed`, or by
        default half the stage's trials, at least 3; never more than its trials."""
        wanted = self.asha["min_completed"]
        if wanted is None:
            wanted = max(3, math.ceil(trials / 2))
        return min(trials, int(wanted))

    @property
    def grow_stage(self) -> Optional[Stage]:
        """The student-only arm's growing stage (`grow: true`), if the protocol has one."""
        return next((s for s in self.stages if s.grow), None)


def sub_stage_name(stage: str, path: str) -> str:
    """The stage name of one path of an `each` stage: `weights[method.kd.weight]`."""
    return f"{stage}[{path}]"


def parse_stage_name(name: str) -> Tuple[str, Optional[str]]:
    """(stage, path) of a stored stage name; path is None for a whole stage. Inverse of `sub_stage_name`."""
    if name.endswith("]") and "[" in name:
        stage, _, path = name[:-1].partition("[")
        return stage, path
    return name, None


def hashed_stages(raw: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The raw stages that define the arms' rows (arm ids): all but the compute-matched controls, which
    add rows of their own and change none (so adding one keeps every stored arm)."""
    return [s for s in raw.get("stages") or [] if not (isinstance(s, dict) and s.get("search") == COMPUTE_MATCHED)]


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
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"sweep protocol {path} is not UTF-8 text (byte {e.start}: {e.reason}); protocols are "
                          f"YAML files in UTF-8, like sweeps/default.yaml") from None
    except OSError as e:
        raise ConfigError(f"sweep protocol {path} cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep protocol {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return parse_protocol(raw, str(path))


def parse_protocol(raw: Dict[str, Any], where: str = "protocol") -> Protocol:
    known = {"name", "metric", "sampler_seed", "tpe_startup_trials", "asha", "stages", "description"}
    _no_unknown(raw, known, where)
    if raw.get("metric", "miou") != "miou":
        raise ConfigError(f"{where}: metric must be 'miou' (the mean IoU on the tune split)")
    stages_raw = raw.get("stages") or []
    if not isinstance(stages_raw, list):
        raise ConfigError(f"{where}: stages must be a list of stages (- name: ...), got {type(stages_raw).__name__}")
    if not stages_raw:
        raise ConfigError(f"{where}: no stages")
    for key, default in (("sampler_seed", 0), ("tpe_startup_trials", 3)):
        value = raw.get(key, default)
        if not _is_int(value) or not 0 <= value < 2 ** 32:
            raise ConfigError(f"{where}: {key} must be a whole number in [0, 2^32), got {value!r}")
    stages: List[Stage] = []
    for i, s in enumerate(stages_raw):
        if isinstance(s, dict) and s.get("search") == COMPUTE_MATCHED:
            stages.append(_parse_compute_matched(s, f"{where}, stage {i + 1}", stages))
            continue
        stages.append(_parse_stage(s, f"{where}, stage {i + 1}", [st.name for st in stages]))
    asha = _parse_asha(raw.get("asha"), f"{where}, asha")
    _check_parity(stages, where)
    return Protocol(name=raw.get("name", Path(where).stem), metric="miou",
                    sampler_seed=int(raw.get("sampler_seed", 0)),
                    tpe_startup_trials=int(raw.get("tpe_startup_trials", 3)),
                    asha=asha, stages=stages, raw=raw)


def _parse_asha(raw: Any, where: str) -> Dict[str, Any]:
    raw = {} if raw is None else raw
    _no_unknown(raw, set(ASHA_DEFAULTS), where)
    asha = {**ASHA_DEFAULTS, **raw}
    g, rf, frac, mc = (asha[k] for k in ("grace_period", "reduction_factor", "min_fraction", "min_completed"))
    if not _is_int(g) or g < 1:
        raise ConfigError(f"{where}: grace_period must be a whole number of evaluations >= 1, got {g!r}")
    if not _is_number(rf) or not rf > 1:
        raise ConfigError(f"{where}: reduction_factor must be a number > 1 (finite), got {rf!r}")
    if not _is_number(frac) or not 0 <= frac <= 1:
        raise ConfigError(f"{where}: min_fraction must be a fraction of training in [0, 1], got {frac!r}")
    if mc is not None and (not _is_int(mc) or mc < 1):
        raise ConfigError(f"{where}: min_completed must be a whole number of trials >= 1, or null for the "
                          f"default (half the stage's trials, at least 3), got {mc!r}")
    return asha


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite int or float (not a bool, not NaN or an infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_parity(stages: List[Stage], where: str) -> None:
    """`grow` on at most one stage: a tpe stage of the student-only arm, its last search stage (growing
    it changes only the student's final winner, never a later stage's inheritance); and no stage
    inherits from reruns (reruns run after every search stage)."""
    grown = [s for s in stages if s.grow]
    if len(grown) > 1:
        raise ConfigError(f"{where}: grow: true on {len(grown)} stages ({', '.join(s.name for s in grown)}); "
                          f"the student-only arm grows one TPE sequence")
    if grown:
        g = grown[0]
        if g.search != "tpe" or "student-only" not in g.arms or g.each:
            raise ConfigError(f"{where}, stage '{g.name}': grow: true needs a tpe stage of the student-only arm, "
                              f"without each (it continues the arm's TPE sequence until its budget reaches the distilled arm's)")
        later = [s.name for s in stages[stages.index(g) + 1:] if s.is_search and "student-only" in s.arms]
        if later:
            raise ConfigError(f"{where}, stage '{g.name}': grow: true must be on the student-only arm's last search "
                              f"stage, but {', '.join(later)} come(s) after it")
    reruns = {s.name for s in stages if not s.is_search}
    for s in stages:
        bad = [p for p in s.inherits if p in reruns]
        if bad:
            raise ConfigError(f"{where}, stage '{s.name}' inherits from the rerun stage(s) {', '.join(bad)}; "
                              f"reruns run after every search stage and choose nothing")


def _parse_stage(s: Dict[str, Any], where: str, earlier: List[str]) -> Stage:
    known = {"name", "arms", "search", "space", "trials", "inherits", "early_stopping", "each", "seeds", "split",
             "full_fidelity", "grow", *AUTO_KEYS}
    _no_unknown(s, known, where)
    name = s.get("name")
    if not name:
        raise ConfigError(f"{where}: every stage needs a name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: a stage name is text, got {name!r}")
    where = f"{where.rsplit(',', 1)[0]}, stage '{name}'"
    for key, kind in (("space", dict), ("inherits", list), ("arms", list)):
        if s.get(key) is not None and not isinstance(s[key], kind):
            raise ConfigError(f"{where}: {key} must be a {'mapping' if kind is dict else 'list'}, got {s[key]!r}")
    if "each" in s and not isinstance(s["each"], bool):
        raise ConfigError(f"{where}: each must be true or false, got {s['each']!r}")
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
                  seeds=s.get("seeds"), split=s.get("split", "val" if s.get("seeds") else "tune"),
                  full_fidelity=s.get("full_fidelity"), grow=s.get("grow", False))
    for key in ("full_fidelity", "grow"):
        if key in s and not isinstance(s[key], bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {s[key]!r}")
    if stage.search in (RERUN, "combine"):
        extra = [k for k in ("early_stopping", "full_fidelity", "grow") if k in s]
        if extra:
            raise ConfigError(f"{where}: a {stage.search} stage runs whole trials and grows nothing; remove "
                              f"{', '.join(extra)}")
    if stage.search == RERUN:
        return _parse_seeds(stage, s, where)
    given = [k for k in AUTO_KEYS if k in s]
    if given:
        raise ConfigError(f"{where}: {', '.join(given)} only go with seeds: auto on a rerun stage")
    if stage.search not in SEARCHES:
        raise ConfigError(f"{where}: search must be one of {', '.join(SEARCHES)} (or give seeds: N for "
                          f"reruns), got '{stage.search}'")
    if stage.split != "tune":
        raise ConfigError(f"{where}: search stages choose on the tune split; only reruns report on val")
    if stage.early_stopping not in (None, "asha"):
        raise ConfigError(f"{where}: early_stopping must be asha or absent, got '{stage.early_stopping}'")
    if stage.full_fidelity is not None and stage.early_stopping != "asha":
        raise ConfigError(f"{where}: full_fidelity only qualifies early_stopping: asha (without early stopping "
                          f"every trial runs to the end)")
    if stage.early_stopping == "asha" and stage.full_fidelity is True:
        raise ConfigError(f"{where}: early_stopping: asha with full_fidelity: true contradicts itself; remove one")
    if stage.search == "grid" and stage.early_stopping == "asha" and stage.full_fidelity is not False:
        raise ConfigError(f"{where}: a grid stage runs at full fidelity (every point to the end); to prune it, say "
                          f"early_stopping: asha together with full_fidelity: false, or remove early_stopping")
    if stage.search == "combine":
        if not stage.inherits:
            raise ConfigError(f"{where}: a combine stage combines the winners of the stages it inherits")
        return stage
    if not stage.space:
        raise ConfigError(f"{where}: empty search space")
    for path, dist in stage.space.items():
        _check_distribution(path, dist, stage.search, where)
    if stage.search == "tpe" and (not _is_int(stage.trials) or stage.trials < 1):
        raise ConfigError(f"{where}: a tpe stage needs trials: N (N >= 1)")
    return stage


def _parse_seeds(stage: Stage, s: Dict[str, Any], where: str) -> Stage:
    """`seeds: N`, or `seeds: auto` with target_halfwidth, max_seeds and min_seeds (default 3)."""
    given = [k for k in AUTO_KEYS if k in s]
    if stage.seeds != AUTO:
        if not _is_int(stage.seeds) or stage.seeds < 1:
            raise ConfigError(f"{where}: seeds must be a positive integer or auto, got {stage.seeds!r}")
        if given:
            raise ConfigError(f"{where}: {', '.join(given)} only go with seeds: auto (this stage has seeds: {stage.seeds})")
        return stage
    h, m, lo = s.get("target_halfwidth"), s.get("max_seeds"), s.get("min_seeds", MIN_SEEDS_DEFAULT)
    if isinstance(h, bool) or not isinstance(h, (int, float)) or not 0 < h < 1:
        raise ConfigError(f"{where}: seeds: auto needs target_halfwidth: H, the half-width of the paired 95 % interval "
                          f"of the lift to reach, as a mIoU fraction in (0, 1) (0.01 = +-1 point), got {h!r}")
    if not _is_int(lo) or lo < 2:
        raise ConfigError(f"{where}: min_seeds must be a whole number >= 2 (a paired interval needs two seeds), got {lo!r}")
    if not _is_int(m) or m < lo:
        raise ConfigError(f"{where}: seeds: auto needs max_seeds: M, a whole number >= min_seeds ({lo}), got {m!r}")
    if set(stage.arms) != set(ARMS):
        raise ConfigError(f"{where}: seeds: auto reruns both arms on the same seeds (the stopping rule is on the "
                          f"paired interval); give arms: [student-only, distilled]")
    stage.target_halfwidth, stage.max_seeds, stage.min_seeds = float(h), m, lo
    return stage


def _parse_compute_matched(s: Dict[str, Any], where: str, earlier: List[Stage]) -> Stage:
    """`search: compute_matched`: the student-only arm's tuned configuration rerun on the seeds of a rerun
    stage with its iterations scaled to the distilled arm's measured training cost, per measure."""
    known = {"name", "search", "arms", "measures", "matches", "share_within"}
    name = s.get("name")
    if not name:
        raise ConfigError(f"{where}: every stage needs a name")
    where = f"{where.rsplit(',', 1)[0]}, stage '{name}'"
    for key in s:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' for a compute_matched stage (it reruns the student-only "
                              f"arm's tuned configuration on the seeds and split of a rerun stage). Valid keys: "
                              f"{', '.join(sorted(known))}")
    if name in [st.name for st in earlier]:
        raise ConfigError(f"{where}: two stages are named '{name}'")
    arms = list(s.get("arms") or ["student-only"])
    if arms != ["student-only"]:
        raise ConfigError(f"{where}: a compute_matched stage reruns the student-only arm only (arms: [student-only] "
                          f"or leave arms out), got {arms}")
    measures = s.get("measures")
    if (not isinstance(measures, list) or not measures or len(set(measures)) != len(measures)
            or any(m not in MEASURES for m in measures)):
        raise ConfigError(f"{where}: measures must be a non-empty list of distinct cost measures among "
                          f"{list(MEASURES)} (time: train seconds per iteration; energy: kWh per run), got {measures!r}")
    reruns = [st for st in earlier if st.search == RERUN]
    matches = s.get("matches", reruns[-1].name if reruns else None)
    target = next((st for st in reruns if st.name == matches), None)
    if target is None:
        raise ConfigError(f"{where}: a compute_matched stage comes after the rerun stage whose seeds and measured costs "
                          f"it matches" + (f"; '{matches}' is not an earlier rerun stage (earlier: "
                                           f"{', '.join(st.name for st in reruns) or 'none'})" if matches else
                                           "; there is no earlier rerun stage"))
    if set(target.arms) != set(ARMS):
        raise ConfigError(f"{where}: the rerun stage '{target.name}' must rerun both arms (the cost ratio is measured "
                          f"on both arms' reruns)")
    share = s.get("share_within", 0.0)
    if not _is_number(share) or not 0 <= float(share) <= 0.1:
        raise ConfigError(f"{where}: share_within is the relative difference of two measures' cost ratios within "
                          f"which they share one control (a number from 0, exact, to 0.1), got {share!r}")
    return Stage(name=name, arms=arms, search=COMPUTE_MATCHED, space={}, split=target.split,
                 measures=list(measures), matches=target.name, share_within=float(share))


def _check_distribution(path: str, dist: Any, search: str, where: str) -> None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: '{path}' must be one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
                          f"{{choice: [values]}}, {{grid: [values]}}, {{grid_scale: [factors]}}; got {dist}")
    kind, values = next(iter(dist.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: '{path}': {kind} needs a non-empty list (empty search space)")
    if (kind in ("loguniform", "uniform", "grid_scale") or path.startswith("$")) and not all(_is_number(v) for v in values):
        raise ConfigError(f"{where}: '{path}': {kind} takes finite numbers, got {values}")
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
    """Every path of an expanded space is a config path of `cfg`, and every value the stage may set
    there is one the config accepts (`check_values`)."""
    for path in space:
        node = cfg
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{where}: '{path}' is not a config path of this run")
            node = node[part]
    check_values(space, cfg, where)


def check_values(space: Dict[str, Dict[str, Any]], cfg: Dict[str, Any], where: str) -> None:
    """Refuse (ConfigError) a value a stage would set that the config itself refuses: every grid and
    choice value, and both bounds of a loguniform / uniform range (the ranges of the schemas are
    intervals, so a range whose ends are admitted lies inside), each checked as `path=value` on the
    command line would be: the section's schema (type), its declared ranges and choices, the method's
    cross-field rules, NaN and infinities (`config_verdict`)."""
    for path, dist in space.items():
        kind, values = next(iter(dist.items()))
        for value in values:
            message = config_verdict(cfg, path, value)
            if message:
                what = "bound" if kind in ("loguniform", "uniform") else "value"
                raise ConfigError(f"{where}: '{path}': the {kind} {what} {value!r} is refused by the config: {message}")


def config_verdict(cfg: Dict[str, Any], path: str, value: Any) -> Optional[str]:
    """The config's own rules on `cfg` with `path` set to `value`: the ConfigError message, or None.

    The section that holds the path is validated as `harness.config.validate` validates it (one
    section, not the whole config: a protocol sets dozens of values), with the same functions: the
    schema (types, through OmegaConf), `check_finite`, the declared ranges (`check_section` for a
    method, `check_schema` for a section) and the invariants that relate values; a path outside the
    method and model/optimiser/budget sections goes through the whole `validate`."""
    import copy

    from harness import config as C
    from harness.params import check_finite, check_schema, check_section

    candidate = {**cfg}
    parts = path.split(".")
    top = parts[0]
    candidate[top] = copy.deepcopy(cfg[top])
    node = candidate
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    try:
        if top == "method" and len(parts) == 3:
            from harness.methods import METHODS

            name = parts[1]
            schema = METHODS[name].Config
            section = C._against(schema, candidate["method"][name], f"method.{name}")
            check_finite(section, f"method.{name}")
            check_section(name, schema, section)
        elif top in C.SECTION_SCHEMAS:
            schema = C.SECTION_SCHEMAS[top]
            section = C._against(schema, candidate[top], top)
            check_finite(section, top)
            check_schema(top, schema, section)
            C._check_invariants({**candidate, top: section}, check_data=False)
        else:
            C.validate(candidate, check_data=False)
    except ConfigError as e:
        return str(e)
    return None
