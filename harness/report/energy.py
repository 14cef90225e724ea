"""`python -m harness energy`: training and inference energy per arm, paper 003's Table 8.

For every block (dataset, student, teacher, budget; `harness.report.blocks`) ``reports/energy.md``
has one table with the rows of paper 003's Table 8 (Niemann et al., section 7):

    model            | val mIoU | training: energy (kWh), CO2 (kg) | inference per 10,000 images: energy (kWh), CO2 (kg)
    S (student-only) |  ...
    S + kd           |  ...
    T                |  ...

* **Training** = the mean over the arm's completed rerun runs of the energy codecarbon measured
  around that run (`energy_kwh`, `co2_kg` columns of the database): the cost of *one* training
  run with the tuned hyperparameters, like the paper's. The teacher's training energy is that of the
  run which trained the cached teacher (`extra_json.teacher.trained_by_run`); a teacher given as a
  checkpoint was not trained here, and the table says so. The tuning sweep of each arm (every row of
  its `sweep_id`, all stages) is summed in a second table: the cost of the search itself.
* **Inference** is measured now, on this machine, not read from the database, by
  `harness.measure.energy` (a timed loop of forward passes of the student or teacher at the dataset's
  evaluation size inside codecarbon's offline tracker, extrapolated to 10,000 images); the caller
  hands the measurements in (`inference`: block key -> (student, teacher) measurement dicts) and the
  report states images, seconds, batch size and device. Both student arms share one inference
  measurement (same architecture).
* **Break-even**: distilling costs the distilled arm's training energy E_train(S+M) (the teacher is
  trained in either case); each image the distilled student segments instead of the teacher saves
  e_T - e_S. Distillation is paid back after N = E_train(S+M) / (e_T - e_S) inference images
  (also given with the arm's whole tuning sweep in place of one run). "never" where the student
  is not cheaper than the teacher.
* **Carbon intensity**: with `energy.carbon_intensity_g_per_kwh` set, every CO2 number of the report
  is recomputed as kWh x that intensity (stated); otherwise training CO2 is the stored value and the
  intensities recorded by codecarbon (country mix of `energy.country_iso_code`) are listed.
* **Missing numbers** are never zeros: a run recorded without energy (tracker disabled or failed)
  is left out of the mean and counted; GPU energy that read zero while a GPU was busy
  (`energy_json.gpu_energy_flag`, and the same check for the inference loop) is flagged and not
  reported; an arm with no usable run shows the reason in its cell.
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from harness.report.blocks import MISSING, STUDENT_ONLY, Arm, Block, source_lines
from harness.report.filters import Filters
from harness.report.render import markdown_table

PER_IMAGES = 10_000
FLAGGED = "flagged"
Inference = Dict[Any, Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]]  # block key -> (student, teacher)

# ------------------------------------------------------------------------------------- numbers


def fmt(value: Optional[float], digits: int = 3) -> str:
    """3 significant digits; tiny CPU energies stay readable (1.23e-05)."""
    if value is None:
        return MISSING
    return f"{value:.{digits}g}"


def intensity_override(cfg: dict) -> Optional[float]:
    value = (cfg.get("energy") or {}).get("carbon_intensity_g_per_kwh")
    return None if value is None else float(value)


def _flag(row: Dict[str, Any]) -> Optional[str]:
    return ((row.get("energy_json") or {}).get("gpu_energy_flag")) or None


def run_energy(rows: Sequence[Dict[str, Any]], intensity: Optional[float] = None) -> Dict[str, Any]:
    """Mean energy (kWh) and CO2 (kg) per run over `rows` that have a usable measurement.

    A row without energy is `unmeasured`; a row whose GPU energy read zero while a GPU was busy is
    `flagged`; neither enters the mean. With `intensity` (g/kWh) CO2 is recomputed from the energy.
    """
    usable, unmeasured, flagged = [], [], []
    for r in rows:
        if _flag(r):
            flagged.append(r)
        elif r.get("energy_kwh") is None:
            unmeasured.append(r)
        else:
            usable.append(r)
    kwh = [r["energy_kwh"] for r in usable]
    if intensity is not None:
        co2 = [k * intensity / 1000.0 for k in kwh]
    else:
        co2 = [r["co2_kg"] for r in usable if r.get("co2_kg") is not None]
    return {
        "n": len(rows), "measured": len(usable), "unmeasured": len(unmeasured), "flagged": len(flagged),
        "kwh": statistics.fmean(kwh) if kwh else None,
        "kwh_std": statistics.stdev(kwh) if len(kwh) > 1 else None,
        "co2": statistics.fmean(co2) if co2 else None,
        "intensities": sorted({round(r["carbon_intensity_g_per_kwh"], 2) for r in usable
                               if r.get("carbon_intensity_g_per_kwh") is not None}),
        "reasons": sorted({_no_energy_reason(r) for r in unmeasured}),
        "flags": sorted({_flag(r) for r in flagged}),
    }


def _no_energy_reason(row: Dict[str, Any]) -> str:
    e = row.get("energy_json") or {}
    if e.get("tracker") == "disabled":
        return "energy tracking was disabled (energy.enabled=false)"
    if e.get("failure_reason"):
        return str(e["failure_reason"])
    return "no energy recorded"


def energy_cells(summary: Dict[str, Any]) -> Tuple[str, str]:
    """(kWh cell, CO2 cell) of a run_energy summary; the reason in place of a missing value."""
    if summary["n"] == 0:
        return f"{MISSING} (no runs)", f"{MISSING} (no runs)"
    if summary["kwh"] is None:
        why = (f"{FLAGGED}: zero GPU energy while a GPU was busy ({summary['flagged']} run(s))"
               if summary["flagged"] else f"{MISSING} (not measured in {summary['unmeasured']} run(s))")
        return why, why
    note = ""
    if summary["measured"] < summary["n"]:
        parts = []
        if summary["unmeasured"]:
            parts.append(f"{summary['unmeasured']} without energy")
        if summary["flagged"]:
            parts.append(f"{summary['flagged']} {FLAGGED}")
        note = f" ({summary['measured']} of {summary['n']} runs; {', '.join(parts)})"
    spread = f" +- {fmt(summary['kwh_std'], 2)}" if summary["kwh_std"] is not None else ""
    co2 = fmt(summary["co2"]) if summary["co2"] is not None else f"{MISSING} (no CO2 recorded)"
    return f"{fmt(summary['kwh'])}{spread}{note}", co2


def break_even(train_kwh: Optional[float], student_kwh_per_image: Optional[float],
               teacher_kwh_per_image: Optional[float]) -> Tuple[Optional[float], str]:
    """Inference images after which `train_kwh` is paid back by (e_T - e_S) saved per image."""
    if train_kwh is None:
        return None, f"{MISSING} (no training energy)"
    if student_kwh_per_image is None or teacher_kwh_per_image is None:
        return None, f"{MISSING} (no inference energy)"
    saving = teacher_kwh_per_image - student_kwh_per_image
    if saving <= 0:
        return None, "never (the student is not cheaper than the teacher at inference)"
    n = train_kwh / saving
    return n, (f"{n:,.0f} images" if n >= 10 else f"{n:.2g} images")


# ---------------------------------------------------------------------------------------- report


def teacher_runs(store, rows: Iterable[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], Optional[str], Optional[float]]:
    """(rows of the runs that trained the block's teacher, why there are none, teacher val mIoU)."""
    run_ids, why, miou = [], None, None
    for r in rows:
        info = (r.get("extra_json") or {}).get("teacher") or {}
        if info.get("val_miou") is not None:
            miou = info["val_miou"]
        if info.get("trained_by_run"):
            run_ids.append(info["trained_by_run"])
        elif info.get("source") == "checkpoint":
            why = f"given as checkpoint {Path(info.get('checkpoint') or '?').name}, not trained here"
    runs = [x for x in (store.get(i) for i in dict.fromkeys(run_ids)) if x is not None]
    if not runs and why is None:
        why = ("the teacher's training run is not in this database" if run_ids
               else "no teacher provenance in the distilled rows")
    return runs, why, miou


def sweep_energy(store, arm: Arm, intensity: Optional[float]) -> Dict[str, Any]:
    """Energy of every row (all stages) of the sweep(s) that produced `arm`'s reruns."""
    rows = [r for sid in sorted({r["sweep_id"] for r in arm.rows if r.get("sweep_id")})
            for r in store.query(sweep_id=sid)]
    s = run_energy(rows, intensity)
    total = None if s["kwh"] is None else s["kwh"] * s["measured"]
    co2 = None if s["co2"] is None else s["co2"] * s["measured"]
    return {**s, "total_kwh": total, "total_co2": co2, "rows": len(rows)}


def _miou_cell(arm: Arm) -> str:
    if not arm.n:
        return f"{MISSING} (no completed runs)"
    spread = f" +- {100 * arm.std:.2f}" if arm.std is not None else ""
    return f"{100 * arm.mean:.2f}{spread} (n={arm.n})"


def block_report(store, block: Block, cfg: dict, inference: Inference) -> Tuple[List[str], List[Dict]]:
    """Markdown lines of one block and the rows it used (for the source footer)."""
    intensity = intensity_override(cfg)
    lines = [f"## {block.title}", ""]
    distilled = [a for label, a in block.arms.items() if label != STUDENT_ONLY]
    inf_s, inf_t = inference.get(block.key, (None, None))

    def inf_cells(m: Optional[Dict[str, Any]], what: str) -> Tuple[str, str]:
        if m is None:
            return f"{MISSING} ({what})", f"{MISSING} ({what})"
        if m["kwh_10k"] is None:
            return m["reason"], m["reason"]
        co2 = m["co2_10k"]
        if intensity is not None:
            co2 = m["kwh_10k"] * intensity / 1000.0
        return fmt(m["kwh_10k"]), fmt(co2)

    header = ["model", "val mIoU (%)", "training energy (kWh)", "training CO2 (kg)",
              f"inference energy (kWh / {PER_IMAGES:,} images)", f"inference CO2 (kg / {PER_IMAGES:,} images)"]
    table: List[List[str]] = []
    used: List[Dict] = []
    summaries: Dict[str, Dict[str, Any]] = {}
    s_cells = inf_cells(inf_s, "no student configuration")
    baseline = block.baseline
    if baseline is None:
        table.append(["S (student-only, tuned)", f"{MISSING} (no student-only rerun in the database)",
                      MISSING, MISSING, *s_cells])
    for label, arm in block.arms.items():
        summary = run_energy(arm.rows, intensity)
        summaries[label] = summary
        used += arm.rows
        name = "S (student-only, tuned)" if label == STUDENT_ONLY else f"S + {label}"
        kwh, co2 = energy_cells(summary)
        table.append([name, _miou_cell(arm), kwh, co2, *s_cells])
    if block.teacher is not None:
        t_rows, t_why, t_miou = teacher_runs(store, [r for a in distilled for r in a.rows])
        t_summary = run_energy(t_rows, intensity)
        t_kwh, t_co2 = energy_cells(t_summary) if t_rows else (f"{MISSING} ({t_why})",) * 2
        t_inf = inf_cells(inf_t, "no teacher configuration")
        miou = f"{100 * t_miou:.2f} (re-measured, whole val split)" if t_miou is not None else MISSING
        table.append([f"T ({block.teacher})", miou, t_kwh, t_co2, *t_inf])
    lines += markdown_table(header, table) + [""]
    lines.append(f"S = {block.student}; training = mean per run over the arm's rerun seeds (+- std); "
                 "inference measured now (see below), weights freshly initialised.")
    lines += [f"Note: {n}" for n in block.notes]
    lines.append("")

    # break-even
    if distilled:
        e_s = inf_s["kwh_10k"] / PER_IMAGES if inf_s and inf_s["kwh_10k"] is not None else None
        e_t = inf_t["kwh_10k"] / PER_IMAGES if inf_t and inf_t["kwh_10k"] is not None else None
        lines += ["Break-even: inference images after which distillation's training energy is paid back "
                  "by the distilled student's cheaper inference compared with the teacher, "
                  "N = E_train(S + M) / (e_T - e_S).", ""]
        table = []
        for arm in distilled:
            one = break_even(summaries[arm.label]["kwh"], e_s, e_t)[1]
            sweep = sweep_energy(store, arm, intensity)
            whole = break_even(sweep["total_kwh"], e_s, e_t)[1]
            if sweep["total_kwh"] is not None and sweep["measured"] < sweep["rows"] and whole[0].isdigit():
                whole = (f"at least {whole} ({sweep['rows'] - sweep['measured']} of {sweep['rows']} sweep rows "
                         f"without energy)")
            table.append([f"S + {arm.label}", one, whole])
        lines += markdown_table(["arm", "N (one training run)", "N (whole tuning sweep of the arm)"], table) + [""]

    # tuning cost
    lines += ["Tuning cost: energy of every run of the arm's sweep (all stages and reruns; a sweep shared "
              "by several methods, like the student-only arm's, is counted once per block).", ""]
    table = []
    for label, arm in block.arms.items():
        sweep = sweep_energy(store, arm, intensity)
        if not sweep["rows"]:
            table.append([label, "0", f"{MISSING} (no sweep id on the rerun rows)", MISSING])
            continue
        kwh = fmt(sweep["total_kwh"]) if sweep["total_kwh"] is not None else f"{MISSING} (no row has energy)"
        co2 = fmt(sweep["total_co2"]) if sweep["total_co2"] is not None else MISSING
        if sweep["total_kwh"] is not None and sweep["measured"] < sweep["rows"]:
            kwh = f"at least {kwh} ({sweep['measured']} of {sweep['rows']} rows measured; trials stopped early " \
                  f"by ASHA are recorded without energy)"
        table.append([label, str(sweep["rows"]), kwh, co2])
    lines += markdown_table(["arm", "sweep rows", "energy (kWh)", "CO2 (kg)"], table) + [""]

    # how inference was measured, intensities
    for m, who in ((inf_s, "student"), (inf_t, "teacher")):
        if m is None:
            continue
        if not m["images"]:  # nothing ran (report.measure=false)
            lines.append(f"Inference ({who} {m['model']}): {m['reason']}.")
            continue
        lines.append(f"Inference ({who} {m['model']}): {m['images']} images of {m['image_size'][0]}x"
                     f"{m['image_size'][1]} in batches of {m['batch_size']} on {m['device']}, "
                     f"{m['seconds']:.2f} s timed after one warm-up batch, extrapolated x "
                     f"{PER_IMAGES / m['images']:.1f} to {PER_IMAGES:,} images; tracker {m['tracker']}"
                     + (f", CPU power {m['cpu_power_mode']}" if m.get("cpu_power_mode") else "")
                     + (f"; {'; '.join(m['notes'])}" if m["notes"] else "") + ".")
    devices = sorted({str((r.get("extra_json") or {}).get("device")) for r in used})
    lines.append(f"Training energy was measured on the runs' own device(s): {', '.join(devices) or MISSING}.")
    lines.append("")
    return lines, used


def intensity_lines(cfg: dict, blocks_rows: Sequence[Dict[str, Any]], inference: Inference) -> List[str]:
    forced = intensity_override(cfg)
    if forced is not None:
        return [f"Carbon intensity: {forced:g} g CO2/kWh for every CO2 number of this report "
                f"(energy.carbon_intensity_g_per_kwh; training CO2 recomputed from the stored kWh)."]
    stored = run_energy(blocks_rows)["intensities"]
    inf = sorted({f"{m['carbon_intensity_g_per_kwh']:.2f} g/kWh ({m['carbon_intensity_source']})"
                  for pair in inference.values() for m in pair
                  if m is not None and m.get("carbon_intensity_g_per_kwh") is not None})
    return [f"Carbon intensity: as recorded by codecarbon; training runs: "
            f"{', '.join(f'{v:g}' for v in stored) + ' g/kWh' if stored else MISSING}; inference: "
            f"{', '.join(inf) if inf else MISSING}. Set energy.carbon_intensity_g_per_kwh=<g/kWh> to use one fixed "
            f"intensity (country: energy.country_iso_code={cfg['energy']['country_iso_code']})."]


def energy_report(store, cfg: dict, blocks: Sequence[Block], inference: Inference,
                  filters: Filters = Filters()) -> str:
    """The Markdown text of reports/energy.md for `blocks`, with the inference measurements of
    each block (`harness.measure.energy.inference_for_blocks`)."""
    selection = filters.selection()
    lines = ["# Energy and CO2 per arm (paper 003, Table 8)", ""]
    if not blocks:
        lines += [f"No completed rerun rows in {store.url}" + (f" matching {selection}" if selection else "")
                  + ": nothing to report. Run `python -m harness sweep +method=NAME` first.", ""]
        lines += [f"- {s}" for s in source_lines(store.url, [], "energy")]
        return "\n".join(lines) + "\n"
    body, used = [], []
    for block in blocks:
        block_lines, rows = block_report(store, block, cfg, inference)
        body += block_lines
        used += rows
    lines += intensity_lines(cfg, used, inference) + [""] + body
    lines += ["Source:", ""] + [f"- {s}" for s in source_lines(store.url, used, "energy (training)")]
    return "\n".join(lines) + "\n"


def write(cfg: dict, store, blocks: Sequence[Block], inference: Inference, filters: Filters = Filters(),
          quiet: bool = False) -> Path:
    """Write reports/energy.md (and print it unless `quiet`); returns its path."""
    text = energy_report(store, cfg, blocks, inference, filters)
    path = Path(cfg["paths"]["reports"]) / "energy.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if not quiet:
        print(text.rstrip())
        print(f"\nwritten: {path}")
    return path
