"""A small, fully deterministic results database and the report commands run on it.

Used twice: by ``tests/test_report_golden.py`` (the current code) and to write the golden outputs
in ``tests/data/reports_golden/``. They were first written with the code from before the
report/measure split (7f84c7c), then rewritten once, on purpose, when the tables changed what they
say (issue 12's paired verdicts, families, budgets and equal-compute sections; issue 13's
like-with-like literature and short report output):

    PYTHONPATH=. .venv/bin/python tests/golden_reports.py tests/data/reports_golden

Every row has a fixed run id and creation time, the inference energy is a fixed fake measurement
and the latency is not measured (both patched into whichever module measures them: fast and
deterministic), and `mask` removes what still differs between two runs (the "Generated:" line and
code commit, CPU latency and thread count should they be measured, temporary paths).
"""
from __future__ import annotations

import copy
import csv
import io
import re
import sys
from pathlib import Path

INTENSITY = 400.0  # g/kWh of every row and of the fake inference measurement
COMMANDS = ("leaderboard", "significance", "energy", "literature")
# (command, file written) -> golden file name
FILES = {("leaderboard", "results/leaderboard.md"): "leaderboard.md",
         ("leaderboard", "results/leaderboard.csv"): "leaderboard.csv",
         ("leaderboard", "results/leaderboard.tex"): "leaderboard.tex",
         ("significance", "reports/significance.md"): "significance.md",
         ("significance", "reports/significance.tex"): "significance.tex",
         ("energy", "reports/energy.md"): "energy.md",
         ("literature", "results/literature.md"): "literature.md"}


def fake_inference(model_cfg, dataset_cfg, energy_cfg, device, output_dir, batch_size, **kwargs):
    """Student (pspnet_resnet18_small) 0.1 kWh / 10k images, teacher 0.3: break-even known exactly."""
    kwh = 0.1 if model_cfg["name"] == "pspnet_resnet18_small" else 0.3
    return {"model": model_cfg["name"], "device": str(device), "batch_size": batch_size,
            "image_size": list(dataset_cfg["image_size"]), "images": 64, "seconds": 1.0,
            "tracker": "codecarbon-offline", "energy_kwh": kwh * 64 / 10_000, "co2_kg": None,
            "carbon_intensity_g_per_kwh": INTENSITY, "carbon_intensity_source": "fake", "cpu_power_mode": None,
            "notes": [], "kwh_10k": kwh, "co2_10k": kwh * INTENSITY / 1000, "reason": None}


def without_latency(measure_from_row):
    """`measure_from_row` with the latency switched off (params and FLOPs still counted): fast."""
    def measure(row, **kw):
        return measure_from_row(row, **{**kw, "latency": False})

    return measure


def overrides(tmp: Path) -> list:
    return [f"store.url=sqlite:///{tmp}/golden.db", f"paths.results={tmp}/results",
            f"paths.reports={tmp}/reports", f"paths.cache={tmp}/cache", "progress=false"]


def build_db(tmp: Path) -> None:
    """The rows: a teacher run, a student-only and a kd sweep (every stage), cwd reruns with a
    missing and a flagged energy, a failed rerun, and a second budget with only a student-only arm."""
    from harness.config import load_config
    from harness.store import ResultsStore

    base = ["budget=smoke", "teacher=pspnet_resnet34", "teacher.head_channels=16", "student.head_channels=16",
            "progress=false", *overrides(tmp)]
    both = load_config([*base, "+method=[cwd,kd]"])  # one Hydra compose: each arm keeps its own method
    so_cfg, kd_cfg, cwd_cfg = ({**copy.deepcopy(both), "method": {m: both["method"][m] for m in ms}}
                               for ms in ((), ("kd",), ("cwd",)))
    quick_cfg = copy.deepcopy(so_cfg)
    quick_cfg["budget"]["name"] = "quick"
    store = ResultsStore(so_cfg["store"]["url"])
    counter = iter(range(10_000))

    def add(cfg, arm, stage, seed, miou, kwh, sweep_id, params=None, **extra):
        i = next(counter)
        c = copy.deepcopy(cfg)
        c["seed"] = seed
        store.append({
            "run_id": f"run{i:04d}", "created_at": f"2026-01-{1 + i // 20:02d}T10:{i % 60:02d}:00+00:00",
            "config_json": c, "arm": arm, "methods": ",".join(sorted(c["method"])),
            "dataset": c["dataset"]["name"], "student": extra.pop("student", c["student"]["name"]),
            "teacher": c["teacher"]["name"] if c["method"] else None, "seed": seed,
            "split": "val" if stage == "reruns" else "tune", "status": extra.pop("status", "completed"),
            "stage": stage, "sweep_id": sweep_id, "params_json": params or {}, "final_miou": miou,
            "energy_kwh": kwh, "co2_kg": None if kwh is None else kwh * INTENSITY / 1000,
            "carbon_intensity_g_per_kwh": None if kwh is None else INTENSITY,
            "energy_json": extra.pop("energy_json", {"tracker": "codecarbon-offline" if kwh is not None
                                                     else "disabled", "gpu_energy_flag": None}),
            "git_commit": "abc123", "extra_json": extra.pop("extra_json", {"device": "cpu"}), **extra})

    add(so_cfg, "teacher", None, 0, 0.6, 0.9, None, student=kd_cfg["teacher"]["name"])
    tinfo = {"device": "cpu", "teacher": {"source": "trained", "trained_by_run": "run0000", "val_miou": 0.61}}
    so, kd, cwd = "student-only:s1", "distilled:kd:k1", "distilled:cwd:c1"
    for i, lr in enumerate([0.01, 0.02, 0.05]):
        add(so_cfg, "student-only", "lr_wd", 0, 0.20 + 0.01 * i, 0.05, so, {"optim.lr": lr})
        add(kd_cfg, "distilled", "lr_wd", 0, 0.22 + 0.01 * i, 0.1, kd, {"optim.lr": lr}, extra_json=tinfo)
    add(kd_cfg, "distilled", "lr_wd", 0, 0.05, None, kd, {"optim.lr": 0.1}, status="pruned", extra_json=tinfo)
    for tau, m in zip([1, 2, 4, 8], [0.25, 0.27, 0.26, 0.24]):
        add(kd_cfg, "distilled", "temperature[method.kd.tau]", 0, m, 0.1, kd,
            {"optim.lr": 0.05, "method.kd.tau": tau}, extra_json=tinfo)
    for w, m in zip([0.1, 1.0, 10.0], [0.23, 0.27, 0.21]):
        add(kd_cfg, "distilled", "weights[method.kd.weight]", 0, m, 0.1, kd,
            {"optim.lr": 0.05, "method.kd.tau": 2, "method.kd.weight": w}, extra_json=tinfo)
    for seed, (m, k) in enumerate(zip([0.30, 0.32, 0.31, 0.305], [0.10, 0.12, 0.11, 0.105]), start=1):
        add(so_cfg, "student-only", "reruns", seed, m, k, so, {"optim.lr": 0.05, "seed": seed})
    for seed, (m, k) in enumerate(zip([0.34, 0.35, 0.37, 0.352], [0.30, 0.34, 0.32, 0.31]), start=1):
        add(kd_cfg, "distilled", "reruns", seed, m, k, kd, {"optim.lr": 0.05, "method.kd.tau": 2, "seed": seed},
            extra_json=tinfo)
    add(kd_cfg, "distilled", "reruns", 9, 0.99, None, kd, status="failed", extra_json=tinfo)
    add(cwd_cfg, "distilled", "reruns", 1, 0.33, None, cwd, extra_json=tinfo)
    add(cwd_cfg, "distilled", "reruns", 2, 0.31, 0.2, cwd, extra_json=tinfo,
        energy_json={"tracker": "codecarbon-offline", "gpu_energy_flag": "zero GPU energy"})
    add(cwd_cfg, "distilled", "reruns", 3, 0.32, 0.25, cwd, extra_json=tinfo)
    for seed, m in enumerate([0.41, 0.43], start=1):
        add(quick_cfg, "student-only", "reruns", seed, m, 0.2, "student-only:q1")


def run_commands(tmp: Path, main) -> dict:
    """{name: masked text} of every command's stdout and every file it wrote."""
    from contextlib import redirect_stderr, redirect_stdout

    out = {}
    for command in COMMANDS:
        extra = ["budget=smoke", "+method=kd"] if command == "literature" else []
        buf, err = io.StringIO(), io.StringIO()
        with redirect_stdout(buf), redirect_stderr(err):
            rc = main([command, *overrides(tmp), *extra])
        out[f"{command}.stdout"] = mask(f"exit {rc}\n{buf.getvalue()}--- stderr\n{err.getvalue()}", tmp)
    for (command, rel), name in FILES.items():
        out[name] = mask((tmp / rel).read_text(), tmp, csv_file=name.endswith(".csv"))
    return out


def mask(text: str, tmp: Path, csv_file: bool = False) -> str:
    """Drop what differs between two runs on the same rows: time and code commit, live latency,
    threads, tmp paths."""
    text = text.replace(str(tmp), "<tmp>")
    text = re.sub(r"Generated: [^\n]*", "Generated: <masked>", text)
    text = re.sub(r"\d+ thread\(s\)", "<n> thread(s)", text)
    if csv_file:
        rows = list(csv.DictReader(io.StringIO(text)))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
        writer.writeheader()
        for r in rows:
            r["latency_ms"] = "<latency>" if r["latency_ms"] else ""
            r["generated_by_commit"] = "<commit>"
            writer.writerow(r)
        return buf.getvalue()
    lines = []
    for line in text.splitlines():
        cells = line.split(" | ")
        if line.startswith("| ") and len(cells) == 11 and "latency ms" not in line:      # leaderboard.md
            line = " | ".join(cells[:-1]) + " | <latency> |"
        cells = line.split(" & ")
        if line.endswith("\\\\") and len(cells) == 10 and "Latency" not in line:        # leaderboard.tex
            line = " & ".join(cells[:-1]) + " & <latency> \\\\"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # write the golden outputs with the harness on PYTHONPATH
    import tempfile

    import harness.measure.efficiency as measure_efficiency
    import harness.measure.energy as measure_energy
    from harness.cli import main as old_main

    measure_energy.measure_inference = fake_inference
    measure_efficiency.measure_from_row = without_latency(measure_efficiency.measure_from_row)
    dest = Path(sys.argv[1])
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        build_db(Path(d))
        for name, text in run_commands(Path(d), old_main).items():
            (dest / name).write_text(text)
    print(f"wrote {dest}")
