"""Foundation benchmark: seconds per training iteration, and the teacher-student gap.

    python benchmarks/foundation.py [--seeds 3] [--timing-iterations 30] [hydra overrides ...]

1. Seconds per training iteration of the default student (student-only), the default teacher
   (trained as a plain segmenter) and the distilled student (+method=kd: student step plus the
   teacher's forward), each measured through the harness's own training loop (`engine.train.run`)
   on the quick budget's batch and crop, median over 3 repeats of `--timing-iterations` steps,
   evaluation excluded.
2. The default teacher's val mIoU (trained on first use, re-measured by the evaluator) against
   the student-only default trained on the quick budget with `--seeds` seeds (mean +- std).

Prints a table and writes `results/benchmarks/foundation.json`. Numbers depend on the machine:
state it when you quote them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")

from harness.config import load_config  # noqa: E402
from harness.engine.record import store_record  # noqa: E402
from harness.engine.teacher import get_teacher, teacher_for, teacher_training_config  # noqa: E402
from harness.engine.train import resolve_device, run  # noqa: E402


def seconds_per_iteration(cfg: dict, iterations: int, repeats: int = 3) -> float:
    """Median time of one training step of `cfg`'s run, through the real loop. The loop's time
    includes one final evaluation on a single image (a few ms against hundreds per step)."""
    timings = []
    for r in range(repeats):
        c = {**cfg, "seed": r, "progress": False, "energy": {**cfg["energy"], "enabled": False},
             "budget": {**cfg["budget"], "iterations": iterations, "eval_interval": iterations,
                        "max_eval_images": 1}}
        timings.append(run(c, teacher=teacher_for(c)).record["train_time_s"] / iterations)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--timing-iterations", type=int, default=30)
    args, overrides = parser.parse_known_args()

    base = load_config(overrides)
    kd = load_config(overrides + ["+method=kd"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, threads={base['threads']}, "
          f"budget={base['budget']['name']} (batch {base['budget']['batch_size']}, crop {base['budget']['crop_size']})")

    t0 = time.time()
    teacher, info = get_teacher(kd, resolve_device(kd["device"]), command="benchmarks/foundation.py")
    teacher_setup = time.time() - t0

    timing = {
        "student": seconds_per_iteration(base, args.timing_iterations),
        "teacher": seconds_per_iteration(teacher_training_config(kd), args.timing_iterations),
        "distilled student (kd)": seconds_per_iteration(kd, args.timing_iterations),
    }
    print("\nseconds per training iteration (median of 3 x %d steps, through engine.train.run)" % args.timing_iterations)
    for name, s in timing.items():
        n = base["budget"]["teacher_iterations" if name == "teacher" else "iterations"]
        print(f"  {name:<24} {s:.3f} s/it   ({s * n / 60:.1f} min for {n} iterations)")
    print(f"  the teacher was {'trained now, in %.0f s' % teacher_setup if teacher_setup > 30 else 'found in the cache'}")

    students = []
    for seed in range(args.seeds):
        cfg = {**base, "seed": seed, "progress": False}
        rec = run(cfg, command="benchmarks/foundation.py").record
        store_record(cfg, rec)
        students.append(rec["final_miou"])
        print(f"  student-only seed {seed}: val mIoU {100 * rec['final_miou']:.2f} "
              f"({rec['train_time_s']:.0f} s)", flush=True)
    mean = statistics.mean(students)
    std = statistics.stdev(students) if len(students) > 1 else 0.0
    gap = info["val_miou"] - mean
    print(f"\nval mIoU on {base['dataset']['name']} ({base['budget']['name']} budget)")
    print(f"  teacher {kd['teacher']['name']:<28} {100 * info['val_miou']:.2f}")
    print(f"  student {base['student']['name']:<28} {100 * mean:.2f} +- {100 * std:.2f} (n={len(students)})")
    print(f"  gap (teacher - student)              {100 * gap:+.2f} points   "
          f"[targets: gap >= 5, student < 85]: {'met' if gap >= 0.05 and mean < 0.85 else 'NOT met'}")

    out = Path(base["paths"]["results"]) / "benchmarks" / "foundation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seconds_per_iteration": timing, "teacher_val_miou": info["val_miou"],
                               "student_val_miou": students, "gap": gap, "machine": platform.platform(),
                               "cpus": os.cpu_count(), "threads": base["threads"]}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    sys.exit(main())
