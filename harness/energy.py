"""Energy / CO2 measurement around a block of work, with codecarbon's offline tracker.

    with EnergyMeter(cfg, run_id, output_dir, gpu_used=True) as meter:
        train()
    record.update(energy_kwh=meter.result["energy_kwh"], ...)

``cfg`` is the plain dict ``{"enabled": true, "country_iso_code": "DEU",
"carbon_intensity_g_per_kwh": null, "measure_power_secs": 15}`` (an OmegaConf DictConfig
works as well).

Nothing here talks to the network: only ``codecarbon.OfflineEmissionsTracker`` is used,
with CSV output only, no HTTP endpoint and no Electricity Maps token (the intensity comes
from codecarbon's bundled per-country energy-mix table, or the forced value).

codecarbon 3.3.2 wraps ``OfflineEmissionsTracker.__init__``, ``start`` and ``stop`` in
``@suppress(Exception)``: failures are only logged (and we silence its logger below
"error"), never raised.  We therefore call the undecorated ``start``/``stop`` (their
``__wrapped__``) to see the real exception, and also check the tracker's state afterwards
(``_start_time`` set after start, ``final_emissions_data`` present after stop).  Any
failure gives ``result["tracker"] == "failed"`` with the reason, energy fields None, and
never interrupts the tracked block.

codecarbon's periodic measurement runs in ``threading.Timer`` threads that ``stop()``
cancels but does not join (and a timer firing during stop can re-arm itself); after stop
we cancel and join them explicitly so no background thread outlives the block.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Mapping

# Must be set before codecarbon is imported anywhere (it configures its logger on import).
os.environ["CODECARBON_LOG_LEVEL"] = "error"

GPU_ZERO_ENERGY_MESSAGE = (
    "zero GPU energy while a GPU was in use (codecarbon cannot read this GPU's energy counter)"
)
TRACKER_OFFLINE = "codecarbon-offline"
TRACKER_DISABLED = "disabled"
TRACKER_FAILED = "failed"

_ENERGY_KEYS = (
    "energy_kwh",
    "co2_kg",
    "cpu_kwh",
    "gpu_kwh",
    "ram_kwh",
    "carbon_intensity_g_per_kwh",
)

log = logging.getLogger(__name__)


def gpu_energy_flag(gpu_used: bool, gpu_kwh: float | None) -> str | None:
    """Sanity flag: a CUDA GPU was used but codecarbon reported no GPU energy."""
    if gpu_used and (gpu_kwh is None or gpu_kwh <= 0.0):
        return GPU_ZERO_ENERGY_MESSAGE
    return None


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    try:
        value = cfg.get(key, default)
    except AttributeError:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _tracker_class():
    """The tracker class; a separate function so tests can monkeypatch it."""
    from codecarbon import OfflineEmissionsTracker

    return OfflineEmissionsTracker


def _is_codecarbon_tracker(obj: Any) -> bool:
    try:
        from codecarbon.emissions_tracker import BaseEmissionsTracker
    except Exception:
        return False
    return isinstance(obj, BaseEmissionsTracker)


def _call_unsuppressed(tracker: Any, name: str) -> Any:
    """Call tracker.<name>() bypassing codecarbon's @suppress(Exception) if present."""
    bound = getattr(tracker, name)
    raw = getattr(getattr(type(tracker), name, None), "__wrapped__", None)
    if callable(raw):
        return raw(tracker)
    return bound()


def _schedulers(tracker: Any) -> list:
    return [
        s
        for s in (
            getattr(tracker, "_scheduler", None),
            getattr(tracker, "_scheduler_monitor_power", None),
        )
        if s is not None
    ]


def _reap_schedulers(schedulers: list, timeout: float = 5.0) -> None:
    """Cancel and join codecarbon's PeriodicScheduler timer threads."""
    deadline = time.monotonic() + timeout
    for sched in schedulers:
        try:
            for _ in range(100):
                lock = getattr(sched, "_lock", None)
                if lock is not None:
                    with lock:
                        sched._stopped = True
                        timer = sched._timer
                else:
                    timer = getattr(sched, "_timer", None)
                if timer is None:
                    break
                timer.cancel()
                if timer is not threading.current_thread():
                    timer.join(max(0.0, deadline - time.monotonic()))
                if getattr(sched, "_timer", None) is timer or time.monotonic() > deadline:
                    break  # not re-armed while we joined
        except Exception as exc:  # private API changed: best effort only
            log.debug("could not reap codecarbon scheduler: %r", exc)


def _cpu_power_mode(tracker: Any) -> str | None:
    try:
        from codecarbon.external.hardware import CPU
    except Exception:
        return None
    for hw in getattr(tracker, "_hardware", None) or []:
        if isinstance(hw, CPU):
            return getattr(hw, "_mode", None)
    return None


def apportion_gpu(result: dict, share: float) -> list:
    """codecarbon's GPU energy is per device: a run holding `share` (< 1) of a GPU that other trials
    use at the same time would count their energy too. Keep the device's reading in `gpu_kwh_device`,
    count `share` of it in `gpu_kwh` and `energy_kwh`, scale CO2 with the energy, and say so.
    The split assumes the co-located runs kept the GPU equally busy; it is an estimate."""
    device = result.get("gpu_kwh")
    result["gpu_share"] = share
    if not device:
        return []
    result["gpu_kwh_device"] = device
    result["gpu_kwh"] = device * share
    total = result.get("energy_kwh")
    if total:
        new_total = total - device * (1 - share)
        if result.get("co2_kg") is not None:
            result["co2_kg"] *= new_total / total
        result["energy_kwh"] = new_total
    return [f"GPU shared with other trials: {share:g} of the device's {device:.6f} kWh counted "
            f"(codecarbon reads the whole device; gpu_kwh_device keeps that reading)"]


class EnergyMeter:
    """Context manager measuring energy/CO2 of the enclosed block; see module docstring.

    ``result`` is filled on exit (and is a dict of Nones with the tracker state before).
    Exceptions raised by the block propagate unchanged; the measurement is still taken.
    """

    def __init__(self, cfg: Mapping | None, run_id: str, output_dir: str, gpu_used: bool = False):
        self.cfg = cfg if cfg is not None else {}
        self.run_id = str(run_id)
        self.output_dir = os.path.abspath(os.fspath(output_dir))
        self.gpu_used = bool(gpu_used)
        self.enabled = bool(_cfg_get(self.cfg, "enabled", True))
        self.country_iso_code = str(_cfg_get(self.cfg, "country_iso_code", "DEU")).upper()
        forced = _cfg_get(self.cfg, "carbon_intensity_g_per_kwh", None)
        self.forced_intensity = None if forced is None else float(forced)
        self.measure_power_secs = float(_cfg_get(self.cfg, "measure_power_secs", 15))
        share = _cfg_get(self.cfg, "gpu_share", None)
        self.gpu_share = None if share is None or float(share) >= 1 else float(share)
        self.tracker: Any = None
        self.notes: list[str] = []
        self.result: dict = self._base_result(TRACKER_DISABLED if not self.enabled else None)
        self._t0: float | None = None
        self._threads_before: set[threading.Thread] = set()
        self._schedulers: list = []

    # ---- helpers ------------------------------------------------------------------

    def _base_result(self, tracker_state: str | None) -> dict:
        res: dict[str, Any] = {k: None for k in _ENERGY_KEYS}
        res.update(
            tracker=tracker_state,
            country_iso_code=self.country_iso_code,
            country_name=None,
            carbon_intensity_source=None,
            forced_carbon_intensity_g_per_kwh=self.forced_intensity,
            duration_s=None,
            tracker_duration_s=None,
            start_overhead_s=None,
            stop_overhead_s=None,
            measure_power_secs=self.measure_power_secs,
            tracking_mode="process",
            cpu_model=None,
            cpu_count=None,
            gpu_model=None,
            gpu_count=None,
            cpu_power_mode=None,
            cpu_power_w=None,
            gpu_power_w=None,
            ram_power_w=None,
            gpu_used=self.gpu_used,
            gpu_energy_flag=None,
            codecarbon_version=None,
            emissions_csv=None,
            failure_reason=None,
            block_exception=None,
            leftover_threads=None,
            notes=[],
        )
        return res

    def _fail(self, stage: str, exc: BaseException | str) -> None:
        reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.result["tracker"] = TRACKER_FAILED
        self.result["failure_reason"] = f"codecarbon {stage} failed: {reason}"
        log.warning("energy measurement disabled for run %s: %s", self.run_id, self.result["failure_reason"])

    # ---- context manager ------------------------------------------------------------

    def __enter__(self) -> "EnergyMeter":
        self._threads_before = set(threading.enumerate())
        if self.enabled:
            t = time.perf_counter()
            self._start_tracker()
            self.result["start_overhead_s"] = time.perf_counter() - t
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        duration = time.perf_counter() - (self._t0 if self._t0 is not None else time.perf_counter())
        self.result["duration_s"] = duration
        if exc_type is not None:
            self.result["block_exception"] = f"{exc_type.__name__}: {exc}"
        if self.enabled and self.tracker is not None and self.result["tracker"] != TRACKER_FAILED:
            t = time.perf_counter()
            self._stop_tracker()
            self.result["stop_overhead_s"] = time.perf_counter() - t
        elif self.tracker is not None:
            # start failed half-way: still make sure nothing keeps running
            self._silent_stop()
        if self.result["tracker"] is None:
            self.result["tracker"] = TRACKER_DISABLED if not self.enabled else TRACKER_FAILED
        if self.result["tracker"] != TRACKER_OFFLINE:
            for k in _ENERGY_KEYS:
                self.result[k] = None
        self.result["gpu_energy_flag"] = (
            gpu_energy_flag(self.gpu_used, self.result["gpu_kwh"])
            if self.result["tracker"] == TRACKER_OFFLINE
            else None
        )
        leftover = [
            th.name for th in threading.enumerate() if th not in self._threads_before and th.is_alive()
        ]
        self.result["leftover_threads"] = leftover
        self.result["notes"] = list(self.notes)
        return False  # never swallow the block's exception

    # ---- codecarbon -----------------------------------------------------------------

    def _tracker_kwargs(self) -> dict:
        from codecarbon.output_methods.base_output import OutputMethod

        kwargs: dict[str, Any] = dict(
            country_iso_code=self.country_iso_code,
            project_name="harness",
            experiment_id=self.run_id,
            experiment_name=self.run_id,
            output_dir=self.output_dir,
            # save_to_file/save_to_api are deprecated in codecarbon 3.x (DeprecationWarning);
            # output_methods=[CSV] is the equivalent of save_to_file=True, save_to_api=False.
            output_methods=[OutputMethod.CSV],
            emissions_endpoint=None,  # no HTTP output even if a config file sets one
            electricitymaps_api_token=None,  # no Electricity Maps API
            api_call_interval=-1,  # no intermediate "live" outputs
            allow_multiple_runs=True,
            log_level="error",
            tracking_mode="process",
            measure_power_secs=self.measure_power_secs,
        )
        if self.forced_intensity is not None:
            kwargs["force_carbon_intensity_g_co2e_kwh"] = self.forced_intensity
        return kwargs

    def _start_tracker(self) -> None:
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            cls = _tracker_class()
            tracker = cls(**self._tracker_kwargs())
        except Exception as exc:
            self._fail("init", exc)
            return
        self.tracker = tracker
        # OfflineEmissionsTracker.__init__ swallows exceptions: check it finished.
        if _is_codecarbon_tracker(tracker) and not hasattr(tracker, "run_id"):
            # run_id is the last attribute __init__ sets (in _init_output_methods)
            self._fail("init", "tracker construction did not complete (exception suppressed by codecarbon)")
            return
        # A legacy co2_signal_api_token from a config file would survive the explicit
        # electricitymaps_api_token=None; drop it so no API can be called.
        if getattr(tracker, "_electricitymaps_api_token", None):
            tracker._electricitymaps_api_token = None
            self.notes.append("ignored an Electricity Maps token found in codecarbon config")
        try:
            _call_unsuppressed(tracker, "start")
        except Exception as exc:
            self._fail("start", exc)
            self._silent_stop()
            return
        if hasattr(tracker, "_start_time") and tracker._start_time is None:
            self._fail("start", "tracker did not start (another instance running or suppressed error)")
            self._silent_stop()
            return
        self._schedulers = _schedulers(tracker)

    def _silent_stop(self) -> None:
        scheds = self._schedulers or _schedulers(self.tracker)
        try:
            if getattr(self.tracker, "_start_time", None) is not None:
                _call_unsuppressed(self.tracker, "stop")
        except Exception:
            pass
        _reap_schedulers(scheds)

    def _stop_tracker(self) -> None:
        tracker = self.tracker
        scheds = self._schedulers or _schedulers(tracker)
        try:
            _call_unsuppressed(tracker, "stop")
        except Exception as exc:
            self._fail("stop", exc)
            return
        finally:
            _reap_schedulers(scheds)
        data = getattr(tracker, "final_emissions_data", None)
        if data is None:
            self._fail("stop", "no final emissions data (exception suppressed by codecarbon)")
            return
        self._fill_from_data(data, tracker)

    def _apportion_gpu(self, r: dict) -> None:
        if self.gpu_share is not None:
            self.notes.extend(apportion_gpu(r, self.gpu_share))

    def _fill_from_data(self, data: Any, tracker: Any) -> None:
        def num(name: str) -> float | None:
            v = getattr(data, name, None)
            return None if v is None else float(v)

        r = self.result
        r["tracker"] = TRACKER_OFFLINE
        r["energy_kwh"] = num("energy_consumed")
        r["co2_kg"] = num("emissions")
        r["cpu_kwh"] = num("cpu_energy")
        r["gpu_kwh"] = num("gpu_energy")
        r["ram_kwh"] = num("ram_energy")
        r["cpu_power_w"] = num("cpu_power")
        r["gpu_power_w"] = num("gpu_power")
        r["ram_power_w"] = num("ram_power")
        r["tracker_duration_s"] = num("duration")
        r["country_iso_code"] = getattr(data, "country_iso_code", None) or self.country_iso_code
        r["country_name"] = getattr(data, "country_name", None)
        r["cpu_model"] = getattr(data, "cpu_model", None)
        r["cpu_count"] = getattr(data, "cpu_count", None)
        r["gpu_model"] = getattr(data, "gpu_model", None) or None
        r["gpu_count"] = getattr(data, "gpu_count", None)
        r["tracking_mode"] = getattr(data, "tracking_mode", None) or "process"
        r["codecarbon_version"] = getattr(data, "codecarbon_version", None)
        r["cpu_power_mode"] = _cpu_power_mode(tracker)
        csv_path = os.path.join(self.output_dir, getattr(tracker, "_output_file", "emissions.csv"))
        r["emissions_csv"] = csv_path if os.path.isfile(csv_path) else None

        kwh, co2 = r["energy_kwh"], r["co2_kg"]
        if self.forced_intensity is not None:
            r["carbon_intensity_g_per_kwh"] = self.forced_intensity
            r["carbon_intensity_source"] = "forced (codecarbon force_carbon_intensity_g_co2e_kwh)"
            if kwh is not None and co2 is not None and kwh > 0:
                expected = kwh * self.forced_intensity / 1000.0
                if abs(co2 - expected) > 1e-9 * max(abs(expected), 1e-30) + 1e-18:
                    # codecarbon did not honour the forced value: apply it ourselves.
                    r["co2_kg"] = expected
                    self.notes.append("co2_kg recomputed as energy_kwh * forced intensity")
        else:
            r["carbon_intensity_source"] = f"codecarbon offline energy mix ({r['country_iso_code']})"
            if kwh is not None and co2 is not None and kwh > 0:
                r["carbon_intensity_g_per_kwh"] = co2 * 1000.0 / kwh
        self._apportion_gpu(r)
        if r["cpu_power_mode"] in ("cpu_load", "constant") or (
            r["cpu_power_mode"] is None and r["cpu_kwh"]
        ):
            self.notes.append(
                "CPU energy is an estimate (TDP x load), no hardware energy counter (RAPL) was read"
            )
