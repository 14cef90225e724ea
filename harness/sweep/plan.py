"""What a sweep would run, without running it: `python -m harness sweep ... --dry-run`.

The plan is computed by the same code the runner uses (`prepare`, `stage_runs`), so
the stages, search spaces, trial counts and resources printed are the ones a real run would use.
Trials already in the results database are not subtracted (the plan is of the whole protocol).
The tuning budget per arm is the upper bound (every trial to its last iteration); the student-only
arm's growing stage is shown at the distilled arm's trial count, the least it grows to (it also
grows until its iterations reach the distilled arm's, so it may run more when the distilled arm's
trials are pruned less than its own).

Cost estimate. Training FLOPs of one iteration = batch x (3 x student forward [forward + backward]
+ teacher forward [distilled arm]); evaluation FLOPs = evaluations x images x student forward at
the evaluation size. Forward FLOPs are counted by `torch.utils.flop_counter` on the meta device (no
memory, no weights) at the crop size. Time = FLOPs / `sweep.estimate_tflops` (the EFFECTIVE
training throughput of one GPU: measure yours, e.g. with `python -m harness train` on one GPU, and
set it; the default 100 TFLOP/s is a round figure for bf16 convolutional training on an H100-class
GPU, well below its peak). GPU-hours count every trial to its last iteration (ASHA only makes the
real number smaller) and the teacher's training when no checkpoint is given. Distillation terms'
own FLOPs are not counted (benchmarks/method_cost.py measures them: most are a few percent of a
step). Without GPUs (`sweep.gpus_per_trial: 0`) the same FLOPs are shown as CPU work.

A `seeds: auto` rerun stage is planned at its upper bound (max_seeds, capped by the budget's
`sweep_rerun_seeds`). A compute-matched stage is one student-only rerun per seed of the rerun stage it
matches and per measure, its iterations estimated here by the FLOPs ratio distilled / student-only per
iteration (the sweep measures the real ratio, time and energy, on the reruns: method terms, which these
FLOPs leave out, make it larger).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from harness.config import methods_of
from harness.sweep.protocol import COMPUTE_MATCHED, RERUN, parse_stage_name
from harness.sweep.budget import UNEQUAL
from harness.sweep.runner import auto_seed_range, first_cut, prepare, stage_runs


def plan(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Stages x arms with their spaces and trial counts (the runner's own `stage_runs`)."""
    protocol, ids = prepare(cfg)
    stages: List[Dict[str, Any]] = []
    seeds: Dict[str, int] = {}  # rerun stage -> seeds (upper bound)
    for stage in protocol.stages:
        if stage.search == COMPUTE_MATCHED:
            for i, measure in enumerate(stage.measures):
                first = stage.measures[0]
                when = (f"within {100 * stage.share_within:g} % of the {first} ratio" if stage.share_within
                        else f"it scales to the {first} control's iterations")
                shares = f"; not run when {when}: the {first} control's runs stand for both" if i else ""
                stages.append({"arm": "student-only", "search": stage.search, "split": stage.split, "inherits": [],
                               "stage": f"{stage.name}[{measure}]", "space": {}, "trials": seeds.get(stage.matches, 0),
                               "measure": measure,
                               "note": f"the tuned student rerun on the {stage.matches} seeds, iterations x the measured "
                                       f"{measure} cost ratio" + shares})
            continue
        for arm in stage.arms:
            common = {"arm": arm, "search": stage.search, "split": stage.split, "inherits": stage.inherits}
            if stage.search == "combine":
                stages.append({**common, "stage": stage.name, "space": {}, "trials": 1,
                               "note": "at most 1 trial: the isolated winners together, run only when they "
                                       "differ from the best single change"})
                continue
            runs = stage_runs(cfg, stage, arm, ids[arm])
            if not runs:
                stages.append({**common, "stage": stage.name, "space": {}, "trials": 0,
                               "note": "nothing to search for this arm; winners carried over"})
            for unit in runs:
                trials = len(unit.points) if unit.points else unit.trials
                note = ""
                if stage.auto_seeds:
                    low, trials = auto_seed_range(cfg, stage)
                    note = (f"seeds: auto: {low} to {trials} seeds, until the paired 95 % interval's half-width <= "
                            f"{stage.target_halfwidth:g}")
                if stage.search == RERUN:
                    seeds[stage.name] = trials
                stages.append({**common, "stage": unit.name, "space": unit.space, "trials": trials,
                               "early_stopping": stage.early_stopping, "prunes": stage.prunes,
                               "min_completed": protocol.min_completed(trials) if stage.prunes else None,
                               "grow": stage.grow and arm == "student-only", "note": note})
    return {"protocol": protocol.name, "arm_ids": ids, "stages": stages,
            "budgets": planned_budgets(cfg, protocol, stages)}


def planned_budgets(cfg: Dict[str, Any], protocol, stages: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per arm: the search trials the plan runs (combine: at most 1) and the iterations they would run
    at most; the student-only arm's growing stage raised (in `stages`) to the distilled arm's trials;
    the first cut; and the unequal-budget mark where a protocol leaves the student-only arm short."""
    iterations = cfg["budget"]["iterations"]
    search = [s for s in stages if s["search"] not in (RERUN, COMPUTE_MATCHED)]
    total = {arm: sum(s["trials"] for s in search if s["arm"] == arm) for arm in ("student-only", "distilled")}
    grown = next((s for s in search if s.get("grow")), None)
    if grown is not None and total["student-only"] < total["distilled"]:
        grown["note"] = (f"grows from the protocol's {grown['trials']} until the arm's trials and iterations reach "
                         f"the distilled arm's (a longer stored sequence is reused)")
        grown["trials"] += total["distilled"] - total["student-only"]
        if grown["min_completed"] is not None:
            grown["min_completed"] = protocol.min_completed(grown["trials"])
        total["student-only"] = total["distilled"]
    budgets = {arm: {"trials": n, "max_iterations": n * iterations, "first_cut": first_cut(cfg, protocol, arm)}
               for arm, n in total.items()}
    short = total["student-only"] < total["distilled"]
    budgets["unequal"] = (f"{UNEQUAL}: student-only {total['student-only']} trials, distilled {total['distilled']} "
                          f"trials (this protocol has no grow: true stage)") if short else None
    return budgets


def forward_flops(model_cfg: Dict[str, Any], num_classes: int, size, batch: int = 1) -> float:
    """FLOPs of one forward pass (eval mode), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from harness.models import build_segmenter

    with torch.device("meta"):
        model = build_segmenter({**model_cfg, "pretrained": None}, num_classes).eval()  # shapes only
        x = torch.empty(batch, 3, int(size[0]), int(size[1]))
        with FlopCounterMode(display=False) as counter:
            model(x)
    return float(counter.get_total_flops())


def _eval_images(cfg: Dict[str, Any], split: str) -> Optional[int]:
    cap = cfg["budget"]["max_eval_images"]
    known = (cfg["dataset"].get("sizes") or {}).get(split) or (cfg["dataset"].get("split_sizes") or {}).get(split)
    if cap and known:
        return min(cap, known)
    return cap or known


def _eval_size(cfg: Dict[str, Any]):
    d = cfg["dataset"]
    for key in ("eval_size", "image_size"):
        if d.get(key):
            v = d[key]
            return (v, v) if isinstance(v, int) else tuple(v)
    return tuple(cfg["budget"]["crop_size"])


def estimate(cfg: Dict[str, Any], the_plan: Dict[str, Any]) -> Dict[str, Any]:
    b, k = cfg["budget"], cfg["dataset"]["num_classes"]
    crop = b["crop_size"]
    student = forward_flops(cfg["student"], k, crop)
    teacher = forward_flops(cfg["teacher"], k, crop)
    eval_size = _eval_size(cfg)
    student_eval = forward_flops(cfg["student"], k, eval_size)
    evaluations = -(-b["iterations"] // b["eval_interval"])
    per_iter = {"student-only": b["batch_size"] * 3 * student,
                "distilled": b["batch_size"] * (3 * student + teacher)}
    ratio = per_iter["distilled"] / per_iter["student-only"]  # the FLOPs estimate of the measured cost ratio
    rows, total_flops = [], 0.0
    for s in the_plan["stages"]:
        split = s["split"]
        images = _eval_images(cfg, split)
        evals = evaluations * images * student_eval if images else 0.0
        if s["search"] == COMPUTE_MATCHED:  # the student at the distilled arm's compute per run
            iterations = max(1, round(b["iterations"] * ratio))
            s = {**s, "note": s["note"] + f" (~{ratio:.2f}x by FLOPs: ~{iterations} iterations)"}
            flops = s["trials"] * (iterations * per_iter["student-only"] + evals)
        else:
            flops = s["trials"] * (b["iterations"] * per_iter[s["arm"]] + evals)
        rows.append({**s, "flops": flops, "eval_images": images})
        total_flops += flops
    teacher_flops = 0.0
    if not cfg["teacher"].get("checkpoint"):
        teacher_flops = b["teacher_iterations"] * b["teacher_batch_size"] * 3 * teacher
    tflops = float(cfg["sweep"]["estimate_tflops"])
    hours = (total_flops + teacher_flops) / (tflops * 1e12) / 3600
    sweep = cfg["sweep"]
    gpus_busy = sweep["max_concurrent_trials"] * sweep["gpus_per_trial"]
    return {"student_forward_flops": student, "teacher_forward_flops": teacher, "eval_size": eval_size,
            "flops_per_iteration": per_iter, "flops_ratio": ratio, "rows": rows, "teacher_training_flops": teacher_flops,
            "total_flops": total_flops + teacher_flops, "gpu_hours": hours, "tflops": tflops,
            "wall_hours": hours / gpus_busy if gpus_busy else None, "gpus_busy": gpus_busy}


def _space_text(space: Dict[str, Dict[str, Any]]) -> str:
    parts = []
    for path, dist in space.items():
        if "grid" in dist:
            parts.append(f"{path} in {dist['grid']}")
        elif "choice" in dist:
            parts.append(f"{path} in {dist['choice']}")
        else:
            kind = next((k for k in ("loguniform", "uniform") if k in dist), "?")
            parts.append(f"{path} ~ {kind}{dist.get(kind)}")
    return "; ".join(parts) or "-"


def describe(cfg: Dict[str, Any]) -> str:
    p = plan(cfg)
    e = estimate(cfg, p)
    b, d, s = cfg["budget"], cfg["dataset"], cfg["sweep"]
    lines = [
        f"dry run: sweep '{p['protocol']}' for {'+'.join(methods_of(cfg))} (nothing is run or written)",
        f"  data     {d['name']} ({d['num_classes']} classes), train on '{cfg['train_split']}', choose on "
        f"'tune', report reruns on 'val'",
        f"  student  {cfg['student']['name']} ({e['student_forward_flops'] / 1e9:.1f} GFLOPs forward at "
        f"{b['crop_size'][0]}x{b['crop_size'][1]})",
        f"  teacher  {cfg['teacher']['name']} ({e['teacher_forward_flops'] / 1e9:.1f} GFLOPs forward; "
        + (f"checkpoint {cfg['teacher']['checkpoint']})" if cfg["teacher"].get("checkpoint")
           else f"trained first: {b['teacher_iterations']} iterations, batch {b['teacher_batch_size']})"),
        f"  budget   {b['name']}: {b['iterations']} iterations, batch {b['batch_size']}, crop "
        f"{b['crop_size'][0]}x{b['crop_size'][1]}, random scale {b['scale_range'][0]}-{b['scale_range'][1]}, "
        f"flip {'on' if b['flip'] else 'off'}, poly lr (power {cfg['optim']['poly_power']}), evaluation every "
        f"{b['eval_interval']} at {e['eval_size'][0]}x{e['eval_size'][1]}",
        f"  optim    sgd lr {cfg['optim']['lr']}, momentum {cfg['optim']['momentum']}, wd "
        f"{cfg['optim']['weight_decay']}; precision {cfg['precision']}",
        f"  ray      {s['ray']['address'] or 'local'}; {s['max_concurrent_trials']} concurrent trials x "
        f"({s['cpus_per_trial']} CPU, {s['gpus_per_trial']:g} GPU); retries {s['max_failures']}",
        "",
    ]
    width = max([len("stage")] + [len(r["stage"]) for r in e["rows"]])
    sw = max(8, *(len(r["search"]) for r in e["rows"]))
    lines.append(f"  {'stage':<{width}} {'arm':<13} {'search':<{sw}} {'trials':>6}  space")
    for r in e["rows"]:
        lines.append(f"  {r['stage']:<{width}} {r['arm']:<13} {r['search']:<{sw}} {r['trials']:>6}  "
                     f"{_space_text(r['space'])}{('  (' + r['note'] + ')') if r['note'] else ''}")
    matched = [r for r in e["rows"] if r["search"] == COMPUTE_MATCHED]
    if matched:
        share = sum(r["flops"] for r in matched) / max(1.0, e["total_flops"])
        lines.append(f"  compute-matched control: {sum(r['trials'] for r in matched)} student runs "
                     f"({', '.join(r['measure'] for r in matched)}), {sum(r['flops'] for r in matched) / 1e15:.2f} "
                     f"PFLOPs ({100 * share:.0f} % of the whole sweep)")
    lines += ["", "  tuning budget per arm (upper bound: every trial to its last iteration):"]
    for arm in ("distilled", "student-only"):
        bud = p["budgets"][arm]
        cut = bud["first_cut"]
        pruned = [r for r in p["stages"] if r["arm"] == arm and r.get("prunes")]
        rule = (f"early stopping from evaluation {cut['evaluation']} (iteration {cut['iteration']}), keeping >= "
                + ", ".join(f"{r['min_completed']} of {r['trials']} ({r['stage']})" for r in pruned)
                if pruned and cut else "every trial to the end")
        lines.append(f"    {arm:<13} {bud['trials']:>4} trials, <= {bud['max_iterations']} iterations; {rule}")
    if p["budgets"]["unequal"]:
        lines.append(f"    {p['budgets']['unequal']}")
    trials = sum(r["trials"] for r in e["rows"])
    unknown = sorted({parse_stage_name(r["stage"])[0] for r in e["rows"] if r["trials"] and not r["eval_images"]})
    lines += ["", f"  {trials} trials in all (upper bound: ASHA stops some early), "
                  f"{e['total_flops'] / 1e15:.1f} PFLOPs incl. teacher training"
                  + (" and evaluation" if not unknown else
                     f"; evaluation not included for {', '.join(unknown)} (split sizes are known only once the "
                     f"dataset is read; set budget.max_eval_images to bound them)")]
    unit = "GPU-hours" if s["gpus_per_trial"] else "accelerator-hours equivalent (this sweep asks for no GPU)"
    lines.append(f"  estimate: {e['gpu_hours']:.3g} {unit} at {e['tflops']:g} TFLOP/s effective per GPU "
                 f"(sweep.estimate_tflops)" + (f"; ~{e['wall_hours']:.1f} h wall with {e['gpus_busy']:g} GPUs busy"
                                                if e["wall_hours"] else ""))
    return "\n".join(lines)


def planned_trials(cfg: Dict[str, Any]) -> int:
    """The trials the sweep's plan counts (the progress lines' ETA; 0 when it cannot be computed)."""
    try:
        return sum(int(s.get("trials") or 0) for s in plan(cfg)["stages"])
    except Exception:  # noqa: BLE001 - an ETA is not worth stopping a sweep for
        return 0
