"""Fidelity bias of the protocol's early stopping (issue 11, item 3): does GuardedASHA prune the
configuration that full-fidelity training would have chosen, and does it do so more often in a
distilled arm than in the student-only arm?

    python benchmarks/fidelity_bias.py [--budget quick|smoke] [--configs K] [--arms student-only,kd,cwd]
                                       [--phase1-only | --phase2-only] [--threads N] [--processes P]
                                       [--orders 1000] [--cache PATH]

Phase 1 (expensive, cached): for each arm (student-only, kd, cwd) the same K points of the default
protocol's lr x wd space (`grid_points`: lr geometrically spaced over the loguniform range, weight
decay cycling through the choices) are trained at full fidelity exactly as a sweep trial is
(`harness.engine.train.run`, evaluated on the `tune` split like `TrialSpec.config` does, the
method's default temperature and weight, seed 0, the cached teacher), P processes at a time with N
torch threads each. Every run's per-evaluation tune mIoU goes to a JSON cache
(`results/benchmarks/fidelity_bias_<budget>.json`, git-ignored), written after every run: a killed
phase 1 keeps what finished and a second call trains only what is missing; a cached run trained
with another version of the budget preset (each row records the preset's settings) is stale and
retrained. The histories measured for the README ship read-only in `benchmarks/data/fidelity_bias_<budget>.json`: a cache that does not exist
yet starts from them, and no command writes that file (to ship new histories, copy the cache there).

Phase 2 (free): the early-stopping rule is replayed offline on those histories. The decisions come
from the harness's own `GuardedASHA` (harness/sweep/runner.py) driven with fake trial results, the
first cut from `runner.first_cut` and `min_completed` from `Protocol.min_completed`, so the replay is
the sweep's logic, not a copy of it. What is random is the order in which results arrive: for each
of `--orders` replays the K trials start in a random order, `sweep.max_concurrent_trials` at a time,
and each evaluation interval of each trial lasts a random 0.75-1.25 time units (load noise), so which
trial reaches a rung first varies as it does in a sweep. A trial pruned at a rung frees its slot. A
trial is failed, as in the sweep, when its tune mIoU collapses (`trial.CollapseRule`). The chosen
configuration is the best completed trial by final tune mIoU (`runner.pick_winner`); its loss is the
full-fidelity best final tune mIoU minus the chosen one's final tune mIoU (mIoU points). Per arm and
setting: how often the full-fidelity winner is pruned, the mean loss (Monte Carlo standard errors over
the orders) and the bias = distilled loss - student-only loss (the same order seeds in every arm:
common random numbers, a paired standard error). Settings: min_fraction x min_completed
(2, 3, null = half, at least 3) x reduction_factor. A setting reaches the target when the loss is
<= 0.5 mIoU in every arm and |bias| < 0.25 mIoU for every distilled arm.

What the standard errors do not cover: each configuration is trained once (seed 0), so the
histories, and which configuration is the full-fidelity winner, carry the training noise of one
seed; and the fixed grid of points is not the sequence TPE would propose (TPE concentrates its later
points near the best, where configurations are closer and pruning mistakes likelier).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {"student-only": [], "kd": ["+method=kd"], "cwd": ["+method=cwd"]}
MIN_FRACTIONS = (0.25, 0.33, 0.5, 0.67)
MIN_COMPLETED = (2, 3, None)          # None: the protocol's default (half the trials, at least 3)
REDUCTION_FACTORS = (2, 3)
TARGET_LOSS, TARGET_BIAS = 0.5, 0.25  # mIoU points


# ----------------------------------------------------------------------------------- phase 1
def grid_points(space: Dict[str, Dict[str, Any]], k: int) -> List[Dict[str, float]]:
    """K points of the lr x wd space: lr geometrically spaced over its loguniform range (both ends
    included), weight decay cycling through its choices."""
    (lo, hi), wds = space["optim.lr"]["loguniform"], space["optim.weight_decay"]["choice"]
    lrs = [lo] if k == 1 else [lo * (hi / lo) ** (i / (k - 1)) for i in range(k)]
    return [{"optim.lr": float(f"{lr:.4g}"), "optim.weight_decay": float(wds[i % len(wds)])}
            for i, lr in enumerate(lrs)]


def arm_overrides(arm: str, budget: str, threads: int) -> List[str]:
    return [*ARMS[arm], f"budget={budget}", f"threads={threads}", "progress=false", "tensorboard=false",
            "checkpoint.final=false", "energy.enabled=false", f"paths.cache={ROOT / 'results' / 'cache'}"]


def key_of(arm: str, point: Dict[str, float]) -> str:
    return f"{arm}|lr={point['optim.lr']:g}|wd={point['optim.weight_decay']:g}"


def worker(arm: str, budget: str, threads: int, point: Dict[str, float], results: str) -> Dict[str, Any]:
    """One full-fidelity trial, evaluated on `tune` as a sweep trial is; returns its history."""
    import torch

    from harness.config import load_config
    from harness.engine.teacher import teacher_for
    from harness.engine.train import run
    from harness.sweep.trial import apply_params

    cfg = load_config([*arm_overrides(arm, budget, threads), f"paths.results={results}"])
    cfg = apply_params(cfg, point)
    cfg.update(eval_split="tune")          # as TrialSpec.config: hyperparameters are chosen on tune
    torch.set_num_threads(threads)
    started = time.time()
    result = run(cfg, teacher=teacher_for(cfg), run_id=f"fidelity-bias-{os.getpid()}-{time.time_ns()}",
                 resume=False)
    rec = result.record
    return {"arm": arm, "params": point, "status": rec.status, "failure_reason": rec.failure_reason,
            "history": [{"iteration": h["iteration"], "miou": h["miou"]} for h in rec.history_json or []],
            "final_miou": rec.final_miou, "iterations": rec.iterations, "wall_s": round(time.time() - started, 1),
            "train_time_s": rec.train_time_s, "eval_interval": cfg["budget"]["eval_interval"],
            "budget_iterations": cfg["budget"]["iterations"], "budget_settings": cfg["budget"]}


def budget_settings(budget: str) -> Dict[str, Any]:
    """The budget preset as it is now (iterations, evaluation interval, teacher iterations, ...)."""
    from harness.config import load_config

    return load_config([f"budget={budget}"], check_data=False)["budget"]


def is_current(row: Dict[str, Any], settings: Dict[str, Any]) -> bool:
    """A cached history counts only if it was trained with the budget preset as it is now: a row from
    before a change of the preset (600 -> 400 iterations, another teacher length) is stale and is
    retrained, never replayed against the new preset's evaluations. Rows without the record are stale."""
    return row.get("budget_settings") == settings


def load_cache(path: Path, shipped: Optional[Path] = None) -> Dict[str, Any]:
    """The cache at `path`; where there is none yet, a copy of the shipped histories (`shipped`, read
    only: a tracked file no command writes), so a fresh clone trains only what is not shipped."""
    for source in (path, shipped):
        if source is not None and source.is_file():
            return json.loads(source.read_text())
    return {"runs": {}}


def cache_paths(budget: str, given: Optional[str]) -> Tuple[Path, Optional[Path]]:
    """(where phase 1 writes, the shipped histories it starts from). Phase 1 never writes a tracked
    file: the default cache is results/benchmarks/ (git-ignored), started from benchmarks/data/."""
    if given:
        return Path(given), None
    name = f"fidelity_bias_{budget}.json"
    return ROOT / "results" / "benchmarks" / name, ROOT / "benchmarks" / "data" / name


def phase1(args, points: List[Dict[str, float]], cache_path: Path, shipped: Optional[Path] = None) -> None:
    import threading

    cache = load_cache(cache_path, shipped)
    cache.setdefault("runs", {})
    cache["budget"], cache["points"] = args.budget, points
    settings = budget_settings(args.budget)
    stale = [k for k, row in cache["runs"].items() if not is_current(row, settings)]
    for k in stale:
        del cache["runs"][k]
    todo = [(arm, p) for arm in args.arms for p in points if key_of(arm, p) not in cache["runs"]]
    if stale:
        print(f"phase 1: {len(stale)} cached run(s) were trained with another budget={args.budget} preset: "
              f"dropped, retrained", flush=True)
    print(f"phase 1: {len(todo)} runs to train ({len(points) * len(args.arms) - len(todo)} cached), "
          f"{args.processes} at a time, {args.threads} thread(s) each", flush=True)
    lock = threading.Lock()
    results = Path(os.environ.get("TMPDIR", "/tmp")) / "fidelity-bias-results"

    def one(job: Tuple[str, Dict[str, float]]) -> None:
        arm, point = job
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(
            {"arm": arm, "budget": args.budget, "threads": args.threads, "point": point, "results": str(results)})]
        t0 = time.time()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"  FAILED {key_of(arm, point)} (rc {out.returncode}): {out.stderr[-2000:]}", flush=True)
            return
        row = json.loads(out.stdout.strip().splitlines()[-1])
        with lock:
            cache["runs"][key_of(arm, point)] = row
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            tmp.replace(cache_path)
        hist = " ".join(f"{100 * h['miou']:.2f}" for h in row["history"])
        print(f"  {key_of(arm, point)}: {row['status']}, tune mIoU by evaluation {hist} "
              f"({time.time() - t0:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=args.processes) as pool:
        list(pool.map(one, todo))


# ----------------------------------------------------------------------------------- phase 2
def trials_of(cache: Dict[str, Any], arm: str, points: Sequence[Dict[str, float]]) -> List[Dict[str, Any]]:
    """The arm's cached runs at `points` trained with today's budget preset (stale rows left out)."""
    settings = budget_settings(cache["budget"])
    rows = [cache["runs"].get(key_of(arm, p)) for p in points]
    return [r for r in rows if r is not None and is_current(r, settings)]


def replay_order(histories: Sequence[Sequence[float]], *, first_cut: Optional[int], reduction_factor: float,
                 min_completed: int, concurrency: int, rng: np.random.Generator,
                 failed_at: Optional[Sequence[Optional[int]]] = None,
                 order: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """One sweep of the K trials whose tune mIoU at evaluation e (1-based) is histories[i][e - 1],
    under GuardedASHA, in a random arrival order drawn from `rng`. `failed_at[i]`: the evaluation at
    which trial i fails itself (collapse; None: never). `order`: the start order (default: random).
    Returns {"status": [...], "ended_at": [...],
    "order": [...]} (status completed | pruned | failed)."""
    import heapq

    from ray.tune.schedulers import TrialScheduler

    from harness.sweep.runner import GuardedASHA

    k = len(histories)
    evaluations = len(histories[0])
    failed_at = list(failed_at) if failed_at is not None else [None] * k
    order = [int(i) for i in (rng.permutation(k) if order is None else order)]
    status: List[Optional[str]] = [None] * k
    ended_at: List[Optional[int]] = [None] * k
    scheduler = None
    if first_cut is not None:
        scheduler = GuardedASHA(max_t=evaluations, first_cut=first_cut, reduction_factor=reduction_factor,
                                trials=k, min_completed=min_completed)
    handles = [_FakeTrial(f"t{i}") for i in range(k)]
    events: List[Tuple[float, int, int, int]] = []   # (time, tie, trial, evaluation)
    tie = 0
    pending = list(order)

    def start(now: float) -> None:
        nonlocal tie
        i = pending.pop(0)
        if scheduler is not None:
            scheduler.on_trial_add(None, handles[i])
        tie += 1
        heapq.heappush(events, (now + rng.uniform(0.75, 1.25), tie, i, 1))

    for _ in range(min(concurrency, k)):
        start(0.0)
    while events:
        now, _, i, e = heapq.heappop(events)
        miou = histories[i][e - 1]
        failed = failed_at[i] is not None and e >= failed_at[i]
        ended = failed or e >= evaluations
        result = {"training_iteration": e, "miou": 0.0 if failed else miou, "failed": "collapse" if failed else ""}
        if scheduler is not None:
            action = scheduler.on_trial_result(None, handles[i], result)
        else:
            action = TrialScheduler.CONTINUE
        if ended:
            status[i], ended_at[i] = ("failed" if failed else "completed"), e
            if scheduler is not None:
                scheduler.on_trial_complete(None, handles[i], result)
        elif action == TrialScheduler.STOP:
            status[i], ended_at[i] = "pruned", e
            if scheduler is not None:
                scheduler.on_trial_remove(None, handles[i])
        else:
            tie += 1
            heapq.heappush(events, (now + rng.uniform(0.75, 1.25), tie, i, e + 1))
            continue
        if pending:
            start(now)
    return {"status": status, "ended_at": ended_at, "order": order}


class _FakeTrial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def collapse_evaluation(history: Sequence[float], fraction: float) -> Optional[int]:
    """The evaluation (1-based) at which the sweep's CollapseRule fails a trial with this history."""
    from harness.sweep.trial import CollapseRule

    rule = CollapseRule(fraction)
    for e, miou in enumerate(history, start=1):
        if rule(e, 0.0 if miou is None or math.isnan(miou) else miou):
            return e
    return None


def arm_outcomes(histories: Sequence[Sequence[float]], finals_ok: Sequence[bool], *, first_cut: Optional[int],
                 reduction_factor: float, min_completed: int, concurrency: int, orders: int, seed: int,
                 failed_at: Optional[Sequence[Optional[int]]] = None) -> Dict[str, Any]:
    """Per order: whether the full-fidelity winner was pruned, and the loss (mIoU points) of the chosen
    configuration. `finals_ok[i]`: trial i completes at full fidelity (not failed)."""
    finals = [h[-1] for h in histories]
    eligible = [i for i in range(len(finals)) if finals_ok[i]]
    best = max(eligible, key=lambda i: finals[i])
    pruned_winner, losses = [], []
    for o in range(orders):
        out = replay_order(histories, first_cut=first_cut, reduction_factor=reduction_factor,
                           min_completed=min_completed, concurrency=concurrency,
                           rng=np.random.default_rng([seed, o]), failed_at=failed_at)
        done = [i for i, s in enumerate(out["status"]) if s == "completed"]
        chosen = max(done, key=lambda i: finals[i]) if done else None   # pick_winner: best final tune mIoU
        pruned_winner.append(out["status"][best] == "pruned")
        losses.append(100 * (finals[best] - (finals[chosen] if chosen is not None else 0.0)))
    return {"pruned_winner": np.array(pruned_winner, dtype=float), "loss": np.array(losses)}


def settings_grid() -> List[Dict[str, Any]]:
    return [{"min_fraction": f, "min_completed": m, "reduction_factor": r}
            for r in REDUCTION_FACTORS for f in MIN_FRACTIONS for m in MIN_COMPLETED]


def phase2(cache: Dict[str, Any], arms: Sequence[str], points: Sequence[Dict[str, float]], orders: int,
           seed: int = 0) -> Tuple[List[Dict[str, Any]], str]:
    from harness.config import load_config
    from harness.sweep.protocol import load_protocol, parse_protocol
    from harness.sweep.runner import first_cut

    budget = cache["budget"]
    protocol = load_protocol("default")
    base = load_config([f"budget={budget}"], check_data=False)
    concurrency = int(base["sweep"]["max_concurrent_trials"])
    fraction = float(base["sweep"]["collapse_fraction"])
    data = {}
    for arm in arms:
        rows = trials_of(cache, arm, points)
        if len(rows) < max(2, len(points)):   # an arm is compared on the same K points or not at all
            print(f"{arm}: {len(rows)} of {len(points)} configurations cached, left out (run phase 1)")
            continue
        evaluations = max(len(r["history"]) for r in rows)
        hist = [[h["miou"] for h in r["history"]] + [0.0] * (evaluations - len(r["history"])) for r in rows]
        failed_at = [collapse_evaluation(h, fraction) if r["status"] != "failed" else len(r["history"]) or 1
                     for h, r in zip(hist, rows)]
        data[arm] = (rows, hist, failed_at)
    if not data:
        return [], "no cached histories"
    k = min(len(v[0]) for v in data.values())
    cfgs = {arm: load_config([*ARMS[arm], f"budget={budget}"], check_data=False) for arm in data}
    table, memo = [], {}
    for setting in settings_grid():
        proto = parse_protocol({**protocol.raw, "asha": {**protocol.asha, **setting}})
        line = {**setting, "min_completed_n": proto.min_completed(k), "arms": {}}
        for arm, (rows, hist, failed_at) in data.items():
            cut = first_cut(cfgs[arm], proto, "student-only" if arm == "student-only" else "distilled")
            line["first_cut_iteration"] = cut["iteration"] if cut else None
            ok = [f is None for f in failed_at]
            # settings that resolve to the same first cut, reduction factor and guard decide alike
            same = (arm, cut["evaluation"] if cut else None, setting["reduction_factor"] if cut else None,
                    proto.min_completed(len(hist)) if cut else None)
            if same not in memo:
                memo[same] = arm_outcomes(hist, ok, first_cut=same[1], reduction_factor=setting["reduction_factor"],
                                          min_completed=proto.min_completed(len(hist)), concurrency=concurrency,
                                          orders=orders, seed=seed, failed_at=failed_at)
            line["arms"][arm] = memo[same]
        table.append(line)
    return table, f"K = {k} configurations per arm, {orders} arrival orders per setting, concurrency {concurrency}"


def summarise(table: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Means and Monte Carlo standard errors per setting and arm; bias per distilled arm (paired)."""
    out = []
    for line in table:
        s = {k: v for k, v in line.items() if k != "arms"}
        student = line["arms"].get("student-only")
        s["arms"], ok = {}, True
        for arm, o in line["arms"].items():
            n = len(o["loss"])
            p = float(o["pruned_winner"].mean())
            a = {"pruned": p, "pruned_se": math.sqrt(p * (1 - p) / n), "loss": float(o["loss"].mean()),
                 "loss_se": float(o["loss"].std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0}
            ok &= a["loss"] <= TARGET_LOSS
            if student is not None and arm != "student-only":
                d = o["loss"] - student["loss"]
                a["bias"], a["bias_se"] = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
                ok &= abs(a["bias"]) < TARGET_BIAS
            s["arms"][arm] = a
        # the bias needs both kinds of arm: with one kind only, the target is not decided (None)
        both = "student-only" in line["arms"] and len(line["arms"]) > 1
        s["reaches_target"] = bool(ok) if both else (None if ok else False)
        out.append(s)
    return out


def markdown(summary: List[Dict[str, Any]]) -> str:
    arms = list(summary[0]["arms"]) if summary else []
    head = "| rf | min_fraction | first cut (it) | min_completed |" + "".join(
        f" {a}: winner pruned | {a}: loss |" + (f" {a}: bias |" if a != "student-only" else "") for a in arms) + " target |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        mc = "half" if s["min_completed"] is None else s["min_completed"]
        cut = s["first_cut_iteration"] if s["first_cut_iteration"] is not None else "none (no pruning)"
        cells = [f"{s['reduction_factor']:g}", f"{s['min_fraction']:g}", str(cut), f"{mc} (= {s['min_completed_n']})"]
        for a in arms:
            v = s["arms"][a]
            cells.append(f"{100 * v['pruned']:.1f} % ± {100 * v['pruned_se']:.1f}")
            cells.append(f"{v['loss']:.2f} ± {v['loss_se']:.2f}")
            if a != "student-only":
                cells.append(f"{v['bias']:+.2f} ± {v['bias_se']:.2f}")
        cells.append({True: "yes", False: "no", None: "loss ok, bias not measured"}[s["reaches_target"]])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_runs(cache: Dict[str, Any], arms: Sequence[str], points: Sequence[Dict[str, float]]) -> str:
    lines = ["| arm | lr | wd | status | tune mIoU by evaluation | run s |", "|---|---|---|---|---|---|"]
    for arm in arms:
        for r in trials_of(cache, arm, points):
            hist = " / ".join(f"{100 * h['miou']:.2f}" for h in r["history"])
            lines.append(f"| {arm} | {r['params']['optim.lr']:g} | {r['params']['optim.weight_decay']:g} | "
                         f"{r['status']} | {hist} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="quick", choices=["quick", "smoke"])
    parser.add_argument("--configs", type=int, default=6, help="K configurations per arm")
    parser.add_argument("--arms", default="student-only,kd,cwd")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--cache", default=None, help="default results/benchmarks/fidelity_bias_<budget>.json, "
                        "started from the shipped benchmarks/data/fidelity_bias_<budget>.json")
    parser.add_argument("--json", default=None, help="also write the summary here")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--phase1-only", action="store_true")
    group.add_argument("--phase2-only", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        w = json.loads(args.worker)
        print(json.dumps(worker(w["arm"], w["budget"], w["threads"], w["point"], w["results"])))
        return 0
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}: {list(ARMS)}")
    from harness.sweep.protocol import load_protocol

    space = next(s for s in load_protocol("default").stages if s.name == "lr_wd").space
    points = grid_points(space, args.configs)
    cache_path, shipped = cache_paths(args.budget, args.cache)
    if not args.phase2_only:
        phase1(args, points, cache_path, shipped)
    if args.phase1_only:
        return 0
    cache = load_cache(cache_path, shipped)
    if "budget" not in cache:
        print(f"no cached histories in {cache_path}: run phase 1 first")
        return 1
    print(describe_runs(cache, args.arms, points))
    table, what = phase2(cache, args.arms, points, args.orders)
    if not table:
        print(what)
        return 1
    summary = summarise(table)
    print(f"\nFidelity bias on budget={cache['budget']}: {what}; loss and bias in mIoU points (tune split), "
          f"± Monte Carlo standard error over the orders\n")
    print(markdown(summary))
    reach = [s for s in summary if s["reaches_target"]]
    if not reach and any(s["reaches_target"] is None for s in summary):
        reach = [s for s in summary if s["reaches_target"] is None]
        print(f"\nonly one kind of arm is cached: the bias is not measured; settings whose loss is <= {TARGET_LOSS} "
              f"mIoU in the measured arm(s):")
    else:
        print(f"\nsettings that reach the target (loss <= {TARGET_LOSS} mIoU in every arm, |bias| < {TARGET_BIAS}):")
    for s in reach:
        cut = s["first_cut_iteration"]
        print(f"  reduction_factor {s['reduction_factor']:g}, min_fraction {s['min_fraction']:g} "
              f"({'no first cut before the end: no pruning at all' if cut is None else f'first cut at iteration {cut}'})"
              f", min_completed {'null' if s['min_completed'] is None else s['min_completed']}")
    if not reach:
        print("  none")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
