"""The sweep's trials as Optuna studies in an RDB storage, for `optuna-dashboard <storage URL>`.

The results database stays the source of truth; this is a copy kept for the viewers. Each unit of a
sweep (an arm's stage, or one sub-stage of an `each` stage, or one measure of the compute-matched
control) is one study, named `<arm id>/<stored stage name>` (`[measure]` added for the controls), and
every finished row of it (completed, pruned, failed) is one trial: its searched parameters with their
distributions, its final value (the stage split's mIoU; none for a failed trial), the mIoU of every
evaluation as intermediate values (step = iteration, pruned trials included) and, as user attributes,
the row's run id, status, failure reason, iterations and whole parameter set.

The sampler that chooses the points is not this study: the runner's `OptunaSearch` keeps its own
in-memory sampler (`runner.replayed_sampler`), so recording here changes no sampled point and no
resume. A row is added once: the run id is kept in the trial's user attributes and a row whose run id
the study holds is skipped (a resumed sweep, a reused student-only arm, a second call). A storage that
cannot be written is reported once and the sweep goes on without it.
"""
from __future__ import annotations

import datetime as dt
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set

from harness.sweep.budget import sequence_order

STATES = ("completed", "pruned", "failed")


def study_name(unit) -> str:
    """`<arm id>/<stage unit name>`, `[measure]` added for a compute-matched unit."""
    measure = (unit.match or {}).get("measure")
    return f"{unit.arm_id}/{unit.name}" + (f"[{measure}]" if measure else "")


def distributions(unit) -> Dict[str, Any]:
    """The Optuna distribution of every parameter the unit varies: the searched space as declared
    (loguniform, uniform, choice, grid), and for points (reruns' seeds, a combination) the range or set
    of the values its points take."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: Dict[str, Any] = {}
    for path, dist in (unit.space or {}).items():
        kind, values = next(iter(dist.items()))
        if kind == "loguniform":
            out[path] = FloatDistribution(float(values[0]), float(values[1]), log=True)
        elif kind == "uniform":
            out[path] = FloatDistribution(float(values[0]), float(values[1]))
        elif kind in ("choice", "grid") and all(_plain(v) for v in values):
            out[path] = CategoricalDistribution(list(values))
    keys = sorted({k for p in unit.points or [] for k in p} - set(out))
    for key in keys:
        values = [p[key] for p in unit.points if key in p]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[key] = IntDistribution(min(values), max(values))
        elif values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = FloatDistribution(float(min(values)), float(max(values)))
        elif values and all(_plain(v) for v in values):
            out[key] = CategoricalDistribution(sorted(set(values), key=str))
    return out


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def intermediate_values(row: Dict[str, Any], reported: Optional[Dict[int, float]] = None) -> Dict[int, float]:
    """Step (iteration) -> mIoU of every evaluation: the row's history; for a pruned row stored without
    one (ASHA stopped it: the driver stored it), what the trial reported to Tune, or at least its value
    at the cut."""
    out: Dict[int, float] = {}
    for h in row.get("history_json") or []:
        it, miou = h.get("iteration"), h.get("miou")
        if it is not None and isinstance(miou, (int, float)) and math.isfinite(miou):
            out[int(it)] = float(miou)
    if not out and reported:
        out = {int(k): float(v) for k, v in reported.items() if v is not None and math.isfinite(v)}
    if not out and row.get("status") == "pruned" and row.get("iterations") is not None \
            and isinstance(row.get("final_miou"), (int, float)) and math.isfinite(row["final_miou"]):
        out[int(row["iterations"])] = float(row["final_miou"])
    return out


def frozen_trial(row: Dict[str, Any], dists: Dict[str, Any], reported: Optional[Dict[int, float]] = None):
    """The Optuna trial of a stored row."""
    from optuna.trial import TrialState, create_trial

    state = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}[row["status"]]
    value = row.get("final_miou")
    value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    if state == TrialState.FAIL:
        value = None
    elif state == TrialState.COMPLETE and value is None:
        state = TrialState.FAIL
    params, used = {}, {}
    for key, dist in dists.items():
        if key not in (row.get("params_json") or {}):
            continue
        v = row["params_json"][key]
        try:
            if dist._contains(dist.to_internal_repr(v)):
                params[key], used[key] = v, dist
        except Exception:  # noqa: BLE001 - a value outside the declared space stays in user_attrs only
            pass
    attrs = {"run_id": row["run_id"], "status": row["status"], "failure_reason": row.get("failure_reason"),
             "trial_id": row.get("trial_id"), "iterations": row.get("iterations"), "split": row.get("split"),
             "wall_time_s": row.get("wall_time_s"), "params": _jsonable(row.get("params_json") or {}),
             "config_hash": row.get("config_hash")}
    trial = create_trial(state=state, value=value, params=params, distributions=used,
                         user_attrs={k: v for k, v in attrs.items() if v is not None},
                         intermediate_values=intermediate_values(row, reported))
    end = _when(row.get("created_at"))
    if end is not None:
        trial.datetime_complete = end
        trial.datetime_start = end - dt.timedelta(seconds=float(row.get("wall_time_s") or 0.0))
    return trial


def _jsonable(params: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v if _plain(v) else str(v) for k, v in params.items()}


def _when(text: Any) -> Optional[dt.datetime]:
    if isinstance(text, dt.datetime):
        return text
    try:
        when = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return when.astimezone().replace(tzinfo=None) if when.tzinfo else when


class Studies:
    """The sweep's Optuna storage (None URL: nothing is recorded)."""

    def __init__(self, url: Optional[str]):
        self.url = url
        self._storage = None
        self._studies: Dict[str, Any] = {}
        self._known: Dict[str, Set[str]] = {}
        self.broken: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return bool(self.url) and self.broken is None

    def storage(self):
        if self._storage is None:
            import optuna
            from sqlalchemy.engine import make_url

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            url = make_url(self.url)
            kwargs: Dict[str, Any] = {}
            if url.get_backend_name() == "sqlite":
                if url.database and url.database != ":memory:":
                    Path(url.database).parent.mkdir(parents=True, exist_ok=True)
                kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
            self._storage = optuna.storages.RDBStorage(self.url, **kwargs)
        return self._storage

    def study(self, unit):
        import optuna

        name = study_name(unit)
        if name not in self._studies:
            study = optuna.create_study(storage=self.storage(), study_name=name, direction="maximize",
                                        load_if_exists=True)
            if not study.user_attrs:
                study.set_user_attr("arm", unit.arm)
                study.set_user_attr("arm_id", unit.arm_id)
                study.set_user_attr("stage", unit.name)
                study.set_user_attr("split", unit.stage.split)
                study.set_user_attr("search", unit.stage.search)
            self._studies[name] = study
            self._known[name] = {t.user_attrs.get("run_id") for t in study.get_trials(deepcopy=False)}
        return self._studies[name], self._known[name]

    def record(self, unit, rows: Iterable[Dict[str, Any]],
               reported: Optional[Dict[str, Dict[int, float]]] = None) -> int:
        """Add the finished rows the unit's study does not hold yet (in stored order); how many were added.
        `reported`: run id -> {iteration: mIoU} the trials reported to Tune (pruned rows have no history)."""
        if not self.enabled:
            return 0
        added = 0
        try:
            study, known = self.study(unit)
            dists = distributions(unit)
            for row in sequence_order(r for r in rows if r.get("status") in STATES):
                if row["run_id"] in known:
                    continue
                study.add_trial(frozen_trial(row, dists, (reported or {}).get(row["run_id"])))
                known.add(row["run_id"])
                added += 1
        except Exception as e:  # noqa: BLE001 - the dashboard copy must never stop a sweep
            from harness.store import shown_url

            self.broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"warning: the Optuna storage {shown_url(self.url)} could not be written ({self.broken}); "
                  f"the sweep goes on without it (the results database has every trial)", file=sys.stderr, flush=True)
        return added


def study_summaries(url: str) -> List[Any]:
    import optuna

    return optuna.get_all_study_summaries(storage=url)
