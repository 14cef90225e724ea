import math
import socket
import threading
import time

import numpy as np
import pytest

import harness.energy as energy
from harness.energy import GPU_ZERO_ENERGY_MESSAGE, EnergyMeter, gpu_energy_flag

CFG = {"enabled": True, "country_iso_code": "DEU", "carbon_intensity_g_per_kwh": None, "measure_power_secs": 15}


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection is recorded and refused."""
    attempts = []

    def refuse(name):
        def _f(*args, **kwargs):
            attempts.append((name, args[1:] if name == "connect" else args))
            raise OSError(f"network disabled in tests ({name})")

        return _f

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    return attempts


def busy_numpy(seconds=0.4):
    a = np.random.default_rng(0).random((300, 300))
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        a = np.tanh(a @ a.T / 300.0)
        n += 1
    return n


def test_real_tracked_block(tmp_path, no_network):
    threads_before = set(threading.enumerate())
    with EnergyMeter(CFG, run_id="r-real", output_dir=str(tmp_path / "energy")) as meter:
        assert busy_numpy() > 0
    r = meter.result
    assert r["tracker"] == "codecarbon-offline", r.get("failure_reason")
    assert r["energy_kwh"] > 0 and r["co2_kg"] > 0
    assert math.isclose(r["co2_kg"] * 1000 / r["energy_kwh"], r["carbon_intensity_g_per_kwh"], rel_tol=1e-6)
    assert 100 < r["carbon_intensity_g_per_kwh"] < 1000  # DEU grid mix
    assert r["country_iso_code"] == "DEU" and r["country_name"] == "Germany"
    assert math.isclose(r["cpu_kwh"] + r["gpu_kwh"] + r["ram_kwh"], r["energy_kwh"], rel_tol=1e-9)
    assert r["duration_s"] >= 0.4
    assert r["start_overhead_s"] is not None and r["stop_overhead_s"] is not None
    assert r["gpu_energy_flag"] is None  # gpu_used defaults to False
    assert r["emissions_csv"] and (tmp_path / "energy" / "emissions.csv").exists()
    assert r["leftover_threads"] == []
    assert set(threading.enumerate()) <= threads_before
    assert no_network == []


def test_forced_intensity(tmp_path, no_network):
    cfg = dict(CFG, carbon_intensity_g_per_kwh=123.0)
    with EnergyMeter(cfg, run_id="r-forced", output_dir=str(tmp_path)) as meter:
        busy_numpy(0.2)
    r = meter.result
    assert r["tracker"] == "codecarbon-offline", r.get("failure_reason")
    assert r["carbon_intensity_g_per_kwh"] == 123.0
    assert r["energy_kwh"] > 0
    assert math.isclose(r["co2_kg"], r["energy_kwh"] * 123.0 / 1000, rel_tol=1e-6)
    assert "forced" in r["carbon_intensity_source"]
    assert no_network == []


def test_disabled(tmp_path):
    cfg = dict(CFG, enabled=False)
    with EnergyMeter(cfg, run_id="r-off", output_dir=str(tmp_path / "never")) as meter:
        time.sleep(0.05)
    r = meter.result
    assert r["tracker"] == "disabled"
    for k in ("energy_kwh", "co2_kg", "cpu_kwh", "gpu_kwh", "ram_kwh", "carbon_intensity_g_per_kwh"):
        assert r[k] is None
    assert r["duration_s"] >= 0.05
    assert r["gpu_energy_flag"] is None
    assert not (tmp_path / "never").exists()


class _RaisingAtInit:
    def __init__(self, **kwargs):
        raise RuntimeError("no hardware for you")


class _RaisingAtStart:
    stopped = False

    def __init__(self, **kwargs):
        pass

    def start(self):
        raise RuntimeError("start exploded")

    def stop(self):
        type(self).stopped = True


class _RaisingAtStop:
    def __init__(self, **kwargs):
        pass

    def start(self):
        pass

    def stop(self):
        raise RuntimeError("stop exploded")


@pytest.mark.parametrize(
    "cls, stage, msg",
    [(_RaisingAtInit, "init", "no hardware for you"), (_RaisingAtStart, "start", "start exploded"),
     (_RaisingAtStop, "stop", "stop exploded")],
)
def test_failing_tracker_does_not_break_the_run(tmp_path, monkeypatch, cls, stage, msg):
    monkeypatch.setattr(energy, "_tracker_class", lambda: cls)
    ran = []
    with EnergyMeter(CFG, run_id="r-fail", output_dir=str(tmp_path)) as meter:
        ran.append(busy_numpy(0.05))
    r = meter.result
    assert ran and ran[0] > 0
    assert r["tracker"] == "failed"
    assert stage in r["failure_reason"] and msg in r["failure_reason"]
    assert r["energy_kwh"] is None and r["co2_kg"] is None and r["carbon_intensity_g_per_kwh"] is None
    assert r["duration_s"] >= 0.05


def test_failing_codecarbon_start_is_detected_despite_suppress(tmp_path, monkeypatch):
    """codecarbon's start() swallows exceptions; the meter must still report 'failed'."""
    from codecarbon.emissions_tracker import BaseEmissionsTracker

    def broken(self):
        raise RuntimeError("hardware probe failed")

    monkeypatch.setattr(BaseEmissionsTracker, "_ensure_hardware_ready", broken)
    before = set(threading.enumerate())
    with EnergyMeter(CFG, run_id="r-cc-fail", output_dir=str(tmp_path)) as meter:
        busy_numpy(0.05)
    r = meter.result
    assert r["tracker"] == "failed"
    assert "hardware probe failed" in r["failure_reason"]
    assert r["energy_kwh"] is None
    assert set(threading.enumerate()) <= before


def test_block_exception_propagates_and_is_measured(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with EnergyMeter(CFG, run_id="r-exc", output_dir=str(tmp_path)) as meter:
            busy_numpy(0.05)
            1 / 0
    r = meter.result
    assert r["tracker"] == "codecarbon-offline"
    assert r["block_exception"].startswith("ZeroDivisionError")
    assert r["energy_kwh"] > 0


def test_gpu_energy_flag_logic():
    assert gpu_energy_flag(False, None) is None
    assert gpu_energy_flag(False, 0.0) is None
    assert gpu_energy_flag(True, 0.0) == GPU_ZERO_ENERGY_MESSAGE
    assert gpu_energy_flag(True, None) == GPU_ZERO_ENERGY_MESSAGE
    assert gpu_energy_flag(True, 1e-6) is None
    assert GPU_ZERO_ENERGY_MESSAGE == (
        "zero GPU energy while a GPU was in use (codecarbon cannot read this GPU's energy counter)"
    )


def test_gpu_flag_in_result_when_gpu_claimed(tmp_path):
    # On a machine without a readable GPU counter codecarbon reports gpu_energy 0.
    with EnergyMeter(CFG, run_id="r-gpu", output_dir=str(tmp_path), gpu_used=True) as meter:
        busy_numpy(0.05)
    r = meter.result
    assert r["tracker"] == "codecarbon-offline"
    if not r["gpu_kwh"]:
        assert r["gpu_energy_flag"] == GPU_ZERO_ENERGY_MESSAGE
    else:
        assert r["gpu_energy_flag"] is None


def test_shared_gpu_energy_is_apportioned_not_double_counted():
    """Two trials holding 0.5 GPU each: each counts half of the device's reading, CO2 follows."""
    from harness.energy import apportion_gpu

    result = {"energy_kwh": 0.30, "gpu_kwh": 0.20, "cpu_kwh": 0.08, "ram_kwh": 0.02, "co2_kg": 0.12}
    notes = apportion_gpu(result, 0.5)
    assert result["gpu_kwh_device"] == 0.20 and result["gpu_kwh"] == pytest.approx(0.10)
    assert result["energy_kwh"] == pytest.approx(0.20) and result["co2_kg"] == pytest.approx(0.08)
    assert result["gpu_share"] == 0.5 and "shared" in notes[0]
    zero = {"energy_kwh": 0.1, "gpu_kwh": 0.0, "co2_kg": 0.04}
    assert apportion_gpu(zero, 0.25) == [] and zero["energy_kwh"] == 0.1 and zero["gpu_share"] == 0.25


def test_meter_reads_the_share_from_config(tmp_path):
    assert EnergyMeter({"gpu_share": 0.5}, "r", str(tmp_path)).gpu_share == 0.5
    assert EnergyMeter({"gpu_share": 1.0}, "r", str(tmp_path)).gpu_share is None   # a whole GPU: nothing to split
    assert EnergyMeter({}, "r", str(tmp_path)).gpu_share is None
