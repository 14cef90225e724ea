"""Cost of a student at inference: parameters, FLOPs and latency at the dataset's evaluation size.

The model is built from its config (``harness.models.build_segmenter``, random weights: cost does
not depend on them) and measured as it is deployed: eval mode, no auxiliary head (that head only
adds a training loss), one forward pass plus the bilinear upsampling of the logits to the input
size, exactly what ``harness.engine.evaluate.predict`` runs.

- **Parameters**: of the deployed model (``params``); ``params_train`` adds the auxiliary head.
- **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` on one forward at batch 1 and the
  dataset's ``image_size`` (the size the evaluator runs at); it counts 2 FLOPs per multiply-add of
  convolutions and matrix products (the ops that dominate; pooling, activations and interpolation
  are not counted).
- **Latency**: the median wall time of ``repetitions`` timed forwards after ``warmup`` untimed
  ones, under ``torch.inference_mode``, on the stated device, batch size and CPU thread count
  (``torch.cuda.synchronize`` around each timing on a GPU).

`for_blocks` measures the student of every leaderboard block; the result (an `Efficiency`, plain
numbers, or the reason it could not be measured) is what `harness.report.leaderboard` shows.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from harness.config import stable_hash


@dataclass
class Efficiency:
    student: str
    params: int                   # deployed model (no auxiliary head)
    params_train: int             # including the auxiliary head
    flops: int                    # one image at input_size
    input_size: Tuple[int, int]   # (height, width)
    latency_ms: Optional[float]   # median over repetitions; None when not measured
    latency_iqr_ms: Optional[float]
    device: str
    batch: int
    threads: int
    warmup: int
    repetitions: int

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        h, w = self.input_size
        lat = ("latency not measured" if self.latency_ms is None else
               f"latency = median of {self.repetitions} forwards after {self.warmup} warm-up, batch {self.batch}, "
               f"{self.device}, {self.threads} thread(s)")
        return (f"params = deployed student (no aux head); FLOPs = torch.utils.flop_counter at {h}x{w} "
                f"(2 per multiply-add, batch 1); {lat}")


_CACHE: Dict[str, Efficiency] = {}


def measure(student_cfg: Dict[str, Any], num_classes: int, input_size, device: str = "cpu",
            batch: int = 1, warmup: int = 3, repetitions: int = 10, threads: Optional[int] = None,
            latency: bool = True) -> Efficiency:
    """Parameters, FLOPs and latency of the student described by `student_cfg` (cached per process)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from harness.models import build_segmenter, count_parameters

    h, w = (int(v) for v in input_size)
    key = stable_hash([student_cfg, num_classes, h, w, device, batch, warmup, repetitions, threads, latency])
    if key in _CACHE:
        return _CACHE[key]
    if batch < 1 or repetitions < 1 or warmup < 0:
        raise ValueError(f"batch ({batch}) and repetitions ({repetitions}) must be >= 1, warmup >= 0")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        gen_state = torch.random.get_rng_state()
        train_model = build_segmenter(student_cfg, num_classes)
        params_train = count_parameters(train_model)
        cfg = copy.deepcopy(dict(student_cfg))
        cfg["aux"] = False
        cfg["pretrained"] = None
        model = build_segmenter(cfg, num_classes).eval().to(device)
        torch.random.set_rng_state(gen_state)  # measuring must not change the caller's random stream
        params = count_parameters(model)
        one = torch.zeros(1, 3, h, w, device=device)

        def forward(x):
            logits = model(x).logits
            return torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)

        with torch.inference_mode():
            counter = FlopCounterMode(display=False)
            with counter:
                forward(one)
            flops = int(counter.get_total_flops())
            lat_ms = iqr = None
            if latency:
                x = torch.zeros(batch, 3, h, w, device=device)
                sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
                for _ in range(warmup):
                    forward(x)
                sync()
                times = []
                for _ in range(repetitions):
                    t0 = time.perf_counter()
                    forward(x)
                    sync()
                    times.append(1000 * (time.perf_counter() - t0))
                lat_ms = statistics.median(times)
                q = statistics.quantiles(times, n=4) if len(times) > 1 else [lat_ms, lat_ms, lat_ms]
                iqr = q[2] - q[0]
        result = Efficiency(str(student_cfg.get("name", "")), params, params_train, flops, (h, w), lat_ms, iqr,
                            str(device), batch, torch.get_num_threads(), warmup, repetitions if latency else 0)
    finally:
        torch.set_num_threads(previous_threads)
    _CACHE[key] = result
    return result


def measure_from_row(row: Dict[str, Any], **kw) -> Efficiency:
    """`measure` for the student of a database row (its resolved config_json)."""
    cfg = row.get("config_json") or {}
    if not cfg.get("student") or not cfg.get("dataset"):
        raise ValueError(f"run {row.get('run_id')} has no student/dataset config to build the model from")
    ds = cfg["dataset"]
    return measure(cfg["student"], ds["num_classes"], ds["image_size"], **kw)


def for_blocks(blocks: Sequence[Any], latency: bool = True, **kw) -> Dict[Any, Union[Efficiency, str]]:
    """block key -> the `Efficiency` of its student (from its first row), or why it is n/a."""
    out: Dict[Any, Union[Efficiency, str]] = {}
    for block in blocks:
        rows = block.rows
        if not rows:
            continue
        try:
            out[block.key] = measure_from_row(rows[0], latency=latency, **kw)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built must not hide the table
            out[block.key] = f"params/FLOPs/latency n/a: {type(exc).__name__}: {exc}"
    return out
