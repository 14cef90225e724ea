"""The run record: the unit of evidence, one row of the results database.

Every row has this one shape, whatever made it: a finished `train` run, a teacher's training, a
sweep trial, or a trial the sweep pruned or that crashed (`RunRecord.unfinished`). Who made the run
stores it (`store_record`); the training code never writes to the database.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness import provenance
from harness.config import arm_of, methods_of, run_hash

ARMS = ("student-only", "distilled", "teacher")
STATUSES = ("completed", "failed", "stopped", "pruned")  # stopped: by the caller; pruned: by ASHA


@dataclass
class RunRecord:
    run_id: str
    command: str
    config_json: Dict[str, Any]
    config_hash: str
    arm: str                                  # student-only | distilled | teacher
    methods: str                              # "cwd,gskd"; "" for a student-only run
    dataset: str
    student: str
    teacher: Optional[str]
    seed: int
    split: str                                # where final/best mIoU were measured
    status: str = "completed"                 # completed | failed | stopped | pruned
    failure_reason: Optional[str] = None
    final_miou: Optional[float] = None
    best_miou: Optional[float] = None
    best_iteration: Optional[int] = None
    pixel_accuracy: Optional[float] = None
    per_class_iou_json: Optional[Dict[str, Optional[float]]] = None
    history_json: Optional[List[Dict[str, Any]]] = None
    iterations: Optional[int] = None
    wall_time_s: Optional[float] = None
    train_time_s: Optional[float] = None
    energy_kwh: Optional[float] = None
    co2_kg: Optional[float] = None
    carbon_intensity_g_per_kwh: Optional[float] = None
    energy_json: Optional[Dict[str, Any]] = None
    git_commit: Optional[str] = None
    versions_json: Optional[Dict[str, Any]] = None
    host: Optional[str] = None
    extra_json: Optional[Dict[str, Any]] = None
    # set by the sweep for its trials
    sweep_id: Optional[str] = None
    stage: Optional[str] = None
    trial_id: Optional[str] = None
    params_json: Optional[Dict[str, Any]] = None

    def __post_init__(self):
        if self.arm not in ARMS or self.status not in STATUSES:
            raise ValueError(f"a run record has arm in {ARMS} and status in {STATUSES}, "
                             f"got arm {self.arm!r}, status {self.status!r}")

    @classmethod
    def of(cls, cfg: Dict[str, Any], run_id: str, command: str = "", **values: Any) -> "RunRecord":
        """A record of `cfg` with what the config says (identity, hash, arm), where it ran (commit,
        versions, host) and the given values."""
        identity = dict(run_id=run_id, command=command, config_json=cfg, config_hash=run_hash(cfg),
                        arm=arm_of(cfg), methods=",".join(methods_of(cfg)), dataset=cfg["dataset"]["name"],
                        student=cfg["student"]["name"], teacher=cfg["teacher"]["name"] if cfg["method"] else None,
                        seed=cfg["seed"], split=cfg["eval_split"], git_commit=provenance.git_commit(),
                        versions_json=provenance.versions(), host=provenance.host())
        return cls(**{**identity, **values})

    def replace(self, **values: Any) -> "RunRecord":
        return dataclasses.replace(self, **values)

    def as_row(self) -> Dict[str, Any]:
        """The database row (`harness.store` columns); `created_at` is set by the store."""
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:  # record["final_miou"]: reads like the stored row
        return getattr(self, key)


def pending_dir(cfg: Dict[str, Any]) -> Path:
    """Where records wait that could not be written to the database (`<paths.results>/pending`)."""
    return Path(cfg["paths"]["results"]) / "pending"


def open_store(cfg: Dict[str, Any]):
    """The results database of `cfg`, opened for writing and checked (a StoreError, exit 2, before
    any work), with the records a failed write left behind imported first."""
    from harness.store import ResultsStore

    store = ResultsStore(cfg["store"]["url"])
    folder = pending_dir(cfg)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        row = json.loads(path.read_text())
        if store.get(row["run_id"]) is None:
            store.append(row)
        path.unlink()
        print(f"[harness] imported the record of run {row['run_id']} kept in {path} into {store.url}",
              file=sys.stderr)
    return store


def store_record(cfg: Dict[str, Any], record: RunRecord) -> bool:
    """Append `record` to the results database of `cfg` (`store.url`). If that fails (locked, full,
    gone), the record is kept as a file in `pending_dir(cfg)`, which the next command that opens the
    store for writing imports; returns whether it reached the database."""
    try:
        open_store(cfg).append(record.as_row())
        return True
    except Exception as exc:  # noqa: BLE001 - whatever the database did, the run must not be lost
        from harness.store import dumps_json

        folder = pending_dir(cfg)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{record.run_id.replace(':', '_').replace('/', '_')}.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(dumps_json(record.as_row()))
        os.replace(tmp, path)
        print(f"[harness] could not write the record of run {record.run_id} to {cfg['store']['url']} "
              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); kept in {path}, the next command "
              f"that opens the store imports it", file=sys.stderr)
        return False
