"""Inference energy of the models of a report: `python -m harness energy` measures it now.

The model (student or teacher, as configured in the rows) runs a timed loop of forward passes at the
dataset's evaluation size inside `harness.energy.EnergyMeter` (codecarbon's offline tracker). The
loop runs at least `INFERENCE_IMAGES` images and at least `INFERENCE_MIN_SECONDS` seconds after a
warm-up batch, and the measured energy is extrapolated linearly to 10,000 images (x 10,000 / images
timed). The weights are freshly initialised (seed 0): the work of a dense forward pass does not
depend on the values of the weights. `inference_for_blocks` measures what `harness.report.energy`
shows for each block (the student, and the teacher of the block's first distilled arm), once per
(model, dataset size, batch, device), and returns plain dicts.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from harness.config import stable_hash
from harness.report.blocks import MISSING, STUDENT_ONLY
from harness.report.energy import FLAGGED, PER_IMAGES

INFERENCE_IMAGES = 64
INFERENCE_MIN_SECONDS = 3.0


def measure_inference(model_cfg: dict, dataset_cfg: dict, energy_cfg: dict, device: Any, output_dir: str,
                      batch_size: int, images: int = INFERENCE_IMAGES,
                      min_seconds: float = INFERENCE_MIN_SECONDS) -> Dict[str, Any]:
    """Energy of a timed inference loop of `model_cfg` at the dataset's image size, per 10k images.

    Returns images and seconds timed, batch size, device, the tracker result, and `kwh_10k` /
    `co2_10k` (None with `reason` when the tracker is off or failed, or GPU energy was flagged).
    """
    import torch

    from harness.energy import EnergyMeter
    from harness.engine.teacher import MODEL_KEYS, freeze
    from harness.models import build_segmenter

    device = torch.device(device)
    torch.manual_seed(0)
    model = freeze(build_segmenter({k: model_cfg[k] for k in MODEL_KEYS if k in model_cfg},
                                   int(dataset_cfg["num_classes"])).to(device))
    h, w = (int(v) for v in dataset_cfg["image_size"])
    batch_size = max(1, min(int(batch_size), int(images)))
    x = torch.randn(batch_size, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        model(x)  # warm-up (allocations, cudnn), not measured
        sync()
        done, started = 0, time.perf_counter()
        meter = EnergyMeter(energy_cfg, f"inference-{model_cfg.get('name', 'model')}", output_dir,
                            gpu_used=device.type == "cuda")
        with meter:
            started = time.perf_counter()
            while done < images or time.perf_counter() - started < min_seconds:
                model(x)
                sync()
                done += batch_size
            seconds = time.perf_counter() - started
    r = meter.result
    out = {"model": model_cfg.get("name"), "device": str(device), "batch_size": batch_size,
           "image_size": [h, w], "images": done, "seconds": seconds, "tracker": r.get("tracker"),
           "energy_kwh": r.get("energy_kwh"), "co2_kg": r.get("co2_kg"),
           "carbon_intensity_g_per_kwh": r.get("carbon_intensity_g_per_kwh"),
           "carbon_intensity_source": r.get("carbon_intensity_source"),
           "cpu_power_mode": r.get("cpu_power_mode"), "notes": r.get("notes") or [],
           "kwh_10k": None, "co2_10k": None, "reason": None}
    if r.get("gpu_energy_flag"):
        out["reason"] = f"{FLAGGED}: {r['gpu_energy_flag']}"
    elif r.get("energy_kwh") is None:
        out["reason"] = (f"{MISSING} (energy tracking disabled: energy.enabled=false)"
                         if r.get("tracker") == "disabled" else
                         f"{MISSING} (codecarbon failed: {r.get('failure_reason')})")
    else:
        scale = PER_IMAGES / done
        out["kwh_10k"] = r["energy_kwh"] * scale
        out["co2_10k"] = r["co2_kg"] * scale if r.get("co2_kg") is not None else None
    return out


def not_measured(model_cfg: dict, dataset_cfg: dict, energy_cfg: dict, device: Any, output_dir: str,
                 batch_size: int, **_) -> Dict[str, Any]:
    """What `measure_inference` returns when report.measure=false: no value, and why."""
    return {"model": model_cfg.get("name"), "device": str(device), "batch_size": batch_size,
            "image_size": list(dataset_cfg["image_size"]), "images": 0, "seconds": 0.0, "tracker": None,
            "energy_kwh": None, "co2_kg": None, "carbon_intensity_g_per_kwh": None, "carbon_intensity_source": None,
            "cpu_power_mode": None, "notes": [], "kwh_10k": None, "co2_10k": None,
            "reason": f"{MISSING} (not measured: report.measure=false)"}


class InferenceCache:
    """One measurement per (model, dataset size, batch, device) for the whole report."""

    def __init__(self, cfg: dict, measure=None, **kwargs):
        self.cfg, self.measure, self.kwargs = cfg, measure or measure_inference, kwargs
        self.results: Dict[str, Dict[str, Any]] = {}

    def get(self, model_cfg: dict, dataset_cfg: dict, batch_size: int) -> Dict[str, Any]:
        from harness.engine.train import resolve_device

        device = resolve_device(self.cfg["device"])
        key = stable_hash([model_cfg, dataset_cfg["image_size"], dataset_cfg["num_classes"], batch_size, str(device)])
        if key not in self.results:
            out_dir = str(Path(self.cfg["paths"]["results"]) / "energy" / "inference")
            self.results[key] = self.measure(model_cfg, dataset_cfg, self.cfg["energy"], device, out_dir,
                                             batch_size, **self.kwargs)
        return self.results[key]


def inference_for_blocks(cfg: dict, blocks: Sequence[Any], measure=None, **measure_kwargs
                         ) -> Dict[Any, Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]]:
    """block key -> (student, teacher) inference measurement (None where the block has no such
    configuration), in block order; `measure` replaces `measure_inference` (tests). With
    report.measure=false nothing runs: each model's entry says it was not measured."""
    if not cfg["report"]["measure"]:
        measure = not_measured
    inference = InferenceCache(cfg, measure or measure_inference, **measure_kwargs)
    out = {}
    for block in blocks:
        any_row = next(iter(block.rows), None)
        if any_row is None:
            out[block.key] = (None, None)
            continue
        rcfg = any_row["config_json"]
        batch = int(rcfg["budget"]["eval_batch_size"])
        inf_s = inference.get(rcfg["student"], rcfg["dataset"], batch)
        distilled = [a for label, a in block.arms.items() if label != STUDENT_ONLY]
        tcfg = next((a.rows[0]["config_json"] for a in distilled if a.rows), None)
        inf_t = inference.get(tcfg["teacher"], tcfg["dataset"], batch) if tcfg is not None else None
        out[block.key] = (inf_s, inf_t)
    return out
