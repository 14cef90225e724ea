"""The leaderboard: every tuned arm against the tuned student-only arm, from the rerun rows.

``python -m harness leaderboard [dataset=... student=... teacher=... budget=... +method=...]``
writes ``results/leaderboard.md``, ``.csv`` and ``.tex`` (booktabs).

One block per (dataset, student, teacher, budget) (see ``harness.report.blocks``); rows = the tuned
student-only arm, then each method, then each combination. Per row, from the ``final_miou`` of its
completed rerun rows (mIoU in percentage points):

- ``mean +- std (n)``: sample std (n - 1);
- ``lift``: mean(arm) - mean(student-only) with the 95% bootstrap CI of that difference
  (``harness.stats.bootstrap_diff``: BCa, seed 0, 9999 resamples; percentile where BCa is
  degenerate);
- ``p``: two-sided test against the student-only arm, Welch by default (``test=mann-whitney`` for
  the other), Holm-corrected across the distilled rows of the block; markers * / ** / *** for
  adjusted p < 0.05 / 0.01 / 0.001. The CSV also holds the raw Welch and Mann-Whitney p-values;
- energy: mean kWh and kg CO2 of one training run (the rerun rows), and the energy of the arm's
  whole sweep (tuning included: every row of its sweep ids, whatever their status);
- params, FLOPs and CPU latency of the deployed student: measured by ``harness.measure.efficiency``
  and handed in by the caller (``efficiency``: block key -> measurement, or the reason it failed);
- bold: the best mean of the block; underlined (Markdown: _italic_): the other rows whose mean is
  within one std of the best row's std (paper 003's convention).

A missing number is never a 0: the cell says ``n/a`` and the notes under the block say why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness import stats
from harness.report.blocks import MISSING, STUDENT_ONLY, Arm, Block, load_blocks, protocol_of, source_lines
from harness.report.filters import TESTS, Filters
from harness.report.render import fmt_p, markdown_table, pct, publish, stars, tex, tex_title

CSV_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("dataset", "string"), ("student", "string"), ("teacher", "string"), ("budget", "string"),
    ("protocol", "string"), ("row_id", "string"), ("arm", "string"), ("methods", "string"),
    ("n", "int64"), ("seeds", "string"),
    ("miou_mean_pct", "float64"), ("miou_std_pct", "float64"),
    ("lift_pct", "float64"), ("lift_ci_low_pct", "float64"), ("lift_ci_high_pct", "float64"),
    ("ci_method", "string"), ("test", "string"), ("p_raw", "float64"), ("p_holm", "float64"),
    ("marker", "string"), ("p_welch", "float64"), ("p_mann_whitney", "float64"),
    ("mann_whitney_min_p", "float64"),
    ("best", "bool"), ("within_one_std", "bool"),
    ("energy_kwh_per_run", "float64"), ("co2_kg_per_run", "float64"), ("sweep_energy_kwh", "float64"),
    ("params", "Int64"), ("flops", "Int64"), ("latency_ms", "float64"),
    ("notes", "string"), ("database", "string"), ("generated_by_commit", "string"),
)


@dataclass
class Row:
    label: str
    row_id: str
    arm: Arm
    mean: Optional[float] = None
    std: Optional[float] = None
    lift: Optional[float] = None
    ci: Optional[stats.Interval] = None
    welch: Optional[stats.TestResult] = None
    mann_whitney: Optional[stats.TestResult] = None
    p_raw: Optional[float] = None
    p_holm: Optional[float] = None
    best: bool = False
    within_one_std: bool = False
    energy_kwh: Optional[float] = None
    co2_kg: Optional[float] = None
    sweep_energy_kwh: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    @property
    def is_baseline(self) -> bool:
        return self.label == STUDENT_ONLY


@dataclass
class BlockTable:
    block: Block
    rows: List[Row]
    efficiency: Any = None            # harness.measure.efficiency.Efficiency (plain data) or None
    efficiency_note: str = ""
    notes: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------- compute
def _order(label: str) -> Tuple[int, int, str]:
    return (0 if label == STUDENT_ONLY else 1, label.count("+"), label)


def build_block(block: Block, store=None, test: str = "welch", seed: int = 0, n_resamples: int = 9999,
                min_seeds: int = 3, efficiency: Any = None) -> BlockTable:
    """The rows of one block; `efficiency` is the block's measured cost (an object with params,
    flops, latency_ms and describe()), or a text saying why it is missing, or None (no columns)."""
    if test not in TESTS:
        raise ValueError(f"unknown test '{test}'; valid: {', '.join(TESTS)}")
    base = block.baseline
    table = BlockTable(block, [])
    if base is None:
        table.notes.append(f"no tuned student-only arm: no completed '{STUDENT_ONLY}' rerun rows for "
                           f"{block.dataset}/{block.student} with budget {block.budget}; lifts and tests n/a "
                           f"(run the sweep's reruns stage for this student)")
    if not any(label != STUDENT_ONLY for label in block.arms):
        table.notes.append("no distilled arm in this block yet: run python -m harness sweep +method=NAME")
    table.notes += block.notes
    for label in sorted(block.arms, key=_order):
        arm = block.arms[label]
        row = Row(label, block.row_id(label), arm, arm.mean, arm.std)
        if arm.n == 1:
            row.notes.append("one seed: no std, no test")
        elif arm.n < min_seeds:
            row.notes.append(f"{arm.n} seeds < report.min_seeds = {min_seeds}")
        if label != STUDENT_ONLY and base is not None:
            comp = stats.compare(arm.values, base.values, seed=seed, n_resamples=n_resamples)
            row.lift, row.ci, row.welch, row.mann_whitney = comp.interval.diff, comp.interval, comp.welch, comp.mann_whitney
            chosen = comp.welch if test == "welch" else comp.mann_whitney
            row.p_raw = chosen.p
            for text in (comp.interval.note if not comp.interval.available else "", chosen.note if chosen.p is None else "",
                         comp.mann_whitney.warning if test == "mann-whitney" else ""):
                if text and text not in row.notes:
                    row.notes.append(text)
        _energy(row, arm, store)
        table.rows.append(row)
    holm = stats.holm([r.p_raw for r in table.rows if not r.is_baseline])
    for r, p in zip([r for r in table.rows if not r.is_baseline], holm.adjusted):
        r.p_holm = p
    _mark_best(table.rows)
    if isinstance(efficiency, str):
        table.efficiency_note = efficiency
    else:
        table.efficiency = efficiency
    return table


def _energy(row: Row, arm: Arm, store) -> None:
    row.energy_kwh, missing_e = arm.total("energy_kwh")
    row.co2_kg, _ = arm.total("co2_kg")
    if row.energy_kwh is None:
        row.notes.append("no energy recorded for these runs (energy.enabled false or codecarbon unavailable)")
    elif missing_e:
        row.notes.append(f"energy: mean of the {arm.n - missing_e} of {arm.n} runs that recorded it")
    if store is None:
        return
    sweep_ids = sorted({r["sweep_id"] for r in arm.rows if r.get("sweep_id")})
    if not sweep_ids:
        return
    runs = store.query(sweep_id=sweep_ids)
    have = [r["energy_kwh"] for r in runs if r["energy_kwh"] is not None]
    row.sweep_energy_kwh = sum(have) if have else None
    if have and len(have) < len(runs):
        row.notes.append(f"sweep energy: {len(runs) - len(have)} of {len(runs)} runs without energy (not counted)")


def _mark_best(rows: List[Row]) -> None:
    scored = [r for r in rows if r.mean is not None]
    if not scored:
        return
    best = max(scored, key=lambda r: r.mean)
    best.best = True
    if best.std is None:
        return
    for r in scored:
        if r is not best and best.mean - r.mean <= best.std:
            r.within_one_std = True


def build(blocks: Sequence[Block], store=None, efficiency: Optional[Dict[Any, Any]] = None,
          **kw) -> List[BlockTable]:
    """One table per block; `efficiency`: block key -> measured cost or why it is missing."""
    return [build_block(b, store=store, efficiency=(efficiency or {}).get(b.key), **kw) for b in blocks]


# ---------------------------------------------------------------------------------- rendering
def _mean_cell(r: Row) -> str:
    if r.mean is None:
        return MISSING
    std = MISSING if r.std is None else f"{100 * r.std:.2f}"
    return f"{100 * r.mean:.2f} +- {std} ({r.arm.n})"


def _lift_cell(r: Row) -> str:
    if r.is_baseline:
        return "(reference)"
    if r.lift is None:
        return MISSING
    ci = r.ci
    inner = f"[{100 * ci.low:+.2f}, {100 * ci.high:+.2f}]" if ci is not None and ci.available else f"[{MISSING}]"
    return f"{100 * r.lift:+.2f} {inner}"


def _p_cell(r: Row) -> str:
    if r.is_baseline:
        return ""
    return MISSING if r.p_holm is None else f"{fmt_p(r.p_holm)}{stars(r.p_holm)}"


def _energy_cell(value: Optional[float], scale: float, digits: int = 3) -> str:
    """Three significant digits (a smoke run's energy is a few millionths of a kWh)."""
    return MISSING if value is None else f"{value * scale:.{digits}g}"


def _eff_cells(t: BlockTable) -> Tuple[str, str, str]:
    e = t.efficiency
    if e is None:
        return MISSING, MISSING, MISSING
    lat = MISSING if e.latency_ms is None else f"{e.latency_ms:.1f}"
    return f"{e.params / 1e6:.2f}", f"{e.flops / 1e9:.2f}", lat


def _footnotes(t: BlockTable) -> List[str]:
    out = list(t.notes)
    out += [f"[{r.label}] {n}" for r in t.rows for n in r.notes]
    if t.efficiency_note:
        out.append(t.efficiency_note)
    elif t.efficiency is not None:
        out.append(t.efficiency.describe())
    return out


HEADER = ("id", "arm", "mIoU mean +- std (n)", "lift [95% CI]", "p (Holm)", "kWh/run", "g CO2/run",
          "sweep kWh", "params M", "GFLOPs", "latency ms")


def to_markdown(tables: Sequence[BlockTable], source: Sequence[str], test: str = "welch",
                empty_message: str = "") -> str:
    lines = ["# Leaderboard", "",
             f"Tuned arms against the tuned student-only arm (rerun seeds, val mIoU in %). Lift = difference of "
             f"means with its 95% bootstrap CI; p = {'Welch t-test' if test == 'welch' else 'Mann-Whitney U'} against "
             f"the student-only arm, Holm-corrected within the block (* < 0.05, ** < 0.01, *** < 0.001). "
             f"**Bold**: best mean of the block; _italic_ (underlined in LaTeX): within one std of it.", ""]
    if not tables:
        lines += [empty_message or "No completed rerun rows in the database.", ""]
    for t in tables:
        lines += [f"## {t.block.title}", ""]
        body = []
        params, flops, lat = _eff_cells(t)
        for r in t.rows:
            mean = _mean_cell(r)
            mean = f"**{mean}**" if r.best else f"_{mean}_" if r.within_one_std else mean
            body.append([r.row_id, r.label, mean, _lift_cell(r), _p_cell(r),
                         _energy_cell(r.energy_kwh, 1), _energy_cell(r.co2_kg, 1000),
                         _energy_cell(r.sweep_energy_kwh, 1), params, flops, lat])
        lines += markdown_table(HEADER, body, "llrrrrrrrrr")
        notes = _footnotes(t)
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        lines.append("")
    lines += ["---", ""] + [f"{s}  " for s in source]
    return "\n".join(lines).rstrip() + "\n"


def to_latex(tables: Sequence[BlockTable], source: Sequence[str], test: str = "welch",
             empty_message: str = "") -> str:
    ncol = len(HEADER) - 1   # the row id goes into the CSV / Markdown only; LaTeX gets the arm
    out = [f"% {s}" for s in source]
    out += [r"% needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering", r"\scriptsize",
            r"\begin{tabular}{l" + "r" * (ncol - 1) + "}", r"\toprule",
            " & ".join([r"Arm", r"mIoU (\%)", r"Lift [95\% CI]", r"$p_\mathrm{Holm}$", r"kWh/run",
                        r"g CO$_2$/run", r"Sweep kWh", r"Params (M)", r"GFLOPs", r"Latency (ms)"]) + r" \\"]
    if not tables:
        out += [r"\midrule", rf"\multicolumn{{{ncol}}}{{l}}{{{tex(empty_message or 'No completed rerun rows.')}}} \\"]
    for t in tables:
        out += [r"\midrule", rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{{tex_title(t.block.title)}}}}} \\", r"\midrule"]
        params, flops, lat = _eff_cells(t)
        for r in t.rows:
            if r.mean is None:
                mean = MISSING
            else:
                std = MISSING if r.std is None else f"{100 * r.std:.2f}"
                mean = rf"{100 * r.mean:.2f} $\pm$ {std} ({r.arm.n})"
            mean = rf"\textbf{{{mean}}}" if r.best else rf"\underline{{{mean}}}" if r.within_one_std else mean
            p = "" if r.is_baseline else (MISSING if r.p_holm is None else
                                          fmt_p(r.p_holm).replace("<", "$<$") + (f"$^{{{stars(r.p_holm)}}}$" if stars(r.p_holm) else ""))
            cells = [tex(r.label), mean, tex(_lift_cell(r)).replace("+-", r"$\pm$"), p,
                     _energy_cell(r.energy_kwh, 1), _energy_cell(r.co2_kg, 1000),
                     _energy_cell(r.sweep_energy_kwh, 1), params, flops, lat]
            out.append(" & ".join(cells) + r" \\")
    test_name = "Welch t-test" if test == "welch" else "Mann-Whitney U"
    out += [r"\bottomrule", r"\end{tabular}",
            rf"\caption{{Tuned arms against the tuned student-only arm: val mIoU mean $\pm$ std (n seeds), lift with "
            rf"95\% bootstrap CI, {test_name} p-value Holm-corrected within each block "
            rf"($^{{*}}$ $<$0.05, $^{{**}}$ $<$0.01, $^{{***}}$ $<$0.001). Best mean in bold, within one std of it "
            rf"underlined. n/a: see results/leaderboard.md for the reason.}}",
            r"\label{tab:leaderboard}", r"\end{table}"]
    return "\n".join(out) + "\n"


def csv_rows(tables: Sequence[BlockTable], database: str, commit: str, test: str = "welch") -> List[Dict[str, Any]]:
    out = []
    for t in tables:
        b, e = t.block, t.efficiency
        for r in t.rows:
            protocols = sorted({p for p in (protocol_of(x) for x in r.arm.rows) if p})
            out.append({
                "dataset": b.dataset, "student": b.student, "teacher": b.teacher, "budget": b.budget,
                "protocol": ",".join(protocols) or None, "row_id": r.row_id,
                "arm": STUDENT_ONLY if r.is_baseline else "distilled",
                "methods": None if r.is_baseline else r.label, "n": r.arm.n,
                "seeds": " ".join(map(str, r.arm.seeds)) or None,
                "miou_mean_pct": pct(r.mean, 6), "miou_std_pct": pct(r.std, 6), "lift_pct": pct(r.lift, 6),
                "lift_ci_low_pct": pct(r.ci.low, 6) if r.ci else None,
                "lift_ci_high_pct": pct(r.ci.high, 6) if r.ci else None,
                "ci_method": (r.ci.method or None) if r.ci else None,
                "test": None if r.is_baseline else test, "p_raw": r.p_raw, "p_holm": r.p_holm,
                "marker": stars(r.p_holm) or None,
                "p_welch": r.welch.p if r.welch else None,
                "p_mann_whitney": r.mann_whitney.p if r.mann_whitney else None,
                "mann_whitney_min_p": r.mann_whitney.min_p if r.mann_whitney else None,
                "best": r.best, "within_one_std": r.within_one_std,
                "energy_kwh_per_run": r.energy_kwh, "co2_kg_per_run": r.co2_kg,
                "sweep_energy_kwh": r.sweep_energy_kwh,
                "params": e.params if e else None, "flops": e.flops if e else None,
                "latency_ms": e.latency_ms if e else None,
                "notes": "; ".join(t.notes + r.notes + ([t.efficiency_note] if t.efficiency_note else [])) or None,
                "database": database, "generated_by_commit": commit,
            })
    return out


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    import pandas as pd

    df = pd.DataFrame(rows, columns=[c for c, _ in CSV_COLUMNS])
    df.to_csv(path, index=False)


def read_csv(path) -> "Any":
    """The leaderboard CSV as a DataFrame with its declared dtypes (strings as pandas 'string')."""
    import pandas as pd

    return pd.read_csv(path, dtype=dict(CSV_COLUMNS), keep_default_na=True)


# ---------------------------------------------------------------------------------------- write
def write(cfg: Dict[str, Any], store, filters: Filters = Filters(), blocks: Optional[Sequence[Block]] = None,
          efficiency: Optional[Dict[Any, Any]] = None, quiet: bool = False) -> Dict[str, Path]:
    """Build the leaderboard of `blocks` (default: the filtered blocks of `store`), write the three
    files into cfg's results folder, return their paths. `efficiency`: see `build`."""
    from harness.provenance import git_commit

    test = filters.test
    if blocks is None:
        blocks = load_blocks(store, **filters.selection())
    min_seeds = int((cfg.get("report") or {}).get("min_seeds", 3))
    tables = build(blocks, store, efficiency, test=test, min_seeds=min_seeds)
    rows = [x for t in tables for x in t.block.rows]
    shown = filters.shown()
    source = source_lines(store.url, rows, what="leaderboard") + [f"Filters: {shown}"]
    empty = ""
    if not tables:
        empty = (f"No completed rerun rows{' matching ' + shown if shown != 'none' else ''} in {store.url}: "
                 f"run python -m harness sweep +method=NAME first (its last stage, reruns, fills this table).")
    return publish(cfg["paths"]["results"], "leaderboard", {
        "md": to_markdown(tables, source, test, empty),
        "csv": lambda path: write_csv(csv_rows(tables, store.url, git_commit() or "", test), path),
        "tex": to_latex(tables, source, test, empty)}, quiet, empty)
