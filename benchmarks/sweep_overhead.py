"""Harness overhead: one configuration run directly (`harness train`) and as a one-trial sweep.

    python benchmarks/sweep_overhead.py [hydra overrides ...]

Both are real commands in fresh processes, on the same config (student-only arm, seed 0, tune
split, one thread). Prints

    per-trial overhead   = (trial wall time - direct run wall time) / direct run wall time
    per-command overhead = (sweep command wall - train command wall) / train command wall

where the run wall times are the records' `wall_time_s` (inside `engine.train.run`) and the command
walls include interpreter start-up, Ray start and shutdown. Numbers depend on the machine.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harness.config import PROJECT_ROOT, load_config
from harness.store import ResultsStore


def timed(command: list) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    extra = sys.argv[1:]
    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    protocol = work / "one_trial.yaml"
    base = load_config(extra)
    protocol.write_text(yaml.safe_dump({"name": "one_trial", "stages": [
        {"name": "one", "arms": ["student-only"], "search": "grid",
         "space": {"optim.lr": {"grid": [base["optim"]["lr"]]}}}]}))
    common = [*extra, "threads=1", "progress=false", "eval_split=tune", f"paths.results={work / 'results'}",
              f"paths.cache={base['paths']['cache']}"]
    python = [sys.executable, "-m", "harness"]

    timed(python + ["train", *common, "budget.iterations=2", "budget.eval_interval=2"])  # warm the data cache
    direct_cmd = timed(python + ["train", *common])
    sweep_cmd = timed(python + ["sweep", "+method=kd", f"sweep.protocol={protocol}", "sweep.cpus_per_trial=1",
                                "sweep.max_concurrent_trials=1", *common])
    store = ResultsStore(load_config(common)["store"]["url"])
    direct = [r for r in store.query(stage=None) if r["iterations"] == base["budget"]["iterations"]][-1]
    trial = store.query(stage="one")[-1]
    per_trial = (trial["wall_time_s"] - direct["wall_time_s"]) / direct["wall_time_s"]
    per_command = (sweep_cmd - direct_cmd) / direct_cmd
    print(f"config: {base['student']['name']}, budget {base['budget']['name']} ({base['budget']['iterations']} "
          f"iterations), 1 thread")
    print(f"  direct run (record wall)    {direct['wall_time_s']:7.1f} s   train loop {direct['train_time_s']:.1f} s")
    print(f"  sweep trial (record wall)   {trial['wall_time_s']:7.1f} s   train loop {trial['train_time_s']:.1f} s")
    print(f"  per-trial overhead          {100 * per_trial:+6.2f} %")
    print(f"  train command               {direct_cmd:7.1f} s")
    print(f"  sweep command (1 trial)     {sweep_cmd:7.1f} s   (+{sweep_cmd - direct_cmd:.1f} s: Ray start/stop, "
          f"Tuner, worker start)")
    print(f"  per-command overhead        {100 * per_command:+6.2f} %")
    print(f"  same metrics: direct {direct['final_miou']:.4f} vs trial {trial['final_miou']:.4f}")
    out = Path(base["paths"]["results"]) / "benchmarks" / "sweep_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"direct_wall_s": direct["wall_time_s"], "trial_wall_s": trial["wall_time_s"],
                               "per_trial_overhead": per_trial, "train_command_s": direct_cmd,
                               "sweep_command_s": sweep_cmd, "per_command_overhead": per_command}, indent=2))


if __name__ == "__main__":
    main()
