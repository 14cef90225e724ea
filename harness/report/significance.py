"""Method x method significance matrices: ``python -m harness significance``.

Writes ``reports/significance.md`` and ``.tex``. For each block (dataset, student, teacher, budget;
see ``harness.report.blocks``) and every pair of its arms, the numbers of ``harness.report.verdicts``
(computed once per block, the same objects the leaderboard prints):

- the lift (row minus column, percentage points): mean of the per-seed differences with its 95 %
  paired-t interval (Welch's when the arms share fewer than two seeds);
- two-sided p-values of that t-test / of the exact permutation test, each Holm-adjusted within its
  **family**: "vs the tuned student" (every distilled arm against the student-only arm: the
  leaderboard's family, so those cells equal the leaderboard's numbers) and "between methods"
  (every pair of distilled arms). The families are the block's, whatever the filters show;
- cells whose arms have fewer seeds than ``report.min_seeds`` (config, default 3) marked with a dagger.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness.report import verdicts as verdicts_
from harness.report.blocks import MISSING, STUDENT_ONLY, Block, load_blocks, source_lines
from harness.report.filters import Filters
from harness.report.render import fmt_p, markdown_table, publish, stars, tex, tex_title

DAGGER = "+"          # Markdown marker of a cell below min_seeds (LaTeX: \dagger)


@dataclass
class Matrix:
    block: Block
    labels: List[str]                       # the shown arms, student-only first
    verdicts: verdicts_.BlockVerdicts       # every arm of the block (the families)
    min_seeds: int
    notes: List[str] = field(default_factory=list)

    def pair(self, a: str, b: str) -> Tuple[Optional[verdicts_.Comparison], int]:
        """The comparison of a and b and the sign of (a - b) relative to it."""
        return self.verdicts.get(a, b)

    def below_min_seeds(self, a: str, b: str) -> bool:
        return min(self.block.all_arms[a].n, self.block.all_arms[b].n) < self.min_seeds


def _order(label: str) -> Tuple[int, int, str]:
    return (0 if label == STUDENT_ONLY else 1, label.count("+"), label)


def build_matrix(block: Block, min_seeds: int = 3, verdicts: Optional[verdicts_.BlockVerdicts] = None) -> Matrix:
    labels = sorted(block.arms, key=_order)
    v = verdicts if verdicts is not None else verdicts_.verdicts_of(block)
    m = Matrix(block, labels, v, min_seeds)
    if len(labels) < 2:
        m.notes.append("only one arm in this block: nothing to compare")
    if STUDENT_ONLY not in labels:
        m.notes.append("no tuned student-only arm in this block")
    m1, m2 = v.family_sizes
    hidden = len(block.all_arms) - len(labels)
    m.notes.append(f"families: vs the tuned student (Holm over {m1}, the leaderboard's), between methods "
                   f"(Holm over {m2} pairs)" + (f"; {hidden} arm(s) hidden by the filter still count" if hidden else ""))
    m.notes += block.notes
    for label in labels:
        arm = block.all_arms[label]
        if arm.n < min_seeds:
            m.notes.append(f"{label}: {arm.n} seed(s) < report.min_seeds = {min_seeds}; its cells are marked {DAGGER}")
        for lost in arm.lost_reasons():
            m.notes.append(f"{label}: not completed, left out: {lost}")
    floors = set()
    for c in list(v.vs_student.values()) + list(v.between.values()):
        if c.a not in labels or c.b not in labels:
            continue
        for text in c.verdict.notes:
            m.notes.append(f"{c.a} vs {c.b}: {text}")
        if c.permutation.warning and c.permutation.min_p not in floors:
            floors.add(c.permutation.min_p)
            m.notes.append(f"permutation test: {c.permutation.warning} (e.g. {c.a} vs {c.b}), so it cannot reach 0.05")
    return m


def build(blocks: Sequence[Block], min_seeds: int = 3) -> List[Matrix]:
    return [build_matrix(b, min_seeds=min_seeds) for b in blocks]


# ---------------------------------------------------------------------------------- rendering
def diff_text(m: Matrix, a: str, b: str, latex: bool = False) -> str:
    if a == b:
        return "--" if latex else "-"
    pair, sign = m.pair(a, b)
    v = None if pair is None else pair.verdict
    if v is None or v.lift is None:
        return MISSING
    d = sign * v.lift
    if v.low is not None:
        lo, hi = (v.low, v.high) if sign > 0 else (-v.high, -v.low)
        text = f"{100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    else:
        text = f"{100 * d:+.2f} [{MISSING}]"
    if v.design == "unpaired":
        text += " W"
    if m.below_min_seeds(a, b):
        text += r"$^\dagger$" if latex else f" {DAGGER}"
    return text


def p_text(m: Matrix, a: str, b: str, latex: bool = False) -> str:
    if a == b:
        return "--" if latex else "-"
    pair, _ = m.pair(a, b)
    if pair is None:
        return MISSING

    def one(p):
        if p is None:
            return MISSING
        s = fmt_p(p)
        if latex:
            s = s.replace("<", "$<$") + (f"$^{{{stars(p)}}}$" if stars(p) else "")
        else:
            s += stars(p)
        return s

    text = f"{one(pair.p_holm)} / {one(pair.p_perm_holm)}"
    if m.below_min_seeds(a, b):
        text += r"$^\dagger$" if latex else f" {DAGGER}"
    return text


def _arm_line(m: Matrix, label: str) -> str:
    arm = m.block.arms[label]
    mean = MISSING if arm.mean is None else f"{100 * arm.mean:.2f}"
    std = MISSING if arm.std is None else f"{100 * arm.std:.2f}"
    return f"{label}: {mean} +- {std} (n = {arm.n}, seeds {', '.join(map(str, arm.seeds)) or MISSING})"


def to_markdown(mats: Sequence[Matrix], source: Sequence[str], empty_message: str = "") -> str:
    lines = ["# Significance", "",
             "For every pair of arms of a block: the lift (row minus column, mean of the per-seed differences, "
             "val mIoU % points) with its 95% paired-t interval (W: Welch, the arms share fewer than two seeds), "
             "and two-sided p-values of that t-test / of the exact permutation test, each Holm-adjusted within "
             "its family: vs the tuned student (the leaderboard's family: same numbers) or between methods "
             f"(* < 0.05, ** < 0.01, *** < 0.001). {DAGGER}: an arm of the pair has fewer seeds than "
             "report.min_seeds.", ""]
    if not mats:
        lines += [empty_message or "No completed rerun rows in the database.", ""]
    for m in mats:
        lines += [f"## {m.block.title}", ""] + [f"- {_arm_line(m, l)}" for l in m.labels] + [""]
        if len(m.labels) >= 2:
            lines += ["Lift row - column [95% CI]:", ""]
            lines += markdown_table([""] + m.labels, [[a] + [diff_text(m, a, b) for b in m.labels] for a in m.labels],
                                    "l" + "r" * len(m.labels))
            lines += ["", "p (t, Holm in its family) / p (permutation, Holm in its family):", ""]
            lines += markdown_table([""] + m.labels, [[a] + [p_text(m, a, b) for b in m.labels] for a in m.labels],
                                    "l" + "r" * len(m.labels))
        if m.notes:
            lines += [""] + [f"- {n}" for n in m.notes]
        lines.append("")
    lines += ["---", ""] + [f"{s}  " for s in source]
    return "\n".join(lines).rstrip() + "\n"


def to_latex(mats: Sequence[Matrix], source: Sequence[str], empty_message: str = "") -> str:
    out = [f"% {s}" for s in source] + [r"% needs \usepackage{booktabs}"]
    if not mats:
        out += [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l}", r"\toprule",
                tex(empty_message or "No completed rerun rows.") + r" \\", r"\bottomrule", r"\end{tabular}",
                r"\caption{Significance: no data.}", r"\end{table}"]
    for i, m in enumerate(mats):
        if len(m.labels) < 2:
            out.append(f"% {tex(m.block.title)}: only one arm, nothing to compare")
            continue
        k = len(m.labels)
        head = " & ".join([""] + [tex(l) for l in m.labels]) + r" \\"
        out += [r"\begin{table}[t]", r"\centering", r"\scriptsize", r"\begin{tabular}{l" + "r" * k + "}", r"\toprule",
                rf"\multicolumn{{{k + 1}}}{{l}}{{Lift row $-$ column (mIoU \%) [95\% paired-$t$ CI]}} \\", r"\midrule", head,
                r"\midrule"]
        out += [" & ".join([tex(a)] + [diff_text(m, a, b, latex=True) for b in m.labels]) + r" \\" for a in m.labels]
        out += [r"\midrule", rf"\multicolumn{{{k + 1}}}{{l}}{{$p$ ($t$) / $p$ (permutation), Holm-adjusted within each family}} \\",
                r"\midrule", head, r"\midrule"]
        out += [" & ".join([tex(a)] + [p_text(m, a, b, latex=True) for b in m.labels]) + r" \\" for a in m.labels]
        out += [r"\bottomrule", r"\end{tabular}",
                rf"\caption{{{tex_title(m.block.title)}: pairwise lifts with 95\% paired-$t$ intervals and $p$-values "
                rf"Holm-adjusted within their family (vs the tuned student: {m.verdicts.family_sizes[0]} comparisons; "
                rf"between methods: {m.verdicts.family_sizes[1]}) ($^{{*}}$ $<$0.05, $^{{**}}$ $<$0.01, "
                rf"$^{{***}}$ $<$0.001); $^\dagger$: fewer than {m.min_seeds} seeds.}}",
                rf"\label{{tab:significance-{i}}}", r"\end{table}", ""]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------- write
def write(cfg: Dict[str, Any], store, filters: Filters = Filters(), blocks: Optional[Sequence[Block]] = None,
          quiet: bool = False) -> Dict[str, Path]:
    """The matrices of `blocks` (default: the filtered blocks of `store`) into cfg's reports folder."""
    if blocks is None:
        blocks = load_blocks(store, **filters.selection())
    min_seeds = int((cfg.get("report") or {}).get("min_seeds", 3))
    mats = build(blocks, min_seeds=min_seeds)
    rows = [r for m in mats for r in m.block.rows]
    source = source_lines(store.url, rows, what="significance") + [
        f"Filters: {filters.shown()}; report.min_seeds = {min_seeds}"]
    empty = "" if mats else (f"No completed rerun rows in {store.url}: run python -m harness sweep +method=NAME "
                             f"first (its reruns stage gives the seeds compared here).")
    return publish(cfg["paths"]["reports"], "significance",
                   {"md": to_markdown(mats, source, empty), "tex": to_latex(mats, source, empty)}, quiet, empty)
