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

**Latency is measured once per model and device, and stored.** A latency depends on the machine
and on what else runs on it (5.9 ms on an idle VM, 69-150 ms on the same model beside a sweep), so
re-measuring it whenever a table is written made one database give different tables. `LatencyStore`
keeps one small JSON file per (deployed model config, classes, input size, device, CPU threads,
batch, warm-up, repetitions) under ``<paths.cache>/efficiency/``, with the device described
(``device_description``: the CPU model and core count, or the GPU's name) and the date it was
measured; the device description is part of the key, so another machine measures its own. Tables
show the stored number and name the device and the date (`Efficiency.describe`).

`for_blocks` gives the student of every leaderboard block; the result (an `Efficiency`, plain
numbers, or the reason it could not be measured) is what `harness.report.leaderboard` shows. Its
``latency``: ``"stored"`` (``report.measure=true``) reads the stored latency and measures only a
missing one; ``"remeasure"`` (``report.remeasure=true``) measures again and replaces the stored one;
``False`` (``report.measure=false``) neither reads nor measures ("latency not measured": the tables
are then the same on every machine). Parameters and FLOPs are always counted from the config.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
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
    device_name: str = ""         # the machine's device (device_description), when the latency was measured
    measured_on: str = ""         # date (UTC) the latency was measured

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        h, w = self.input_size
        if self.latency_ms is None:
            lat = "latency not measured"
        else:
            on = f"{self.device} ({self.device_name})" if self.device_name else self.device
            lat = (f"latency = median of {self.repetitions} forwards after {self.warmup} warm-up, batch {self.batch}, "
                   f"{on}, {self.threads} thread(s)" + (f", measured {self.measured_on}" if self.measured_on else ""))
        return (f"params = deployed student (no aux head); FLOPs = torch.utils.flop_counter at {h}x{w} "
                f"(2 per multiply-add, batch 1); {lat}")


_CACHE: Dict[str, Efficiency] = {}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_description(device: str = "cpu") -> str:
    """The device a latency was measured on, in words: the GPU's name for ``cuda[:i]``, else the CPU
    model and its logical core count (no host name: the number belongs to the hardware)."""
    if str(device).startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))}"
    return f"{_cpu_model()}, {os.cpu_count() or '?'} logical cores, {platform.machine()}"


class LatencyStore:
    """Stored latencies: one JSON file per measurement key in `folder` (``<paths.cache>/efficiency``).

    A file holds the key's parts (student config, classes, input size, device, its description,
    threads, batch, warm-up, repetitions), the median and IQR in ms, and when it was measured. Writes
    are atomic (a temporary file, then a rename), so two report commands never leave half a file."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)

    @staticmethod
    def key_parts(student_cfg: Dict[str, Any], num_classes: int, input_size, device: str, device_name: str,
                  threads: int, batch: int, warmup: int, repetitions: int) -> Dict[str, Any]:
        cfg = dict(student_cfg)
        cfg["aux"] = False          # the deployed model: what is timed
        cfg["pretrained"] = None    # weights do not change the time
        h, w = (int(v) for v in input_size)
        return {"student": cfg, "num_classes": int(num_classes), "input_size": [h, w], "device": str(device),
                "device_name": device_name, "threads": int(threads), "batch": int(batch), "warmup": int(warmup),
                "repetitions": int(repetitions)}

    def path(self, parts: Dict[str, Any]) -> Path:
        name = str(parts["student"].get("name") or "model")
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        return self.folder / f"latency_{slug}_{stable_hash(parts)[:16]}.json"

    def get(self, parts: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        path = self.path(parts)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if data.get("key") != json.loads(json.dumps(parts)) or data.get("latency_ms") is None:
            return None  # a hash collision or a damaged file: measure again
        return data

    def put(self, parts: Dict[str, Any], latency_ms: float, iqr_ms: float) -> Dict[str, Any]:
        data = {"key": parts, "latency_ms": latency_ms, "latency_iqr_ms": iqr_ms,
                "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        path = self.path(parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return data


def measure(student_cfg: Dict[str, Any], num_classes: int, input_size, device: str = "cpu",
            batch: int = 1, warmup: int = 3, repetitions: int = 10, threads: Optional[int] = None,
            latency: bool = True, store: Optional[LatencyStore] = None, remeasure: bool = False) -> Efficiency:
    """Parameters, FLOPs and latency of the student described by `student_cfg` (cached per process).

    With a `store`, the latency is read from it when it holds one for this model, device and
    threads, and measured (then stored) only when it does not, or when `remeasure`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from harness.models import build_segmenter, count_parameters

    h, w = (int(v) for v in input_size)
    key = stable_hash([student_cfg, num_classes, h, w, device, batch, warmup, repetitions, threads, latency,
                       str(store.folder) if store else None])
    if key in _CACHE and not remeasure:
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

        device_name = measured_on = ""
        parts = stored = None
        if latency and store is not None:
            device_name = device_description(device)
            parts = LatencyStore.key_parts(student_cfg, num_classes, (h, w), device, device_name,
                                           torch.get_num_threads(), batch, warmup, repetitions)
            stored = None if remeasure else store.get(parts)
        with torch.inference_mode():
            counter = FlopCounterMode(display=False)
            with counter:
                forward(one)
            flops = int(counter.get_total_flops())
            lat_ms = iqr = None
            if stored is not None:
                lat_ms, iqr, measured_on = stored["latency_ms"], stored["latency_iqr_ms"], stored["measured_at"][:10]
            elif latency:
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
                if parts is not None:
                    measured_on = store.put(parts, lat_ms, iqr)["measured_at"][:10]
                elif latency:
                    device_name = device_description(device)
                    measured_on = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
        result = Efficiency(str(student_cfg.get("name", "")), params, params_train, flops, (h, w), lat_ms, iqr,
                            str(device), batch, torch.get_num_threads(), warmup, repetitions if latency else 0,
                            device_name, measured_on)
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


def for_blocks(blocks: Sequence[Any], latency: Union[bool, str] = True, cache: Optional[Path | str] = None,
               **kw) -> Dict[Any, Union[Efficiency, str]]:
    """block key -> the `Efficiency` of its student (from its first row), or why it is n/a.

    `latency`: False (not measured), True or "stored" (the stored latency; measured and stored when
    missing), "remeasure" (measured again and stored). `cache`: the folder of the stored latencies
    (``<paths.cache>/efficiency``); None: measured in this process only, stored nowhere."""
    if latency not in (True, False, "stored", "remeasure"):
        raise ValueError(f"latency={latency!r}: expected True, False, 'stored' or 'remeasure'")
    if latency:
        if cache is not None:
            kw["store"] = LatencyStore(cache)
        kw["remeasure"] = latency == "remeasure"
    out: Dict[Any, Union[Efficiency, str]] = {}
    for block in blocks:
        rows = block.rows
        if not rows:
            continue
        try:
            out[block.key] = measure_from_row(rows[0], latency=bool(latency), **kw)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built must not hide the table
            out[block.key] = f"params/FLOPs/latency n/a: {type(exc).__name__}: {exc}"
    return out
