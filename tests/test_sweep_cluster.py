"""The smoke sweep against a real Ray cluster started with `ray start --head` on loopback.

Its own module: no other Ray runs in this process while the cluster is up."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.config import PROJECT_ROOT, load_config
from harness.store import ResultsStore
from harness.sweep.ray_runtime import RAY_ENV, quiet_home

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_smoke_sweep_on_a_ray_start_head_cluster(tiny, tmp_path):
    port = free_port()
    env = {**os.environ, **RAY_ENV, "HOME": str(quiet_home(str(tmp_path)))}  # no cloud-metadata probe
    ray = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir=/tmp/hrc-{port}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        overrides = tiny("+method=kd", f"sweep.ray.address=127.0.0.1:{port}")
        proc = subprocess.run([sys.executable, "-m", "harness", "sweep", *overrides], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "lift of the distilled arm" in proc.stdout
        reruns = ResultsStore(load_config(overrides)["store"]["url"]).query(stage="reruns", status="completed")
        assert sorted(r["arm"] for r in reruns) == ["distilled", "distilled", "student-only", "student-only"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
