"""Rows -> blocks: the rerun rows grouped into comparisons, row ids, the source footer.

A **block** is one comparison: (dataset, student, teacher, budget). Its **arms** are the tuned
student-only arm (label ``student-only``) and one distilled arm per method or combination (label
``kd``, ``cwd+gskd``, ...). The numbers of an arm are the ``final_miou`` of its completed rows of the
protocol's rerun stage (fresh seeds, reported on ``val``), found by its kind, not by its name: a row
is evidence when ``extra_json.stage_kind == "rerun"``, or, for rows recorded without a stage kind,
when its ``stage`` is one of ``rerun_stages`` of the protocol named in its config
(``config_json.sweep.protocol``; ``reruns`` in ``sweeps/default.yaml``). A protocol that cannot be
loaded falls back to the stage name ``reruns``, and the block says so in ``Block.notes``. A student-only row has no teacher in the database; it belongs to every block with the same
(dataset, student, budget), since one tuned student-only arm serves every teacher and method.

The budget is part of the block because a smoke and a quick sweep of the same comparison can share
a database and must never be pooled.

**Row id**: ``row_id(dataset, student, teacher, methods, budget)`` is
``stable_hash([dataset, student, teacher, label, budget], 8)`` (budget left out when None);
``find_row(store, id)`` returns the database rows behind an id (the input of ``reproduce``).
"""
from __future__ import annotations

import datetime as _dt
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from harness.config import stable_hash
from harness.sweep.protocol import RERUN, load_protocol, rerun_stages

STUDENT_ONLY = "student-only"
FALLBACK_RERUN_STAGE = "reruns"  # rows without a stage kind whose protocol cannot be loaded
MISSING = "n/a"  # never a silent zero: a missing cell says so, the reason goes under the table


# ------------------------------------------------------------------------------------------ ids
def method_label(methods: Any) -> str:
    """``None``/``""``/``[]`` -> 'student-only'; 'gskd,cwd' / ['gskd','cwd'] / 'cwd+gskd' -> 'cwd+gskd'."""
    if methods is None:
        return STUDENT_ONLY
    if isinstance(methods, str):
        if methods == STUDENT_ONLY:
            return STUDENT_ONLY
        names = methods.replace("+", ",").split(",")
    else:
        names = [str(m) for m in methods]
    names = sorted(n.strip() for n in names if n and n.strip())
    return "+".join(names) if names else STUDENT_ONLY


def row_id(dataset: str, student: str, teacher: Optional[str], methods: Any,
           budget: Optional[str] = None) -> str:
    """Stable 8-character id of one leaderboard row (the student-only row of a block carries the
    block's teacher, so every block's rows have distinct ids)."""
    key: List[Any] = [dataset, student, teacher, method_label(methods)]
    if budget is not None:
        key.append(budget)
    return stable_hash(key, 8)


def budget_of(row: Dict[str, Any]) -> Optional[str]:
    cfg = row.get("config_json") or {}
    return (cfg.get("budget") or {}).get("name")


def protocol_of(row: Dict[str, Any]) -> Optional[str]:
    cfg = row.get("config_json") or {}
    return (cfg.get("sweep") or {}).get("protocol")


# --------------------------------------------------------------------------------------- blocks
@dataclass
class Arm:
    label: str                      # 'student-only' or 'cwd+gskd'
    rows: List[Dict[str, Any]]      # completed rerun rows, oldest first

    @property
    def values(self) -> List[float]:
        return [r["final_miou"] for r in self.rows if r["final_miou"] is not None]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> Optional[float]:
        """Sample standard deviation (n - 1); None for fewer than two seeds."""
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def seeds(self) -> List[int]:
        return sorted({r["seed"] for r in self.rows if r["seed"] is not None})

    def total(self, column: str) -> Tuple[Optional[float], int]:
        """(mean per run of `column`, runs missing it); None when no run has it (never 0)."""
        have = [r[column] for r in self.rows if r.get(column) is not None]
        return (statistics.fmean(have) if have else None), len(self.rows) - len(have)


@dataclass
class Block:
    dataset: str
    student: str
    teacher: Optional[str]
    budget: Optional[str]
    arms: Dict[str, Arm] = field(default_factory=dict)   # student-only first, then methods sorted
    notes: List[str] = field(default_factory=list)       # how its rows were found, where that is a guess

    @property
    def key(self) -> Tuple[str, str, Optional[str], Optional[str]]:
        return (self.dataset, self.student, self.teacher, self.budget)

    @property
    def title(self) -> str:
        t = f"{self.student} <- {self.teacher}" if self.teacher else f"{self.student} (no distilled arm)"
        return f"{self.dataset}: {t}, budget {self.budget or 'unknown'}"

    @property
    def baseline(self) -> Optional[Arm]:
        return self.arms.get(STUDENT_ONLY)

    def row_id(self, label: str) -> str:
        return row_id(self.dataset, self.student, self.teacher, label, self.budget)

    @property
    def rows(self) -> List[Dict[str, Any]]:
        return [r for a in self.arms.values() for r in a.rows]


class RerunStages:
    """Tells whether a row belongs to its protocol's rerun stage (one protocol load per name).

    ``stage_kind`` in ``extra_json`` decides when present; otherwise the row's protocol is loaded
    and its rerun stages (``harness.sweep.protocol.rerun_stages``) decide; a protocol that cannot be
    loaded falls back to ``FALLBACK_RERUN_STAGE`` with a note.
    """

    def __init__(self) -> None:
        self._stages: Dict[Optional[str], Tuple[List[str], Optional[str]]] = {}

    def _of(self, protocol: Optional[str]) -> Tuple[List[str], Optional[str]]:
        if protocol not in self._stages:
            try:
                if not protocol:
                    raise ValueError("no protocol recorded in config_json.sweep.protocol")
                self._stages[protocol] = (rerun_stages(load_protocol(protocol)), None)
            except Exception as exc:  # noqa: BLE001 - an old or moved protocol must not hide the rows
                what = f"protocol '{protocol}'" if protocol else "rows"
                self._stages[protocol] = ([FALLBACK_RERUN_STAGE], (
                    f"{what} without a stage kind: rerun stage taken to be '{FALLBACK_RERUN_STAGE}' "
                    f"(the protocol could not be loaded: {exc})"))
        return self._stages[protocol]

    def __call__(self, row: Dict[str, Any]) -> Tuple[bool, Optional[str]]:
        """(is a rerun row, note when that was decided by the fallback)."""
        kind = (row.get("extra_json") or {}).get("stage_kind")
        if kind is not None:
            return kind == RERUN, None
        stages, note = self._of(protocol_of(row))
        return row.get("stage") in stages, note


def rerun_rows(store, **equals) -> List[Tuple[Dict[str, Any], Optional[str]]]:
    """(row, fallback note) of the completed rerun rows with a final mIoU (student-only and distilled)."""
    is_rerun = RerunStages()
    rows = store.query(status="completed", arm=[STUDENT_ONLY, "distilled"], **equals)
    out = []
    for r in rows:
        if r["final_miou"] is None:
            continue
        keep, note = is_rerun(r)
        if keep:
            out.append((r, note))
    return out


def load_blocks(store, dataset: Optional[str] = None, student: Optional[str] = None,
                teacher: Optional[str] = None, budget: Optional[str] = None,
                methods: Optional[Iterable[str]] = None) -> List[Block]:
    """Blocks of the completed rerun rows, filtered by the given values, in a stable order.

    `methods` keeps only those distilled arms (labels as `method_label` writes them); the
    student-only arm is always kept. A (dataset, student, budget) with student-only rows but no
    distilled arm yields one block with teacher None.
    """
    equals = {k: v for k, v in (("dataset", dataset), ("student", student)) if v is not None}
    found = rerun_rows(store, **equals)
    if budget is not None:
        found = [(r, n) for r, n in found if budget_of(r) == budget]
    notes = {id(r): n for r, n in found if n}
    rows = [r for r, _ in found]
    keep = None if methods is None else {method_label(m) for m in methods}
    students: Dict[Tuple, List[Dict]] = {}
    distilled: Dict[Tuple, Dict[str, List[Dict]]] = {}
    for r in rows:
        base = (r["dataset"], r["student"], budget_of(r))
        if r["arm"] == STUDENT_ONLY:
            students.setdefault(base, []).append(r)
        else:
            if teacher is not None and r["teacher"] != teacher:
                continue
            label = method_label(r["methods"])
            if keep is not None and label not in keep:
                continue
            distilled.setdefault(base + (r["teacher"],), {}).setdefault(label, []).append(r)
    blocks: List[Block] = []
    for key in sorted(set(distilled) | {b + (None,) for b in students if teacher is None},
                      key=lambda k: tuple("" if x is None else str(x) for x in k)):
        ds, st, bud, te = key
        if te is None and any(k[:3] == (ds, st, bud) for k in distilled):
            continue  # the student-only rows already appear in the blocks with a teacher
        block = Block(ds, st, te, bud)
        if (ds, st, bud) in students:
            block.arms[STUDENT_ONLY] = Arm(STUDENT_ONLY, students[(ds, st, bud)])
        for label in sorted(distilled.get(key, {})):
            block.arms[label] = Arm(label, distilled[key][label])
        block.notes = list(dict.fromkeys(notes[id(r)] for r in block.rows if id(r) in notes))
        blocks.append(block)
    return blocks


def find_row(store, row_id_: str) -> List[Dict[str, Any]]:
    """The completed rerun rows behind a leaderboard row id (oldest first); [] for an unknown id."""
    for block in load_blocks(store):
        for label, arm in block.arms.items():
            if block.row_id(label) == row_id_:
                return list(arm.rows)
    return []


def known_row_ids(store) -> Dict[str, str]:
    """id -> 'dataset student <- teacher [label] budget' for every row of the leaderboard."""
    out = {}
    for block in load_blocks(store):
        for label in block.arms:
            out[block.row_id(label)] = f"{block.title} [{label}]"
    return out


# --------------------------------------------------------------------------------------- source
def source_lines(store_url: str, rows: Sequence[Dict[str, Any]], what: str = "") -> List[str]:
    """Footer every table and figure states: database, protocol, budget, seeds, date, git commit."""
    from harness.provenance import git_commit

    def distinct(values) -> str:
        vals = sorted({str(v) for v in values if v is not None})
        return ", ".join(vals) if vals else MISSING

    seeds = sorted({r["seed"] for r in rows if r.get("seed") is not None})
    created = sorted(r["created_at"] for r in rows if r.get("created_at"))
    span = f"{created[0][:10]} .. {created[-1][:10]}" if created else MISSING
    lines = [
        f"Source: {what + ' from ' if what else ''}{len(rows)} completed rerun row(s) of {_hide_password(store_url)}",
        f"Protocol: {distinct(protocol_of(r) for r in rows)}; budget: {distinct(budget_of(r) for r in rows)}; "
        f"split: {distinct(r.get('split') for r in rows)}",
        f"Seeds: {', '.join(map(str, seeds)) if seeds else MISSING}",
        f"Runs recorded: {span}; runs' git commit(s): {distinct(r.get('git_commit') for r in rows)}",
        f"Generated: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} "
        f"by git commit {git_commit() or MISSING}",
    ]
    return lines


def _hide_password(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a plain path is fine as it is
        return str(url)
