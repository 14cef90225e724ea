"""Search efficiency: TPE + ASHA against paper 003's full stage-1 grid (7 lr x 3 wd).

    python benchmarks/search_efficiency.py [--trials 21] [hydra overrides ...]

Runs, through the harness's own sweep, (1) the full grid of 21 (lr, wd) points without early
stopping and (2) a TPE + ASHA stage over the same ranges, both on the student-only arm of the
embedded default and the tune split. Compute = training iterations actually run. Prints the
compute TPE + ASHA used, in completion order, until its best tune mIoU came within 0.5 points of
the grid's best, as a fraction of the grid's compute (target: at most 30 %).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from harness.config import PROJECT_ROOT, load_config
from harness.store import ResultsStore

LRS = [1e-1, 5e-2, 1e-2, 5e-3, 1e-3, 5e-4, 1e-4]  # paper 003's mu(0) grid
WDS = [5e-4, 5e-5, 5e-6]


def sweep(protocol: dict, work: Path, common: list) -> None:
    path = work / f"{protocol['name']}.yaml"
    path.write_text(yaml.safe_dump(protocol))
    cmd = [sys.executable, "-m", "harness", "sweep", "+method=kd", f"sweep.protocol={path}", *common]
    if subprocess.run(cmd, cwd=PROJECT_ROOT).returncode != 0:
        sys.exit(f"sweep failed: {' '.join(cmd)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=21)
    args, extra = parser.parse_known_args()
    work = Path(tempfile.mkdtemp(prefix="search-eff-"))
    common = [*extra, f"paths.results={work / 'results'}"]
    cfg = load_config(common)
    sweep({"name": "grid", "stages": [{"name": "grid", "arms": ["student-only"], "search": "grid",
                                       "space": {"optim.lr": {"grid": LRS}, "optim.weight_decay": {"grid": WDS}}}]},
          work, common)
    sweep({"name": "tpe", "sampler_seed": 0, "stages": [{
        "name": "tpe", "arms": ["student-only"], "search": "tpe", "trials": args.trials, "early_stopping": "asha",
        "space": {"optim.lr": {"loguniform": [min(LRS), max(LRS)]}, "optim.weight_decay": {"choice": WDS}}}]},
        work, common)
    store = ResultsStore(cfg["store"]["url"])
    grid = store.query(stage="grid")
    tpe = sorted(store.query(stage="tpe"), key=lambda r: r["created_at"])
    grid_best = max(r["final_miou"] for r in grid if r["status"] == "completed")
    grid_compute = sum(r["iterations"] or 0 for r in grid)
    used, best, reached = 0, 0.0, None
    for r in tpe:
        used += r["iterations"] or 0
        if r["status"] == "completed":
            best = max(best, r["final_miou"])
        if reached is None and best >= grid_best - 0.005:
            reached = used
    print(f"grid: {len(grid)} runs, {grid_compute} iterations, best tune mIoU {100 * grid_best:.2f}")
    print(f"TPE + ASHA: {len(tpe)} trials ({sum(r['status'] == 'pruned' for r in tpe)} pruned), "
          f"{used} iterations, best tune mIoU {100 * best:.2f}")
    if reached is None:
        print("TPE + ASHA did not come within 0.5 mIoU of the grid's best")
    else:
        print(f"compute to come within 0.5 mIoU of the grid's best: {reached} iterations = "
              f"{100 * reached / grid_compute:.1f} % of the grid's compute (target <= 30 %)")


if __name__ == "__main__":
    main()
