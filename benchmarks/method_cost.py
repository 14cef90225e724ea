"""Cost of every distillation term: time relative to the student's own training step, peak memory.

    python benchmarks/method_cost.py [--shapes quick,cityscapes] [--repeats 5] [--only kd,cwd]

For every method of the registry (default config from conf/method/NAME.yaml, plus the variants in
VARIANTS that switch on optional terms) and two shapes:

* `quick`: the embedded default of the quick budget: student `pspnet_resnet18_small`, teacher
  `deeplabv3_resnet18_small`, batch 8, 64x64 crops -> logits and features of 8x8, 9 classes;
* `cityscapes`: a Cityscapes-like map of 64x128 (a 512x1024 crop at output stride 8), 19 classes,
  student `pspnet_resnet18` (stage1..4: 64/128/256/512 channels, head 512), teacher
  `deeplabv3_resnet101` (256/512/1024/2048, head 256), batch 2 = the per-GPU batch of the CIRKD
  recipe (spec section 1; `--batch` changes it).

Time: forward + backward of the method's weighted terms (and its `extra_step`, e.g. SKD's
discriminator step) on student/teacher outputs of exactly these shapes, median over `--repeats`
after a warm-up, divided by the median time of one real training step of the student
(forward, CE + aux loss, backward, SGD step) at the same batch and input size.

Peak memory: each (method, shape) runs in its own subprocess; the extra peak resident memory of the
term's first forward+backward (resident set sampled every 2 ms by a thread, minus the resident set
before the call with the inputs built and freed heap returned to the OS); on CUDA,
torch.cuda.max_memory_allocated over the same span.

Writes results/benchmarks/method_cost.json and prints a Markdown table (docs/methods.md has it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")

import torch  # noqa: E402

from harness.config import PROJECT_ROOT, load_config  # noqa: E402
from harness.methods import METHODS, Batch, MethodContext, Progress, build_methods  # noqa: E402
from harness.models import SegOutput, build_segmenter  # noqa: E402

SHAPES = {
    "quick": {"student": "pspnet_resnet18_small", "teacher": "deeplabv3_resnet18_small", "batch": 8,
              "input": (64, 64), "classes": 9},
    "cityscapes": {"student": "pspnet_resnet18", "teacher": "deeplabv3_resnet101", "batch": 2,
                   "input": (512, 1024), "classes": 19},
}

# optional terms that are off by default: measured as their own rows
VARIANTS = {
    "cwd+feature": ("cwd", {"feature_weight": 50.0}),
}


def model_shapes(name: str, group: str, classes: int) -> dict:
    """Channels and strides of a preset, read from the built model (no forward pass)."""
    cfg = load_config([f"{group}={name}"])[group]
    model = build_segmenter(cfg, classes)
    return {"channels": dict(model.feature_channels), "strides": dict(model.feature_strides),
            "aux": model.aux_head is not None, "output_stride": model.output_stride}


def fake_output(shapes: dict, classes: int, size, batch: int, gen: torch.Generator, grad: bool) -> SegOutput:
    h, w = size

    def t(c, stride):  # filled in place: no temporary that would raise the memory high-water mark
        x = torch.empty(batch, c, -(-h // stride), -(-w // stride)).normal_(generator=gen)
        return x.requires_grad_(grad)

    os_ = shapes["output_stride"]
    feats = {name: t(c, shapes["strides"][name]) for name, c in shapes["channels"].items()}
    return SegOutput(logits=t(classes, os_), aux_logits=t(classes, os_) if shapes["aux"] else None,
                     features=feats)


def rss_sampler(interval: float = 0.002):
    """(resident memory now, a function returning the peak seen since): a thread samples the
    process's resident set every `interval` s (ru_maxrss cannot be reset: earlier peaks hide later
    ones). Freed heap memory is first given back to the OS so that `now` is the live memory."""
    import ctypes
    import threading

    import psutil

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    proc = psutil.Process()
    state = {"peak": proc.memory_info().rss, "run": True}
    now = state["peak"]

    def sample():
        while state["run"]:
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()

    def stop() -> int:
        state["run"] = False
        thread.join()
        return max(state["peak"], proc.memory_info().rss)

    return now, stop


def student_step_seconds(shape: dict, repeats: int) -> float:
    cfg = load_config([f"student={shape['student']}"])
    student = build_segmenter(cfg["student"], shape["classes"]).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(shape["batch"], 3, *shape["input"], generator=gen)
    mask = torch.randint(0, shape["classes"], (shape["batch"], *shape["input"]), generator=gen)
    ce = torch.nn.CrossEntropyLoss(ignore_index=255)

    def step():
        out = student(image)
        up = torch.nn.functional.interpolate(out.logits, size=shape["input"], mode="bilinear", align_corners=False)
        loss = ce(up, mask)
        if out.aux_logits is not None:
            aux = torch.nn.functional.interpolate(out.aux_logits, size=shape["input"], mode="bilinear",
                                                  align_corners=False)
            loss = loss + 0.4 * ce(aux, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_method(variant: str, shape_name: str, repeats: int, batch: int | None, models: dict) -> dict:
    """Runs in a subprocess (so that its peak memory is its own): peak memory of the first call, then
    the median time. `models`: channels/strides of the student and teacher, measured by the parent
    (building a ResNet-101 here would set the high-water mark of the process)."""
    shape = dict(SHAPES[shape_name])
    if batch:
        shape["batch"] = batch
    name, extra = VARIANTS.get(variant, (variant, {}))
    cfg = load_config([f"+method={name}"] + [f"method.{name}.{k}={v}" for k, v in extra.items()])
    s_shapes, t_shapes = models["student"], models["teacher"]
    gen = torch.Generator().manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = MethodContext(num_classes=shape["classes"], ignore_index=255,
                        student_channels=s_shapes["channels"], student_strides=s_shapes["strides"],
                        teacher_channels=t_shapes["channels"], teacher_strides=t_shapes["strides"],
                        generator=torch.Generator().manual_seed(1))
    methods = [m.to(device) for m in build_methods(cfg["method"], ctx)]
    student = fake_output(s_shapes, shape["classes"], shape["input"], shape["batch"], gen, True)
    teacher = fake_output(t_shapes, shape["classes"], shape["input"], shape["batch"], gen, False)
    mask = torch.empty(shape["batch"], *shape["input"], dtype=torch.long).random_(0, shape["classes"], generator=gen)
    mask[:, :2] = 255
    batch_ = Batch(torch.empty(shape["batch"], 3, *shape["input"]).normal_(generator=gen), mask)

    def call(k: int):
        progress = Progress(k, 100)
        loss = 0.0
        for m in methods:
            weights = m.weights()
            for term, value in m.terms(student, teacher, batch_, progress).items():
                loss = loss + weights[term] * value
        for x in [student.logits, student.aux_logits, *student.features.values()]:
            if x is not None:
                x.grad = None
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward()
        for m in methods:
            m.extra_step(student, teacher, batch_, progress)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before, peak = rss_sampler()
    call(60)  # past any warm-up of the method (HeteroAKD, BRD schedules)
    peak_mb = (peak() - before) / 2 ** 20
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    times = []
    for k in range(repeats):
        t0 = time.perf_counter()
        call(61 + k)
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "shape": shape_name, "batch": shape["batch"], "seconds": statistics.median(times),
            "peak_mb": peak_mb, "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="quick,cityscapes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated variants (default: all methods + VARIANTS)")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.child:
        variant, shape = args.child.split("@")
        print(json.dumps(measure_method(variant, shape, args.repeats, args.batch, json.loads(args.models))))
        return

    variants = [v for v in args.only.split(",") if v] or sorted(METHODS) + sorted(VARIANTS)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, threads={args.threads}, "
          f"torch {torch.__version__}, cuda={torch.cuda.is_available()}")
    rows = []
    for shape_name in args.shapes.split(","):
        shape = dict(SHAPES[shape_name], **({"batch": args.batch} if args.batch else {}))
        step = student_step_seconds(shape, args.repeats)
        models = {"student": model_shapes(shape["student"], "student", shape["classes"]),
                  "teacher": model_shapes(shape["teacher"], "teacher", shape["classes"])}
        print(f"\n[{shape_name}] student step ({shape['student']}, batch {shape['batch']}, "
              f"input {shape['input'][0]}x{shape['input'][1]}): {step:.3f} s")
        print("| term | shape | time (ms) | x student step | peak extra memory (MiB) |")
        print("|---|---|---|---|---|")
        for variant in variants:
            proc = subprocess.run([sys.executable, __file__, "--child", f"{variant}@{shape_name}",
                                   "--repeats", str(args.repeats), "--threads", str(args.threads),
                                   "--models", json.dumps(models),
                                   *(["--batch", str(args.batch)] if args.batch else [])],
                                  capture_output=True, text=True, cwd=PROJECT_ROOT)
            if proc.returncode != 0:
                line = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"| {variant} | {shape_name} | failed: {line} | | |")
                rows.append({"variant": variant, "shape": shape_name, "error": line})
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(ratio=r["seconds"] / step, student_step_seconds=step)
            rows.append(r)
            print(f"| {variant} | {shape_name} | {1000 * r['seconds']:.1f} | {r['ratio']:.3f} | {r['peak_mb']:.0f} |",
                  flush=True)
    out = PROJECT_ROOT / "results" / "benchmarks" / "method_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                               "rows": rows}, indent=1))
    print(f"\nwritten: {out.relative_to(PROJECT_ROOT)}")


if __name__ == "__main__":
    main()
