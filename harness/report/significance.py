"""Method x method significance matrices: ``python -m harness significance``.

Writes ``reports/significance.md`` and ``.tex``. For each block (dataset, student, teacher, budget;
see ``harness.report.blocks``) and every unordered pair of its arms (student-only included):

- the difference of mean val mIoU (row minus column, percentage points) with its 95% bootstrap CI
  (``harness.stats.bootstrap_diff``, seed 0; the mirrored cell is the negated interval);
- Welch's two-sided p-value and, as a second test, Mann-Whitney U's, each Holm-adjusted over the
  k(k-1)/2 pairs of the block (one family per test);
- a warning wherever the numbers of seeds make Mann-Whitney's p < 0.05 impossible (its minimum
  two-sided p with n_a and n_b values is 2 / C(n_a + n_b, n_a));
- cells whose arms have fewer seeds than ``report.min_seeds`` (config, default 3) marked with a dagger.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness import stats
from harness.report.blocks import MISSING, STUDENT_ONLY, Block, load_blocks, source_lines
from harness.report.filters import Filters
from harness.report.render import fmt_p, markdown_table, publish, stars, tex, tex_title

DAGGER = "+"          # Markdown marker of a cell below min_seeds (LaTeX: \dagger)


@dataclass
class Pair:
    a: str
    b: str
    comparison: stats.Comparison
    p_welch_holm: Optional[float] = None
    p_mw_holm: Optional[float] = None
    below_min_seeds: bool = False


@dataclass
class Matrix:
    block: Block
    labels: List[str]
    pairs: Dict[Tuple[str, str], Pair]     # keyed (a, b) with a before b in `labels`
    min_seeds: int
    notes: List[str] = field(default_factory=list)

    def pair(self, a: str, b: str) -> Tuple[Optional[Pair], int]:
        """The pair of a and b and the sign of (a - b) relative to it."""
        if (a, b) in self.pairs:
            return self.pairs[(a, b)], 1
        if (b, a) in self.pairs:
            return self.pairs[(b, a)], -1
        return None, 0


def _order(label: str) -> Tuple[int, int, str]:
    return (0 if label == STUDENT_ONLY else 1, label.count("+"), label)


def build_matrix(block: Block, min_seeds: int = 3, seed: int = 0, n_resamples: int = 9999) -> Matrix:
    labels = sorted(block.arms, key=_order)
    pairs: Dict[Tuple[str, str], Pair] = {}
    for a, b in itertools.combinations(labels, 2):
        va, vb = block.arms[a].values, block.arms[b].values
        pairs[(a, b)] = Pair(a, b, stats.compare(va, vb, seed=seed, n_resamples=n_resamples),
                             below_min_seeds=min(len(va), len(vb)) < min_seeds)
    keys = list(pairs)
    for attr, test in (("p_welch_holm", "welch"), ("p_mw_holm", "mann_whitney")):
        adjusted = stats.holm([getattr(pairs[k].comparison, test).p for k in keys]).adjusted
        for k, p in zip(keys, adjusted):
            setattr(pairs[k], attr, p)
    m = Matrix(block, labels, pairs, min_seeds)
    if len(labels) < 2:
        m.notes.append("only one arm in this block: nothing to compare")
    if STUDENT_ONLY not in labels:
        m.notes.append("no tuned student-only arm in this block")
    m.notes += block.notes
    for label in labels:
        n = block.arms[label].n
        if n < min_seeds:
            m.notes.append(f"{label}: {n} seed(s) < report.min_seeds = {min_seeds}; its cells are marked {DAGGER}")
    warned = set()
    for p in pairs.values():
        u = p.comparison.mann_whitney
        key = tuple(sorted((u.n_a, u.n_b)))
        if u.warning and key not in warned:
            warned.add(key)
            m.notes.append(f"Mann-Whitney: {u.warning} (e.g. {p.a} vs {p.b})")
        w = p.comparison.welch
        if w.p is None:
            m.notes.append(f"{p.a} vs {p.b}: {w.note}")
    floors = [p.comparison.mann_whitney.min_p for p in pairs.values() if p.comparison.mann_whitney.min_p]
    if len(pairs) > 1 and floors and len(pairs) * min(floors) >= stats.ALPHA:
        m.notes.append(f"Mann-Whitney after Holm over {len(pairs)} pairs: the smallest adjusted p any data could "
                       f"give is {len(pairs)} x {min(floors):.3g} = {min(1.0, len(pairs) * min(floors)):.3g}, so no pair "
                       f"can reach {stats.ALPHA:g} with these seeds")
    return m


def build(blocks: Sequence[Block], min_seeds: int = 3) -> List[Matrix]:
    return [build_matrix(b, min_seeds=min_seeds) for b in blocks]


# ---------------------------------------------------------------------------------- rendering
def diff_text(m: Matrix, a: str, b: str, latex: bool = False) -> str:
    if a == b:
        return "--" if latex else "-"
    pair, sign = m.pair(a, b)
    ci = pair.comparison.interval
    if ci.diff is None:
        return MISSING
    d = sign * ci.diff
    if ci.available:
        lo, hi = (ci.low, ci.high) if sign > 0 else (-ci.high, -ci.low)
        text = f"{100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    else:
        text = f"{100 * d:+.2f} [{MISSING}]"
    if pair.below_min_seeds:
        text += r"$^\dagger$" if latex else f" {DAGGER}"
    return text


def p_text(m: Matrix, a: str, b: str, latex: bool = False) -> str:
    if a == b:
        return "--" if latex else "-"
    pair, _ = m.pair(a, b)

    def one(p):
        if p is None:
            return MISSING
        s = fmt_p(p)
        if latex:
            s = s.replace("<", "$<$") + (f"$^{{{stars(p)}}}$" if stars(p) else "")
        else:
            s += stars(p)
        return s

    text = f"{one(pair.p_welch_holm)} / {one(pair.p_mw_holm)}"
    if pair.below_min_seeds:
        text += r"$^\dagger$" if latex else f" {DAGGER}"
    return text


def _arm_line(m: Matrix, label: str) -> str:
    arm = m.block.arms[label]
    mean = MISSING if arm.mean is None else f"{100 * arm.mean:.2f}"
    std = MISSING if arm.std is None else f"{100 * arm.std:.2f}"
    return f"{label}: {mean} +- {std} (n = {arm.n}, seeds {', '.join(map(str, arm.seeds)) or MISSING})"


def to_markdown(mats: Sequence[Matrix], source: Sequence[str], empty_message: str = "") -> str:
    lines = ["# Significance", "",
             "For every pair of arms of a block: the difference of mean val mIoU (row minus column, % points) "
             "with its 95% bootstrap CI, and two-sided p-values of Welch's t-test / Mann-Whitney U, each "
             "Holm-adjusted over the pairs of the block (* < 0.05, ** < 0.01, *** < 0.001). "
             f"{DAGGER}: an arm of the pair has fewer seeds than report.min_seeds.", ""]
    if not mats:
        lines += [empty_message or "No completed rerun rows in the database.", ""]
    for m in mats:
        lines += [f"## {m.block.title}", ""] + [f"- {_arm_line(m, l)}" for l in m.labels] + [""]
        if len(m.labels) >= 2:
            lines += ["Difference row - column [95% CI]:", ""]
            lines += markdown_table([""] + m.labels, [[a] + [diff_text(m, a, b) for b in m.labels] for a in m.labels],
                                    "l" + "r" * len(m.labels))
            lines += ["", "p (Welch, Holm) / p (Mann-Whitney, Holm):", ""]
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
                rf"\multicolumn{{{k + 1}}}{{l}}{{Difference row $-$ column (mIoU \%) [95\% CI]}} \\", r"\midrule", head,
                r"\midrule"]
        out += [" & ".join([tex(a)] + [diff_text(m, a, b, latex=True) for b in m.labels]) + r" \\" for a in m.labels]
        out += [r"\midrule", rf"\multicolumn{{{k + 1}}}{{l}}{{$p$ Welch / $p$ Mann-Whitney, both Holm-adjusted}} \\",
                r"\midrule", head, r"\midrule"]
        out += [" & ".join([tex(a)] + [p_text(m, a, b, latex=True) for b in m.labels]) + r" \\" for a in m.labels]
        out += [r"\bottomrule", r"\end{tabular}",
                rf"\caption{{{tex_title(m.block.title)}: pairwise differences with 95\% bootstrap CIs and Holm-adjusted "
                rf"p-values over the {k * (k - 1) // 2} pairs ($^{{*}}$ $<$0.05, $^{{**}}$ $<$0.01, $^{{***}}$ $<$0.001); "
                rf"$^\dagger$: fewer than {m.min_seeds} seeds.}}",
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
