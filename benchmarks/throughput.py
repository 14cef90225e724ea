"""Training throughput: the harness's training step against a minimal hand-written PyTorch loop.

    python benchmarks/throughput.py [--device auto|cpu|cuda] [--precision fp32|bf16] [--student NAME]
                                    [--batch N] [--crop H W] [--iterations N] [--repeats N]
                                    [--threads N] [--workers N] [hydra overrides ...]

Both sides train the same model (`build_segmenter(student)`, its aux head included), with the same
batch, crop, precision (fp32, or bf16 autocast with the losses in float32), memory format, SGD
settings, torch threads and cuDNN / determinism flags:

* harness: `harness.engine.train.run` (student-only, no record saved, energy tracking and the
  progress bar off unless --energy / --progress), timed by the run's own `train_time_s /
  iterations`. That time covers the whole loop: data loading (the default synthetic dataset,
  augmented in the DataLoader, `--workers` processes), host-to-device copies, the poly LR update,
  forward, task losses, backward, SGD step and the loop's bookkeeping. Evaluation is excluded as far
  as the loop allows: `eval_interval = iterations`, `max_eval_images = 1`, `eval_batch_size = 1`,
  so one evaluation of one image happens at the end (it stays inside `train_time_s`).
* minimal: a bare loop over ONE batch of random tensors created once, already on the device (no
  data loading, no copies, no LR schedule, no bookkeeping): forward under autocast, CE on the
  upsampled logits (+ aux_weight x CE on the aux logits), zero_grad, backward, step; timed from
  before the first step to after the last (CUDA synchronised).

Both timings include the first iteration (allocator / cuDNN warm-up) and nothing before it. Each
repeat runs both, interleaved (harness, then minimal), with seed = repeat; the medians over repeats
are compared: images/s of each and the ratio harness / minimal (target >= 0.9 on a GPU). The data
loading cost alone is also measured (`infinite_batches`, the same DataLoader the run uses), to
tell how much of the gap it explains.

Defaults: on CUDA, pspnet_resnet18 at 512 x 512, batch 8, bf16, channels-last, cuDNN benchmark,
deterministic off, 4 DataLoader workers; on CPU the quick preset: pspnet_resnet18_small, batch 8,
64 x 64, fp32, the config's threads and determinism, data in the main process (num_workers 0).

Prints a table and writes `results/benchmarks/throughput.json`. Numbers depend on the machine and
its load: state both when you quote them.
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

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness.config import load_config  # noqa: E402
from harness.data import build_dataset  # noqa: E402
from harness.engine.train import autocast_dtype, infinite_batches, resolve_device, run  # noqa: E402
from harness.models import build_segmenter  # noqa: E402

GPU_DEFAULTS = {"student": "pspnet_resnet18", "batch": 8, "crop": [512, 512], "precision": "bf16",
                "channels_last": True, "workers": 4, "iterations": 50}
CPU_DEFAULTS = {"student": "pspnet_resnet18_small", "batch": 8, "crop": [64, 64], "precision": "fp32",
                "channels_last": False, "workers": 0, "iterations": 30}


def harness_config(args, overrides: list) -> dict:
    cuda = args.device_type == "cuda"
    cfg_overrides = [
        f"student={args.student}", f"device={args.device}", f"precision={args.precision}",
        f"budget.batch_size={args.batch}", f"budget.crop_size=[{args.crop[0]},{args.crop[1]}]",
        f"budget.iterations={args.iterations}", f"budget.eval_interval={args.iterations}",
        "budget.max_eval_images=1", "budget.eval_batch_size=1",
        f"channels_last={str(args.channels_last).lower()}", f"num_workers={args.workers}",
        f"progress={str(args.progress).lower()}", f"energy.enabled={str(args.energy).lower()}",
    ]
    if cuda:
        cfg_overrides += ["deterministic=false", "cudnn_benchmark=true"]
    if args.threads:
        cfg_overrides.append(f"threads={args.threads}")
    return load_config(cfg_overrides + overrides)


def harness_seconds(cfg: dict, seed: int) -> float:
    """Seconds per training iteration of `run(cfg)`: its own train_time_s / iterations."""
    record = run({**cfg, "seed": seed}, command="benchmarks/throughput.py").record  # not stored
    if record["status"] != "completed":
        raise RuntimeError(f"the harness run ended as {record['status']}: {record['failure_reason']}")
    return record["train_time_s"] / record["iterations"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minimal_seconds(cfg: dict, num_classes: int, seed: int) -> float:
    """Seconds per iteration of a bare training loop on one random batch already on the device."""
    device = resolve_device(cfg["device"])
    torch.manual_seed(seed)
    torch.set_num_threads(cfg["threads"])  # run() set the rest (cudnn, determinism) the same way
    amp_dtype = autocast_dtype(cfg["precision"], device)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    student, optim = cfg["student"], cfg["optim"]
    model = build_segmenter(student, num_classes).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=optim["lr"], momentum=optim["momentum"],
                                weight_decay=optim["weight_decay"], nesterov=optim["nesterov"])
    batch, (height, width) = cfg["budget"]["batch_size"], cfg["budget"]["crop_size"]
    image = torch.randn(batch, 3, height, width, device=device).contiguous(memory_format=memory_format)
    mask = torch.randint(0, num_classes, (batch, height, width), device=device)
    aux_weight = student["aux_weight"] if student["aux"] else 0.0

    def upsampled(logits):
        return F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=True)

    iterations = cfg["budget"]["iterations"]
    sync(device)
    started = time.perf_counter()
    for _ in range(iterations):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(image)
        loss = F.cross_entropy(upsampled(out.logits), mask, ignore_index=255)
        if out.aux_logits is not None and aux_weight:
            loss = loss + aux_weight * F.cross_entropy(upsampled(out.aux_logits), mask, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return (time.perf_counter() - started) / iterations


def data_seconds(cfg: dict, batches: int) -> float:
    """Seconds per training batch of the harness's data pipeline alone (dataset + DataLoader, the
    host-to-device copy included), as run() builds it."""
    device = resolve_device(cfg["device"])
    budget = cfg["budget"]
    train_set = build_dataset(cfg["dataset"], cfg["train_split"], cache_dir=str(Path(cfg["paths"]["cache"]) / "data"),
                              augment={"crop_size": budget["crop_size"], "scale_range": budget["scale_range"],
                                       "flip": budget["flip"]})
    it = infinite_batches(train_set, budget["batch_size"], cfg["seed"], cfg["num_workers"], device)
    image, mask = next(it)  # workers' start-up is not per-batch cost
    started = time.perf_counter()
    for _ in range(batches):
        image, mask = next(it)
        image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    sync(device)
    return (time.perf_counter() - started) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--student", help="student preset (conf/student/)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--iterations", type=int, help="training steps per timed run (default 50 CUDA, 30 CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads of both loops (default: the config's)")
    parser.add_argument("--workers", type=int, help="DataLoader workers of the harness (default 4 CUDA, 0 CPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--progress", action="store_true", help="keep the harness's progress bar on")
    parser.add_argument("--energy", action="store_true", help="keep the harness's energy tracking on")
    args, overrides = parser.parse_known_args()

    try:
        args.device_type = resolve_device(args.device).type
    except RuntimeError as e:
        parser.error(str(e))
    defaults = GPU_DEFAULTS if args.device_type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    cfg = harness_config(args, overrides)
    num_classes = cfg["dataset"]["num_classes"]
    device = resolve_device(cfg["device"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} cpus"
    print(f"device: {device} ({name}); torch {torch.__version__}; threads={cfg['threads']}", flush=True)
    print(f"student {cfg['student']['name']}, batch {args.batch}, crop {args.crop[0]}x{args.crop[1]}, "
          f"precision {args.precision}, channels_last={cfg['channels_last']}, deterministic={cfg['deterministic']}, "
          f"cudnn_benchmark={cfg['cudnn_benchmark']}, harness num_workers={cfg['num_workers']}, "
          f"{args.iterations} iterations x {args.repeats} repeats", flush=True)

    harness, minimal = [], []
    for r in range(args.repeats):
        harness.append(harness_seconds(cfg, r))
        minimal.append(minimal_seconds(cfg, num_classes, r))
        print(f"  repeat {r}: harness {harness[-1] * 1e3:8.1f} ms/it   minimal {minimal[-1] * 1e3:8.1f} ms/it   "
              f"ratio {minimal[-1] / harness[-1]:.3f}", flush=True)
    data = data_seconds(cfg, args.iterations)

    h, m = statistics.median(harness), statistics.median(minimal)
    ratio = m / h
    batch = args.batch
    print(f"\nmedian over {args.repeats} repeats")
    print(f"  harness (engine.train.run)     {batch / h:9.1f} images/s   ({h * 1e3:.1f} ms/it)")
    print(f"  minimal loop (random batch)    {batch / m:9.1f} images/s   ({m * 1e3:.1f} ms/it)")
    print(f"  ratio harness / minimal        {ratio:9.3f}   (target >= 0.9 on a GPU)")
    print(f"  harness data loading alone     {data * 1e3:9.1f} ms/batch ({100 * data / h:.0f} % of the harness step; "
          f"num_workers={cfg['num_workers']})")

    out = Path(cfg["paths"]["results"]) / "benchmarks" / "throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": str(device), "device_name": name, "torch": torch.__version__, "threads": cfg["threads"],
        "student": cfg["student"]["name"], "batch": batch, "crop": args.crop, "precision": args.precision,
        "channels_last": cfg["channels_last"], "num_workers": cfg["num_workers"], "iterations": args.iterations,
        "harness_s_per_it": harness, "minimal_s_per_it": minimal, "data_s_per_batch": data,
        "harness_images_per_s": batch / h, "minimal_images_per_s": batch / m, "ratio": ratio,
        "command": " ".join(sys.argv),
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
