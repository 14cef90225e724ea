"""Can anyone re-run the shipped evidence? (issue 12, item 9)

    python benchmarks/reproduce_shipped.py [ROW_ID] [--seed N] [--keep DIR] [--store URL]

Clones this repository at its HEAD commit into a temporary folder (a fresh clone: no results, no
teacher cache), and there runs

    python -m harness reproduce ROW_ID [--seed N] store.url=evidence/runs.jsonl \
        paths.results=<tmp>/results paths.reports=<tmp>/reports paths.cache=<tmp>/cache

with this interpreter, the clone first on PYTHONPATH: the shipped row's stored configuration is
trained again by the clone's code, the teacher from scratch (the cache is empty), and the new final
mIoU, per-class IoU and evaluation history are compared with the stored ones. ROW_ID defaults to
the first distilled row of the shipped leaderboard (the one the teacher matters for); `--seed`
picks one of its rerun seeds (default: the lowest). `--store` reads another results database (an
absolute URL or path) instead of the shipped evidence: the same check for runs not yet exported. Exit status: the reproduce command's (0 when
identical). It prints the time it took (teacher training included).

The clone's working tree is HEAD, not your uncommitted edits: commit first. On the 2-core
development VM, idle, it took 13.2 minutes at the quick budget (measured 2026-11-30: teacher ~9, one
distilled run 2.5). Run it on an otherwise idle machine: the teacher's two threads slow ~10x when a
third busy thread shares the two cores.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_row(clone: Path, store: str) -> str:
    """The first distilled leaderboard row of `store` (read by the clone's code)."""
    code = ("from harness.store import ResultsStore\n"
            "from harness.report.blocks import load_blocks\n"
            f"store = ResultsStore({store!r}, readonly=True)\n"
            "for block in load_blocks(store):\n"
            "    for label in block.arms:\n"
            "        if label != 'student-only':\n"
            "            print(block.row_id(label), label); raise SystemExit(0)\n"
            f"raise SystemExit('no distilled row in {store}')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=clone, env=env_for(clone), check=True,
                         capture_output=True, text=True).stdout.split()
    print(f"row {out[0]}: the shipped leaderboard's first distilled arm [{out[1]}]")
    return out[0]


def env_for(clone: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(clone) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("row", nargs="?", help="a leaderboard row id or run id of evidence/runs.jsonl")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--keep", help="clone into this (new) folder and keep it, instead of a temporary one")
    ap.add_argument("--store", default="evidence/runs.jsonl",
                    help="results database to read (default: the shipped evidence/runs.jsonl of the clone)")
    a = ap.parse_args(argv)

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="reproduce-shipped-") as tmp:
        clone = Path(a.keep) if a.keep else Path(tmp) / "clone"
        if clone.exists():
            raise SystemExit(f"{clone} exists: --keep needs a new folder")
        subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "--quiet", head], cwd=clone, check=True)
        print(f"fresh clone of {head[:12]} in {clone}; empty teacher cache")
        row = a.row or default_row(clone, a.store)
        scratch = clone / "scratch"
        cmd = [sys.executable, "-m", "harness", "reproduce", row, f"store.url={a.store}",
               f"paths.results={scratch}/results", f"paths.reports={scratch}/reports",
               f"paths.cache={scratch}/cache"] + (["--seed", str(a.seed)] if a.seed is not None else [])
        print("$ " + " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=clone, env=env_for(clone)).returncode
        print(f"reproduce: exit {rc} after {time.perf_counter() - start:.0f} s "
              f"({'identical' if rc == 0 else 'NOT identical' if rc == 1 else 'error'})")
        return rc


if __name__ == "__main__":
    sys.exit(main())
