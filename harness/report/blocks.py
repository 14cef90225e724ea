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

**Honest pooling.** An arm pools the reruns of one sweep arm only (the runner's arm id, stored as
``sweep_id``: dataset, student, budget, optimiser, protocol, teacher and method config). The
student-only arm of a block is one student arm id and, where the sweep recorded it, the winner of
one tuning prefix (``extra_json.winner_run_id``); a distilled arm whose rows name their student arm
(``extra_json.student_arm``) is compared only with that one. Two student arms for one (dataset,
student, budget) are two blocks; two sweeps of one method in a block are two rows (label
``kd@<sweep>``). Rerun rows that did not complete (failed, stopped, pruned, collapsed, or without a
final mIoU) stay with their arm as ``Arm.lost`` so the tables can show completed / run seeds and why.

**Filters hide, they never change numbers.** ``load_blocks(methods=...)`` keeps every arm in
``Block.all_arms`` (the multiplicity family) and only the selected ones in ``Block.arms`` (shown).

**Row id**: ``row_id(dataset, student, teacher, methods, budget)`` is
``stable_hash([dataset, student, teacher, label, budget], 8)`` (budget left out when None);
``find_row(store, id)`` returns the database rows behind an id (the input of ``reproduce``).
"""
from __future__ import annotations

import datetime as _dt
import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from harness.config import stable_hash
from harness.sweep.protocol import RERUN, load_protocol, rerun_stages

STUDENT_ONLY = "student-only"
# stage kinds whose rows are neither tuning trials nor reruns: controls measured after the reruns
# (the compute-matched student runs of the equal-compute lift, harness.sweep.protocol)
CONTROL_KINDS = ("compute_matched",)
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
    rows: List[Dict[str, Any]]      # completed rerun rows with a final mIoU, oldest first
    lost: List[Dict[str, Any]] = field(default_factory=list)   # rerun rows that did not complete

    @property
    def values(self) -> List[float]:
        return [r["final_miou"] for r in self.rows if r["final_miou"] is not None]

    @property
    def by_seed(self) -> Dict[int, float]:
        """seed -> final mIoU (a seed rerun twice keeps its latest completed value)."""
        return {int(r["seed"]): r["final_miou"] for r in self.rows
                if r["final_miou"] is not None and r["seed"] is not None}

    @property
    def runs(self) -> int:
        """Rerun seeds started (completed or not)."""
        return len({r["seed"] for r in self.rows + self.lost}) if self.rows or self.lost else 0

    @property
    def sweep_ids(self) -> List[str]:
        return sorted({r["sweep_id"] for r in self.rows + self.lost if r.get("sweep_id")})

    def lost_reasons(self) -> List[str]:
        """'seed 3: failed (tune mIoU collapsed ...)' for every rerun seed without a value."""
        done = {r["seed"] for r in self.rows}
        out = []
        for r in self.lost:
            if r["seed"] in done:
                continue
            why = r.get("failure_reason") or ("no final mIoU recorded" if r["status"] == "completed" else "")
            out.append(f"seed {r['seed']}: {r['status']}{' (' + why + ')' if why else ''}")
        return out

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
    arms: Dict[str, Arm] = field(default_factory=dict)   # shown arms: student-only first, then methods
    notes: List[str] = field(default_factory=list)       # how its rows were found, where that is a guess
    all_arms: Dict[str, Arm] = field(default_factory=dict)  # every arm of the block (the family)
    student_arm: Optional[str] = None                      # the student-only sweep id (arm id)
    disambiguate: bool = False                             # several student arms: ids carry the arm
    student_winner: Optional[str] = None                   # the winner run id of its tuning prefix
    # labels whose plain id another block of the same key also shows (the student-only row when a
    # key has several student arms or winners, a method compared with two of them): their ids carry
    # the student arm and winner; every other id stays the plain one, so adding a sweep never
    # renames an existing row
    shared_labels: Tuple[str, ...] = ()
    # the vs-student comparisons of the other blocks of the same key (same dataset, student, teacher
    # and budget, another student-only winner): (label, distilled arm, its student-only arm). They
    # join this block's Holm family, so a lift is corrected over every test made on that comparison
    family_extra: List[Tuple[str, "Arm", "Arm"]] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.all_arms:
            self.all_arms = self.arms

    @property
    def key(self) -> Tuple[str, str, Optional[str], Optional[str]]:
        return (self.dataset, self.student, self.teacher, self.budget)

    @property
    def title(self) -> str:
        t = f"{self.student} <- {self.teacher}" if self.teacher else f"{self.student} (no distilled arm)"
        return f"{self.dataset}: {t}, budget {self.budget or 'unknown'}" + self.student_suffix

    @property
    def file_stem(self) -> str:
        """'synthetic_pspnet_resnet18_small_deeplabv3_resnet18_small_quick' (+ '_student-798f5d8f' where
        the key has several student arms or winners): the per-block part of figure file names, so
        two blocks of one key never write the same file."""
        text = f"{self.dataset}_{self.student}_{self.teacher or 'none'}_{self.budget or 'na'}"
        if self.disambiguate:
            text += "_student-" + (self.student_winner or self.student_arm or "none").split(":")[-1]
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"

    @property
    def student_suffix(self) -> str:
        """', student-only winner lr_wd:798f5d8f' where the key has several student arms or winners
        (the titles of those blocks would otherwise be the same), else ''."""
        if not self.disambiguate:
            return ""
        if self.student_winner:
            return f", student-only winner {self.student_winner.split(':', 2)[-1]}"
        return f", student-only arm {self.student_arm}" if self.student_arm else ", no student-only arm"

    @property
    def baseline(self) -> Optional[Arm]:
        return self.arms.get(STUDENT_ONLY)

    def row_id(self, label: str) -> str:
        rid = row_id(self.dataset, self.student, self.teacher, label, self.budget)
        if label in self.shared_labels and self.student_arm:
            key = [rid, self.student_arm] + ([self.student_winner] if self.student_winner else [])
            rid = stable_hash(key, 8)
        return rid

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


def is_control(row: Dict[str, Any]) -> bool:
    """A control row (CONTROL_KINDS): not a tuning trial, not a rerun."""
    return (row.get("extra_json") or {}).get("stage_kind") in CONTROL_KINDS


def rerun_rows(store, **equals) -> List[Tuple[Dict[str, Any], Optional[str]]]:
    """(row, fallback note) of the rerun rows of the student-only and distilled arms, any status."""
    is_rerun = RerunStages()
    rows = store.query(arm=[STUDENT_ONLY, "distilled"], **equals)
    out = []
    for r in rows:
        keep, note = is_rerun(r)
        if keep:
            out.append((r, note))
    return out


def _done(row: Dict[str, Any]) -> bool:
    return row["status"] == "completed" and row["final_miou"] is not None


def _student_key(row: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    """(student arm id, winner run id) a rerun row belongs to; for a distilled row the student arm
    it was compared with when the sweep recorded it, else (None, None)."""
    extra = row.get("extra_json") or {}
    if row["arm"] == STUDENT_ONLY:
        return row.get("sweep_id"), extra.get("winner_run_id")
    link = extra.get("student_arm") or {}
    return link.get("arm_id"), link.get("winner_run_id")


def _arm(label: str, rows: List[Dict[str, Any]]) -> Arm:
    return Arm(label, [r for r in rows if _done(r)], [r for r in rows if not _done(r)])


def load_blocks(store, dataset: Optional[str] = None, student: Optional[str] = None,
                teacher: Optional[str] = None, budget: Optional[str] = None,
                methods: Optional[Iterable[str]] = None) -> List[Block]:
    """Blocks of the rerun rows, filtered by the given values, in a stable order.

    `methods` hides the other distilled arms (labels as `method_label` writes them) from
    ``Block.arms``; they stay in ``Block.all_arms``, the family every p-value is corrected over.
    The student-only arm is always kept. A (dataset, student, budget) with student-only rows but
    no distilled arm yields one block with teacher None.
    """
    equals = {k: v for k, v in (("dataset", dataset), ("student", student)) if v is not None}
    found = rerun_rows(store, **equals)
    if budget is not None:
        found = [(r, n) for r, n in found if budget_of(r) == budget]
    notes = {id(r): n for r, n in found if n}
    rows = [r for r, _ in found]
    keep = None if methods is None else {method_label(m) for m in methods}
    # student arms: (dataset, student, budget) -> {(sweep id, winner): rows}
    students: Dict[Tuple, Dict[Tuple, List[Dict]]] = {}
    distilled: Dict[Tuple, List[Dict]] = {}
    for r in rows:
        base = (r["dataset"], r["student"], budget_of(r))
        if r["arm"] == STUDENT_ONLY:
            students.setdefault(base, {}).setdefault(_student_key(r), []).append(r)
        elif teacher is None or r["teacher"] == teacher:
            distilled.setdefault(base + (r["teacher"],), []).append(r)
    blocks: List[Block] = []
    bases = sorted(set(students) | {k[:3] for k in distilled}, key=_sort_key)
    for base in bases:
        s_arms = students.get(base, {})
        teachers = sorted({k[3] for k in distilled if k[:3] == base}, key=lambda t: "" if t is None else t)
        if not teachers and teacher is None:
            teachers = [None]
        for te in teachers:
            d_rows = distilled.get(base + (te,), [])
            skeys = sorted(s_arms, key=_sort_key) or [(None, None)]
            for skey in skeys:
                mine = [r for r in d_rows if _matches(_student_key(r), skey, s_arms)]
                if te is not None and not mine and skey[0] is not None and len(skeys) > 1:
                    continue
                block = Block(base[0], base[1], te, base[2], student_arm=skey[0],
                              disambiguate=len(skeys) > 1, student_winner=skey[1])
                if skey in s_arms:
                    block.all_arms[STUDENT_ONLY] = _arm(STUDENT_ONLY, s_arms[skey])
                by_label: Dict[str, Dict[str, List[Dict]]] = {}
                for r in mine:
                    by_label.setdefault(method_label(r["methods"]), {}).setdefault(r.get("sweep_id") or "", []).append(r)
                for label in sorted(by_label):
                    sweeps = by_label[label]
                    for sid in sorted(sweeps):
                        name = label if len(sweeps) == 1 else f"{label}@{stable_hash(sid, 6)}"
                        block.all_arms[name] = _arm(name, sweeps[sid])
                    if len(sweeps) > 1:
                        block.notes.append(f"{label}: {len(sweeps)} sweeps of this method in one block, each its own "
                                           f"row (never pooled): {', '.join(sorted(sweeps))}")
                block.arms = {l: a for l, a in block.all_arms.items()
                              if l == STUDENT_ONLY or keep is None or l.split("@")[0] in keep}
                if len(skeys) > 1:
                    block.notes.append(f"{len(skeys)} tuned student-only arms for {base[0]}/{base[1]} budget {base[2]}: "
                                       f"this block uses {skey[0]}" + (f" (winner {skey[1]})" if skey[1] else "")
                                       + "; their reruns are never pooled")
                unlinked = [r for r in mine if _student_key(r)[0] is None]
                if unlinked and len(skeys) > 1:
                    block.notes.append("distilled rows that do not record their student arm are compared with "
                                       "each student-only arm of the same dataset, student and budget")
                block.notes += list(dict.fromkeys(notes[id(r)] for r in block_rows(block) if id(r) in notes))
                blocks.append(block)
    _link_siblings(blocks)
    return blocks


def _link_siblings(blocks: List[Block]) -> None:
    """Blocks of one key (several student-only arms or winners): the labels they share get
    disambiguated ids, and each block's Holm family takes in the others' vs-student comparisons."""
    by_key: Dict[Tuple, List[Block]] = {}
    for b in blocks:
        by_key.setdefault(b.key, []).append(b)
    for group in by_key.values():
        if len(group) < 2:
            continue
        counts: Dict[str, int] = {}
        for b in group:
            for label in b.all_arms:
                counts[label] = counts.get(label, 0) + 1
        shared = tuple(sorted(l for l, c in counts.items() if c > 1))
        for b in group:
            b.shared_labels = shared
            others = [o for o in group if o is not b]
            b.family_extra = [(f"{label} ({o.student_suffix.lstrip(', ')})", arm, o.all_arms[STUDENT_ONLY])
                              for o in others if STUDENT_ONLY in o.all_arms
                              for label, arm in o.all_arms.items() if label != STUDENT_ONLY]
            if b.family_extra:
                b.notes.append(f"Holm family shared with the other block(s) of this comparison: "
                               f"{', '.join(l for l, _, _ in b.family_extra)} (each against its own "
                               f"student-only winner) count in m")


def _sort_key(k) -> Tuple:
    return tuple("" if x is None else str(x) for x in k)


def _matches(link: Tuple[Optional[str], Optional[str]], skey: Tuple[Optional[str], Optional[str]],
             s_arms: Dict[Tuple, List[Dict]]) -> bool:
    """A distilled row belongs with student arm `skey` when it names it (arm id, and winner where
    both record one), or names none."""
    arm_id, winner = link
    if arm_id is None:
        return True
    if arm_id != skey[0]:
        return False
    return winner is None or skey[1] is None or winner == skey[1]


def block_rows(block: Block) -> List[Dict[str, Any]]:
    """Every rerun row of every arm of the block (completed and not)."""
    return [r for a in block.all_arms.values() for r in a.rows + a.lost]


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
    if "@" not in str(url):  # no credentials to hide; re-rendering would escape '<outside the repository>'
        return str(url)
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a plain path is fine as it is
        return str(url)
