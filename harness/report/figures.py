"""Figures of `python -m harness report` (matplotlib, Agg backend, PNG in `reports/`), drawn from
the rows and from plain measurements handed in by the caller; nothing here runs a model.

Each figure carries its source under the plot (database, protocol, budget, seeds, date, git commit;
`harness.report.blocks.source_lines`), and `reports/figures.md` lists every figure written and,
for each figure that could not be drawn, why (empty database, no such stage, teacher not trained).

* ``history_<sweep>.png`` -- optimisation history per stage and arm: for every sweep (one arm of a
  comparison, `sweep_id`) one panel per stage / sub-stage, trials in the order they were recorded,
  the final mIoU of each (completed: filled; stopped early by ASHA: hollow, at the mIoU it had
  reached; failed: a cross on the x axis) and the best-so-far line of the completed trials. A rerun
  stage is no search (its trials are independent seeds of one configuration): its panel shows the
  seeds' points and their mean +- sd, never a best-so-far line (`history_series`).
* ``response_<sweep>.png`` -- response curves (paper 003, Tables 4 and 5 as figures): for every
  temperature and loss weight searched in a stage, the tune mIoU of each trial against the value
  (points) and the mean per value (line). The value comes from `params_json`; the searched path
  from the sub-stage name (`weights[method.kd.weight]`) or, for a stage that searched several paths
  at once, from the method paths that vary. What a path is comes from the record
  (`extra_json.param_kinds`, the methods' Config metadata as the sweep saw it) or, for rows stored
  before records carried it, from the placeholder (`$temperatures`, `$weights`) of the row's stage
  in its protocol; never from the path's name.
* ``seeds_<block>.png`` -- per-seed distributions of every leaderboard row (the rerun rows of each
  arm: one point per seed, the seed told by its marker and place in a legend, no text labels that
  could collide; mean +- std bar).
* ``pareto_<block>.png`` -- val mIoU against training energy per run (kWh, log scale) of each arm
  and of the teacher, the Pareto front (no other point has both more mIoU and less energy) drawn as
  a line; arms in a legend (no point labels that could collide); arms without energy are named in
  the figure, never drawn at zero.
* ``tuning_<block>.png`` -- expected best tune mIoU against the number of tuning trials, every arm
  of the block (Dodge et al. 2019 with Tang et al. 2020's unbiased estimator; `harness.report.tuning`).
* ``entropy_<teacher>.png`` -- paper 003 Figure 1: share of pixels per Shannon entropy (nats,
  0 .. ln K) of the teacher's softmax(z / tau) for tau in 1, 2, 4, 8, 16, as measured by
  `harness.measure.entropy` (the first val images, every pixel; the teacher from the cache only).
* ``show_<block>_<method>.png`` (`python -m harness show`) -- the qualitative grid whose label maps
  `harness.measure.show.predict_grid` predicted: input, ground truth, teacher, tuned student-only and
  distilled arm per val image, in the dataset's palette.
"""
from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness.report.blocks import (MISSING, STUDENT_ONLY, Block, RerunStages, budget_of, method_label, protocol_of,
                                    source_lines)
from harness.report.energy import run_energy, teacher_runs
from harness.report.names import block_title, dataset_name, method_name, model_name, param_name, stage_name
from harness.report.tuning import FOOTER_PT, expected_best_figures, shown_database, source_text
from harness.sweep.protocol import PLACEHOLDERS, load_protocol, parse_stage_name

Output = Tuple[Optional[Path], str]  # (file written or None, what it shows / why it is missing)


# ------------------------------------------------------------------------------------ helpers
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


TUNED_KINDS = ("temperature", "weight")  # what the response curves show


class ParamKinds:
    """What a method parameter of a sweep row is (temperature, weight, aux_weight, structural).

    The sweep records it with each trial (`extra_json.param_kinds`). For a row stored before it did,
    the row's stage in its protocol decides: a stage whose space expands exactly one placeholder
    (`$temperatures`, `$weights`) searched settings of that kind. One protocol load per name."""

    def __init__(self) -> None:
        self._protocols: Dict[Optional[str], Any] = {}

    def _protocol(self, name: Optional[str]):
        if name not in self._protocols:
            try:
                self._protocols[name] = load_protocol(name) if name else None
            except Exception:  # noqa: BLE001 - an old or moved protocol: the kind stays unknown
                self._protocols[name] = None
        return self._protocols[name]

    def __call__(self, row: Dict[str, Any], path: str) -> Optional[str]:
        recorded = (row.get("extra_json") or {}).get("param_kinds")
        if recorded is not None:
            return recorded.get(path)
        protocol = self._protocol(protocol_of(row))
        stage_name = parse_stage_name(row.get("stage") or "")[0]
        stage = next((s for s in protocol.stages if s.name == stage_name), None) if protocol else None
        kinds = {PLACEHOLDERS[k] for k in (stage.space if stage else {}) if k in PLACEHOLDERS}
        if len(kinds) == 1 and path.startswith("method.") and path not in stage.space:
            return kinds.pop()
        return None


def footer(store_url: str, rows: Sequence[Dict[str, Any]], what: str, reruns: bool = True) -> List[str]:
    """source_lines, the database named without the drawing machine's absolute path
    (`tuning.shown_database`); for figures of sweep rows (any stage) the first line says so."""
    shown = shown_database(store_url)
    lines = source_lines(shown, rows, what)
    if not reruns:
        lines[0] = f"Source: {what} from {len(rows)} row(s) (all stages) of {shown}"
    return lines


def save(fig, path: Path, lines: Sequence[str]) -> Path:
    """Write `fig` as PNG with `lines` (its source) under everything else drawn, at a readable size
    (FOOTER_PT), wrapped to the figure's width."""
    bottom = fig.get_tightbbox(fig.canvas.get_renderer()).y0 / fig.get_figheight()  # below tick labels
    fig.text(0.0, bottom - 0.02, source_text(lines, fig.get_figwidth()), fontsize=FOOTER_PT, va="top", ha="left",
             family="monospace")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def arm_label(rows: Sequence[Dict[str, Any]]) -> str:
    r = rows[0]
    return method_label(r["methods"]) if r["arm"] != STUDENT_ONLY else STUDENT_ONLY


def arm_name(rows: Sequence[Dict[str, Any]]) -> str:
    """A sweep's arm as the Markdown index (figures.md) names it: config keys."""
    r = rows[0]
    teacher = f" <- {r['teacher']}" if r.get("teacher") else ""
    return f"{arm_label(rows)}: {r['student']}{teacher} on {r['dataset']}, budget {budget_of(r) or MISSING}"


def arm_title(rows: Sequence[Dict[str, Any]]) -> str:
    """A sweep's arm as figure titles name it: 'CWD: PSPNet-R18 (¼ width) ← DeepLabV3-R18 (½ width),
    Synthetic, quick budget' (paper names, `harness.report.names`)."""
    r = rows[0]
    teacher = f" ← {model_name(r['teacher'])}" if r.get("teacher") else ""
    return (f"{method_name(arm_label(rows))}: {model_name(r['student'])}{teacher}, {dataset_name(r['dataset'])}, "
            f"{budget_of(r) or MISSING} budget")


def sweeps(store, filters: Optional[dict] = None) -> Dict[str, List[Dict[str, Any]]]:
    """sweep_id -> its rows (every stage), oldest first, optionally filtered like load_blocks."""
    f = dict(filters or {})
    equals = {k: f[k] for k in ("dataset", "student") if f.get(k) is not None}
    out: Dict[str, List[Dict[str, Any]]] = {}
    for r in store.query(**equals):
        if not r.get("sweep_id") or r["arm"] not in (STUDENT_ONLY, "distilled"):
            continue
        if f.get("budget") is not None and budget_of(r) != f["budget"]:
            continue
        if f.get("teacher") is not None and r["arm"] == "distilled" and r["teacher"] != f["teacher"]:
            continue
        if f.get("methods") is not None and r["arm"] == "distilled" and \
                method_label(r["methods"]) not in {method_label(m) for m in f["methods"]}:
            continue
        out.setdefault(r["sweep_id"], []).append(r)
    return out


def _stages(rows: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    out: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["stage"] or MISSING, []).append(r)
    return out


def _grid(n: int, width: float = 3.6, height: float = 2.8):
    plt = _pyplot()
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


# -------------------------------------------------------------------------- optimisation history
def optimisation_history(store, out_dir: Path, filters: Optional[dict] = None) -> List[Output]:
    found = sweeps(store, filters)
    if not found:
        return [(None, f"optimisation history: no sweep rows in {store.url}")]
    out: List[Output] = []
    from matplotlib.ticker import MaxNLocator

    is_rerun = RerunStages()
    for sweep_id, rows in found.items():
        stages = _stages(rows)
        fig, axes = _grid(len(stages))
        for ax, (stage, srows) in zip(axes, stages.items()):
            series = history_series(srows, rerun=all(is_rerun(r)[0] for r in srows))
            for i, v, status in series["points"]:
                if status == "completed":
                    ax.plot(i, v, "o", color="C0", ms=4)
                elif status == "failed":
                    ax.plot(i, 0, "x", color="C3", ms=5, clip_on=False)
                else:
                    ax.plot(i, v, "o", mfc="none", color="0.5", ms=4)
            if series["best_so_far"] is not None:
                ax.step(range(1, len(srows) + 1), series["best_so_far"], where="post", color="C1", lw=1)
            elif series["mean"] is not None:  # independent seeds: their mean +- sd, no search to follow
                ax.axhline(series["mean"], color="C2", lw=1)
                if series["sd"]:
                    ax.axhspan(series["mean"] - series["sd"], series["mean"] + series["sd"], color="C2", alpha=0.15, lw=0)
            split = srows[0].get("split") or MISSING
            kind = "seed" if series["best_so_far"] is None else "trial"
            ax.set_title(f"{stage_name(stage)}\n({len(srows)} {kind}{'s' if len(srows) != 1 else ''}, {split} split)",
                         fontsize=9)
            ax.set_xlabel("seed run (recording order)" if kind == "seed" else "trial (recording order)", fontsize=8)
            if len(srows) <= 12:
                ax.set_xticks(range(1, len(srows) + 1))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlim(0.5, len(srows) + 0.5)
            ax.set_ylabel("mIoU (%)", fontsize=8)
            ax.tick_params(labelsize=8)
        fig.suptitle(f"Optimisation history: {arm_title(rows)}\n"
                     "filled: completed, hollow: stopped early (ASHA), x: failed; orange: best so far; "
                     "green: the seeds' mean ± sd", fontsize=10)
        fig.tight_layout()
        path = save(fig, out_dir / f"history_{slug(sweep_id)}.png",
                    footer(store.url, rows, f"optimisation history of sweep {sweep_id}", reruns=False))
        out.append((path, f"optimisation history per stage of {arm_name(rows)}"))
    return out


def history_series(rows: Sequence[Dict[str, Any]], rerun: bool = False) -> Dict[str, Any]:
    """What one panel of the history figure draws: ``points`` [(trial number, mIoU %, status)]
    (status completed / pruned (also stopped) / failed, a failed one or one without mIoU at 0), and
    either ``best_so_far`` (a search stage: the running best of the completed trials, NaN before the
    first) or, for a rerun stage (independent seeds of one configuration, nothing to take the best
    of), ``best_so_far`` None and the seeds' ``mean`` and ``sd`` (completed rows)."""
    points, best, line = [], -math.inf, []
    for i, r in enumerate(rows, start=1):
        v = r["final_miou"]
        if r["status"] == "failed" or v is None:
            points.append((i, 0.0, "failed"))
        elif r["status"] == "completed":
            points.append((i, 100 * v, "completed"))
            best = max(best, 100 * v)
        else:
            points.append((i, 100 * v, "pruned"))
        line.append(best if best > -math.inf else math.nan)
    done = [v for _, v, s in points if s == "completed"]
    return {"points": points, "best_so_far": None if rerun else line,
            "mean": statistics.fmean(done) if rerun and done else None,
            "sd": statistics.stdev(done) if rerun and len(done) > 1 else (0.0 if rerun and done else None)}


# --------------------------------------------------------------------------------- response
def response_data(rows: Sequence[Dict[str, Any]], kinds: Optional[ParamKinds] = None
                  ) -> Dict[Tuple[str, str], Tuple[str, List[Tuple[float, float, str]]]]:
    """(stage, path) -> (kind, [(value, mIoU, status)]) for every temperature / loss weight searched
    in a stage."""
    kinds = kinds or ParamKinds()
    out: Dict[Tuple[str, str], Tuple[str, List[Tuple[float, float, str]]]] = {}
    for stage, srows in _stages(rows).items():
        _, searched = parse_stage_name(stage)
        if searched is not None:
            paths = [searched]
        else:
            keys = {k for r in srows for k in (r.get("params_json") or {})}
            paths = sorted(k for k in keys if len({repr((r.get("params_json") or {}).get(k)) for r in srows}) > 1)
        for path in paths:
            kind = next((k for k in (kinds(r, path) for r in srows) if k is not None), None)
            if kind not in TUNED_KINDS:
                continue
            for r in srows:
                value = (r.get("params_json") or {}).get(path)
                if value is None or r["final_miou"] is None or r["status"] == "failed":
                    continue
                out.setdefault((stage, path), (kind, []))[1].append((float(value), float(r["final_miou"]), r["status"]))
    return out


def response_curves(store, out_dir: Path, filters: Optional[dict] = None) -> List[Output]:
    out: List[Output] = []
    for sweep_id, rows in sweeps(store, filters).items():
        data = response_data(rows)
        if not data:
            continue
        fig, axes = _grid(len(data))
        used = []
        for ax, ((stage, path), (kind, points)) in zip(axes, sorted(data.items(),
                                                                     key=lambda kv: (kv[1][0] != "temperature", kv[0]))):
            stage_rows = [r for r in rows if r["stage"] == stage]
            used += stage_rows
            for status, style in (("completed", dict(color="C0")), ("pruned", dict(mfc="none", color="0.5"))):
                xs = [x for x, _, s in points if (s == "completed") == (status == "completed")]
                ys = [100 * y for _, y, s in points if (s == "completed") == (status == "completed")]
                ax.plot(xs, ys, "o", ms=4, label=status if status == "completed" else "stopped early (ASHA)", **style)
            by_value: Dict[float, List[float]] = {}
            for x, y, s in points:
                if s == "completed":
                    by_value.setdefault(x, []).append(100 * y)
            xs = sorted(by_value)
            ax.plot(xs, [statistics.fmean(by_value[x]) for x in xs], "-", color="C0", lw=1)
            values = [x for x, _, _ in points]
            if min(values) > 0 and max(values) / min(values) >= 4:
                ax.set_xscale("log", base=2 if kind == "temperature" else 10)
            ax.set_xlabel(param_name(path), fontsize=8)
            ax.set_ylabel(f"mIoU (%), {stage_rows[0].get('split') or MISSING} split", fontsize=8)
            ax.set_title(f"{param_name(path)}" + (f"\n(stage: {stage_name(stage)})" if stage_name(stage) != param_name(path)
                                                  else ""), fontsize=9)
            ax.tick_params(labelsize=8)
            ax.legend(fontsize=7)
        fig.suptitle(f"Response curves: {arm_title(rows)}", fontsize=10)
        fig.tight_layout()
        path = save(fig, out_dir / f"response_{slug(sweep_id)}.png",
                    footer(store.url, used, f"response curves of sweep {sweep_id}", reruns=False))
        out.append((path, f"response curves of {', '.join(p for _, p in data)} for {arm_name(rows)}"))
    if not out:
        out.append((None, "response curves: no temperature or loss-weight stage rows in the database"))
    return out


# ------------------------------------------------------------------------------- per-seed
def block_slug(block: Block) -> str:
    return block.file_stem


def seed_distributions(store, blocks: Sequence[Block], out_dir: Path) -> List[Output]:
    if not blocks:
        return [(None, f"per-seed distributions: no completed rerun rows in {store.url}")]
    from matplotlib.lines import Line2D

    plt = _pyplot()
    out: List[Output] = []
    for block in blocks:
        labels = list(block.arms)
        seeds = sorted({r["seed"] for arm in block.arms.values() for r in arm.rows if r.get("seed") is not None},
                       key=lambda x: (str(type(x)), x))
        place = seed_offsets(seeds)
        fig, ax = plt.subplots(figsize=(1.5 * len(labels) + 3.2, 3.8))
        for i, label in enumerate(labels):
            arm = block.arms[label]
            for r in arm.rows:
                ax.plot(i + place.get(r["seed"], 0.0), 100 * r["final_miou"], seed_marker(seeds, r["seed"]),
                        color=f"C{i % 10}", ms=6, mec="k", mew=0.4)
            if arm.mean is not None:
                std = arm.std or 0.0
                ax.errorbar(i + 0.36, 100 * arm.mean, yerr=100 * std, fmt="_", color="k", capsize=3, ms=10)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([f"{method_name(l)}\n[{block.row_id(l)}]\nn={block.arms[l].n}" for l in labels], fontsize=8)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_ylabel("val mIoU (%)", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(f"Per-seed val mIoU (black bar: mean ± sd)\n{block_title(block)}", fontsize=10)
        if seeds:
            handles = [Line2D([], [], ls="none", marker=seed_marker(seeds, s), color="0.6", mec="k", mew=0.4,
                              label=f"seed {s}") for s in seeds]
            ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                      title="marker, left to right", title_fontsize=8)
        if block.baseline is None:
            ax.text(0.5, 0.02, "no student-only rerun rows for this block", transform=ax.transAxes,
                    ha="center", fontsize=7, color="C3")
        path = save(fig, out_dir / f"seeds_{block_slug(block)}.png",
                    footer(store.url, block.rows, "per-seed val mIoU"))
        out.append((path, f"per-seed distributions of {block.title}"))
    return out


SEED_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def seed_offsets(seeds: Sequence[Any], span: float = 0.5) -> Dict[Any, float]:
    """seed -> its horizontal offset within an arm's slot: the same place in every arm (the seeds pair
    the arms), spread evenly over `span`, so two seeds never share a spot."""
    if len(seeds) <= 1:
        return {s: 0.0 for s in seeds}
    step = span / (len(seeds) - 1)
    return {s: -span / 2 + k * step - 0.06 for k, s in enumerate(seeds)}


def seed_marker(seeds: Sequence[Any], seed: Any) -> str:
    return SEED_MARKERS[list(seeds).index(seed) % len(SEED_MARKERS)] if seed in seeds else "o"


# --------------------------------------------------------------------------------- Pareto
def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the non-dominated (energy low, mIoU high) points, by increasing energy."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto(store, blocks: Sequence[Block], out_dir: Path) -> List[Output]:
    if not blocks:
        return [(None, f"mIoU vs training energy: no completed rerun rows in {store.url}")]
    plt = _pyplot()
    out: List[Output] = []
    for block in blocks:
        names, pts, errs, absent = [], [], [], []
        for label, arm in block.arms.items():
            e = run_energy(arm.rows)
            if e["kwh"] is None or arm.mean is None:
                absent.append(f"{label} ({'flagged GPU energy' if e['flagged'] else 'no energy recorded'})")
                continue
            names.append(method_name(label))
            pts.append((e["kwh"], 100 * arm.mean))
            errs.append((e["kwh_std"] or 0.0, 100 * (arm.std or 0.0)))
        if block.teacher is not None:
            t_rows, why, t_miou = teacher_runs(store, [r for l, a in block.arms.items() if l != STUDENT_ONLY
                                                       for r in a.rows])
            t = run_energy(t_rows)
            if t["kwh"] is not None and t_miou is not None:
                names.append(f"Teacher {model_name(block.teacher)}")
                pts.append((t["kwh"], 100 * t_miou))
                errs.append((0.0, 0.0))
            else:
                absent.append(f"teacher ({why or 'no energy recorded'})")
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        markers = "osD^vP<>Xh"
        for i, (name, (x, y), (dx, dy)) in enumerate(zip(names, pts, errs)):
            ax.errorbar(x, y, xerr=dx or None, yerr=dy or None, color=f"C{i % 10}", capsize=2, ms=6, lw=1,
                        fmt="*" if name.startswith("Teacher") else markers[i % len(markers)], label=name)
        front = pareto_front(pts)
        if front:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="0.4", lw=1,
                    label="Pareto front")
        if pts:  # a legend, not point labels: arms close in energy and mIoU cannot collide
            ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
            ax.set_xscale("log")
        ax.set_xlabel("training energy per run (kWh, mean ± sd over seeds)", fontsize=9)
        ax.set_ylabel("val mIoU (%), mean ± sd", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_title(f"mIoU vs training energy\n{block_title(block)}", fontsize=10)
        if absent:
            ax.text(0.0, -0.22, "not drawn: " + "; ".join(absent), transform=ax.transAxes, va="top",
                    fontsize=8, color="C3")
        if not pts:
            ax.text(0.5, 0.5, "no arm of this block has a training energy", transform=ax.transAxes,
                    ha="center", fontsize=8)
        path = save(fig, out_dir / f"pareto_{block_slug(block)}.png",
                    footer(store.url, block.rows, "mIoU and training energy"))
        out.append((path, f"mIoU vs training energy of {block.title}"
                          + (f" (not drawn: {'; '.join(absent)})" if absent else "")))
    return out


# -------------------------------------------------------------------------------- entropy
def entropy_histograms(store_url: str, entropies: Sequence[Any], out_dir: Path) -> List[Output]:
    """One figure per measured teacher (`harness.measure.entropy.TeacherEntropy`); a text in place of
    a measurement is the reason it is missing."""
    plt = _pyplot()
    out: List[Output] = []
    for e in entropies:
        if isinstance(e, str):
            out.append((None, f"entropy histogram: {e}"))
            continue
        temperatures = e.temperatures
        fig, axes = plt.subplots(1, len(temperatures), figsize=(2.6 * len(temperatures), 2.6), sharey=True)
        axes = list(axes) if len(temperatures) > 1 else [axes]
        edges = e.edges
        width = edges[1] - edges[0]
        for ax, tau in zip(axes, temperatures):
            ax.bar(edges[:-1], [100 * s for s in e.shares[tau]], width=width, align="edge", color="C0")
            ax.set_title(f"τ = {tau:g}", fontsize=9)
            ax.set_xlabel("entropy (nats)", fontsize=7)
            ax.set_xlim(0, edges[-1])
            ax.tick_params(labelsize=7)
        axes[0].set_ylabel("share of pixels (%)", fontsize=7)
        k = e.classes
        fig.suptitle(f"Entropy of the teacher's softmax(z / τ): {model_name(e.teacher)} on "
                     f"{dataset_name(e.dataset)} ({e.images} val images, {e.pixels:,} pixels, "
                     f"{k} classes, max ln {k} = {math.log(k):.2f})", fontsize=9)
        fig.tight_layout()
        lines = [f"Source: teacher checkpoint {e.checkpoint or 'from the cache, key ' + e.key}, "
                 f"budget {e.budget}; first {e.images} images of the val split (paper 003 Figure 1 "
                 f"used 800 Cityscapes images)"] + source_lines(shown_database(store_url), [], "")[-1:]
        path = save(fig, out_dir / f"entropy_{slug(e.teacher)}_{e.key}.png", lines)
        out.append((path, f"entropy histogram of {e.teacher} at tau {', '.join(map(str, temperatures))}"))
    return out


# ---------------------------------------------------------------------------------- show
def qualitative_grid(store_url: str, grid: Any, out_dir: Path) -> Path:
    """Draw a `harness.measure.show.Grid` (one line per val image, label maps in the dataset's
    palette, a legend of the classes) into `out_dir / grid.name`."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    n, width = len(grid.panels), len(grid.panels[0]) if grid.panels else 5
    fig, axes = plt.subplots(n, width, figsize=(2.2 * width, 2.2 * n + 0.6), squeeze=False)
    for i, line in enumerate(grid.panels):
        for ax, (title, content) in zip(axes[i], line):
            ax.set_xticks([])
            ax.set_yticks([])
            if isinstance(content, str):
                ax.text(0.5, 0.5, _wrap(content), ha="center", va="center", fontsize=6, color="C3",
                        transform=ax.transAxes)
            else:
                ax.imshow(content, interpolation="nearest")
            if i == 0:
                ax.set_title(title, fontsize=7)
    handles = [Patch(color=[c / 255 for c in rgb], label=name) for name, rgb in grid.legend]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 10), fontsize=6,
               bbox_to_anchor=(0.5, 0.005))
    fig.suptitle(grid.title, fontsize=9)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    lines = source_lines(shown_database(store_url), grid.rows, "qualitative grid") + [
        "Students: each arm's first seed, from the run's saved final checkpoint when there is one, else "
        "retrained from its stored configuration (harness.reproduce); each column's title says which"] + [f"Note: {x}" for x in grid.notes]
    return save(fig, Path(out_dir) / grid.name, lines)


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width)[:10])


# ------------------------------------------------------------------------------------ all
def write_figures(store, cfg: dict, blocks: Sequence[Block], entropies: Sequence[Any] = (),
                  filters: Optional[dict] = None) -> List[Output]:
    """Every figure of `blocks` (and of the sweeps matching `filters`, `Filters.selection()`) into
    cfg's reports folder, plus reports/figures.md listing them (or why not). `entropies`: the
    teachers' entropy measurements (`harness.measure.entropy.measure_entropy`)."""
    out_dir = Path(cfg["paths"]["reports"])
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: List[Output] = []
    outputs += optimisation_history(store, out_dir, filters)
    outputs += response_curves(store, out_dir, filters)
    outputs += seed_distributions(store, blocks, out_dir)
    outputs += pareto(store, blocks, out_dir)
    outputs += expected_best_figures(store, blocks, out_dir)
    outputs += entropy_histograms(store.url, entropies, out_dir)
    lines = ["# Figures", "", f"Written by `python -m harness report` from {store.url}; every figure states "
             "its source under the plot.", ""]
    for path, text in outputs:
        lines.append(f"- [{path.name}]({path.name}): {text}" if path else f"- not drawn: {text}")
    lines += ["", "Source:", ""] + [f"- {s}" for s in source_lines(store.url, [r for b in blocks for r in b.rows],
                                                                   "figures")]
    (out_dir / "figures.md").write_text("\n".join(lines) + "\n")
    return outputs
