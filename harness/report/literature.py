"""Published lifts next to ours: ``python -m harness literature [dataset=... +method=...]``.

Prints and writes ``results/literature.md``: every entry of ``literature.yaml`` (the published
student-only and distilled mIoU of paper 003's Table 1 and of the seed papers' tables, with paper
and table), its **published lift** (distilled - student-only, as printed), and, where the results
database has a tuned comparison for the same method (label as the leaderboard writes it, e.g.
``cwd+gskd``), **our lift** over the tuned student-only arm (mean of the per-seed differences, the
leaderboard's 95% paired-t interval) and, on the same dataset only, the **lift inflation**.

Which of our comparisons stands next to a published row: the block (dataset, student, teacher,
budget) with the same method on the same dataset if there is one, otherwise the block with the
most seeds for that method on any dataset. Like is compared with like only:

* **same dataset**: our lift goes in "our lift, same dataset" and the **lift inflation** =
  published lift - our lift is computed; "ours from" names our student <- teacher and budget
  (the published student and teacher may still differ: both are in the row);
* **another dataset** (say the embedded synthetic data next to a published Cityscapes lift): our
  lift goes in the separate column "cross-dataset lift (not comparable)", the inflation cell stays
  empty (n/a), and no summary number ever combines it with anything: a lift on synthetic data and a
  published Cityscapes lift are different experiments.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from harness import stats
from harness.report.blocks import MISSING, STUDENT_ONLY, Block, load_blocks, method_label, source_lines
from harness.report.filters import Filters
from harness.report.render import markdown_table
from harness.report.verdicts import verdicts_of

DATA_FILE = Path(__file__).with_name("literature.yaml")
REQUIRED = ("paper", "table", "dataset", "student", "teacher", "method", "student_only", "distilled")
PAPERS = {
    "000": "Park et al.: Global Structural Knowledge Distillation for Semantic Segmentation (GSKD), IEEE Access 2025",
    "001": "Yang et al.: Cross-Image Relational Knowledge Distillation for Semantic Segmentation (CIRKD), CVPR 2022",
    "002": "Zhang et al.: Boundary and Relation Distillation for Semantic Segmentation (BRD)",
    "003": "Niemann, Vox, Werner: Towards Comparable Knowledge Distillation in Semantic Image Segmentation",
    "004": "Huang et al.: Distilling Knowledge from Heterogeneous Architectures for Semantic Segmentation (HeteroAKD)",
}


@dataclass
class Ours:
    block: Block
    label: str
    lift: float                    # percentage points
    ci: stats.Interval
    n: int
    n_base: int

    @property
    def setting(self) -> str:
        b = self.block
        return f"{b.dataset}, {b.student} <- {b.teacher}, {b.budget}, n={self.n}/{self.n_base}"

    def cell(self) -> str:
        if self.ci.available:
            return f"{self.lift:+.2f} [{100 * self.ci.low:+.2f}, {100 * self.ci.high:+.2f}]"
        return f"{self.lift:+.2f} [{MISSING}]"


def load_entries(path: Path | str = DATA_FILE) -> List[Dict[str, Any]]:
    """The published numbers, checked: every entry has the required keys and numbers."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    entries = data.get("entries") or []
    for i, e in enumerate(entries):
        missing = [k for k in REQUIRED if e.get(k) is None]
        if missing:
            raise ValueError(f"{path}: entry {i} ({e.get('paper')}/{e.get('table')}) lacks {', '.join(missing)}")
        for k in ("student_only", "distilled"):
            if not isinstance(e[k], (int, float)) or not 0 <= e[k] <= 100:
                raise ValueError(f"{path}: entry {i}: {k} = {e[k]!r} is not an mIoU in percent")
        e["method"] = method_label(e["method"])
        e["published_lift"] = round(float(e["distilled"]) - float(e["student_only"]), 6)
    return entries


def our_lifts(store, seed: int = 0, n_resamples: int = 9999) -> Dict[str, List[Ours]]:
    """method label -> our tuned comparisons of it (one per block that has it and a student-only arm)."""
    out: Dict[str, List[Ours]] = {}
    for block in load_blocks(store):
        base = block.baseline
        if base is None:
            continue
        for label, arm in block.arms.items():
            if label == STUDENT_ONLY or not arm.n or not base.n:
                continue
            comp = verdicts_of(block).vs_student.get(label)
            if comp is None or comp.verdict.lift is None:
                continue
            v = comp.verdict  # the leaderboard's verdict: paired t interval (Welch when unpaired)
            ci = stats.Interval(v.lift, v.low, v.high, method=v.test)
            out.setdefault(label, []).append(Ours(block, label, 100 * v.lift, ci, arm.n, base.n))
    return out


def match(entry: Dict[str, Any], ours: Dict[str, List[Ours]]) -> Optional[Ours]:
    candidates = ours.get(entry["method"], [])
    if not candidates:
        return None
    same = [o for o in candidates if o.block.dataset == entry["dataset"]]
    return max(same or candidates, key=lambda o: (o.n, o.n_base, o.block.budget or ""))


def same_dataset(entry: Dict[str, Any], o: Optional[Ours]) -> bool:
    """Whether our comparison `o` was made on the published entry's dataset (only then is an
    inflation computed)."""
    return o is not None and o.block.dataset == entry["dataset"]


def inflation(entry: Dict[str, Any], o: Optional[Ours]) -> Optional[float]:
    """published lift - our lift, in points; None unless our comparison is on the same dataset."""
    return entry["published_lift"] - o.lift if same_dataset(entry, o) else None


def _ours_from(o: Ours) -> str:
    b = o.block
    return f"{b.dataset}: {b.student} <- {b.teacher}, {b.budget or MISSING}, n={o.n}/{o.n_base}"


def _num(v: Optional[float], std: Optional[float] = None) -> str:
    if v is None:
        return MISSING
    return f"{v:.2f}" + (f" +- {std:.2f}" if std is not None else "")


def to_markdown(entries: Sequence[Dict[str, Any]], ours: Dict[str, List[Ours]], source: Sequence[str],
                filters: str = "none") -> str:
    lines = ["# Published lifts next to ours", "",
             "Published: the student-only (S only) and distilled (+T) mIoU (%) as printed, and their difference. "
             "Ours: the lift of the same method over our tuned student-only arm (mean of the per-seed differences, "
             "the leaderboard's 95% paired-t interval; setting = dataset, student <- teacher, budget, seeds distilled/student-only). "
             "Inflation = published lift - our lift, computed only where our comparison is on the published "
             "row's dataset (ours from: our dataset, student <- teacher, budget, seeds). Where ours is on another "
             "dataset, our lift stands in the column \"cross-dataset lift (not comparable)\" with no inflation, "
             "and no number here combines datasets. (k Ls): k loss terms besides CE (paper 003, Table 1); (tuned S): "
             "the student-only arm was tuned; (re-run): the authors re-ran the method. "
             "Data: harness/report/literature.yaml.", ""]
    lines += ["## Our tuned lifts", ""]
    if ours:
        rows = [[o.label, o.setting, o.cell()] for label in sorted(ours) for o in ours[label]]
        lines += markdown_table(["method", "our setting", "lift [95% CI]"], rows, "llr")
    else:
        lines.append("No tuned comparison in the results database yet (a method needs rerun rows of both arms): "
                     "run python -m harness sweep +method=NAME; the published numbers below stand alone.")
    lines.append("")
    by_table: Dict[tuple, List[Dict[str, Any]]] = {}
    for e in entries:
        by_table.setdefault((e["paper"], str(e["table"])), []).append(e)
    for (paper, table), rows in by_table.items():
        lines += [f"## Paper {paper}, Table {table}", "", f"{PAPERS.get(paper, paper)}", ""]
        body = []
        for e in rows:
            o = match(e, ours)
            same = same_dataset(e, o)
            infl = inflation(e, o)
            flags = "".join([f" ({e['loss_terms']} Ls)" if e.get("loss_terms") else "",
                             " (tuned S)" if e.get("tuned_baseline") else "",
                             " (re-run)" if e.get("reproduced_by_authors") else ""])
            body.append([e["dataset"], e["student"], e["teacher"], f"{e['method']}{flags}",
                         _num(e["student_only"], e.get("student_only_std")), _num(e["distilled"], e.get("distilled_std")),
                         f"{e['published_lift']:+.2f}", o.cell() if same else MISSING,
                         f"{infl:+.2f}" if infl is not None else MISSING,
                         o.cell() if o is not None and not same else "",
                         _ours_from(o) if o else ""])
        lines += markdown_table(["dataset", "student", "teacher", "method", "S only", "+T", "pub. lift",
                                 "our lift, same dataset [95% CI]", "inflation",
                                 "cross-dataset lift (not comparable)", "ours from"], body, "llllrrrrrrl")
        n_same = sum(same_dataset(e, match(e, ours)) for e in rows)
        n_cross = sum(match(e, ours) is not None and not same_dataset(e, match(e, ours)) for e in rows)
        if n_cross:
            lines += ["", f"{n_cross} row(s) have our lift only on another dataset: not comparable, no inflation."
                      + (f" {n_same} row(s) compare on the same dataset." if n_same else "")]
        notes = [f"{e['method']} ({e['dataset']}, {e['student']}): {e['note']}" for e in rows if e.get("note")]
        if notes:
            lines += [""] + [f"- {n}" for n in dict.fromkeys(notes)]
        lines.append("")
    if not entries:
        lines += [f"No published entries match the filters ({filters}).", ""]
    lines += ["---", ""] + [f"{s}  " for s in source] + [f"Filters: {filters}; published data: {DATA_FILE.name}  "]
    return "\n".join(lines).rstrip() + "\n"


def write(cfg: Dict[str, Any], store, filters: Filters = Filters(), quiet: bool = False,
          data_file: Path | str = DATA_FILE) -> Path:
    """results/literature.md: the published entries matching dataset= and +method=, next to our lifts
    (`store` None: no results database yet, the published numbers alone)."""
    entries = load_entries(data_file)
    methods = filters.methods
    if filters.get("dataset"):
        entries = [e for e in entries if e["dataset"] == filters.get("dataset")]
    if methods:
        entries = [e for e in entries if e["method"] in {method_label(m) for m in methods}]
    ours = our_lifts(store) if store is not None else {}  # None: no results database yet
    url = store.url if store is not None else cfg["store"]["url"]
    rows = [r for lst in ours.values() for o in lst for r in (o.block.arms[o.label].rows + o.block.baseline.rows)]
    unique = list({r["run_id"]: r for r in rows}.values())
    md = to_markdown(entries, ours, source_lines(url, unique, what="our lifts"), filters.shown_all())
    out = Path(cfg["paths"]["results"]) / "literature.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    if not quiet:
        print(md)
        print(f"wrote {out}")
    if not ours:
        print(f"no tuned comparison in {url} yet: only the published numbers are listed", file=sys.stderr)
    return out
