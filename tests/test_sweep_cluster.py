"""The smoke sweep against a real Ray cluster started with `ray start --head` on loopback.

Its own module: no other Ray runs in this process while the cluster is up.

The test ends only what it started (issue 14, item 8): never `ray stop` or a kill by process name,
which would reach every Ray of the machine's user (a sweep running beside the suite). The cluster
runs in a session of its own (start_new_session) with a temp dir of its own (/tmp/hrc-<port>); at the
end its process group gets SIGTERM, and whatever of *its* processes is left (descendants of the head
command, or processes whose command line names its temp dir) gets SIGKILL by PID. `test_no_test_stops
_processes_by_name` keeps it that way for the whole suite."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness.config import PROJECT_ROOT, load_config
from harness.store import ResultsStore
from harness.sweep.ray_runtime import RAY_ENV, quiet_home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_processes(head: subprocess.Popen, temp_dir: str) -> set:
    """The PIDs of the cluster this test started: the head command's descendants and every process
    whose command line names the cluster's own temp dir (Ray's servers and workers pass it)."""
    found = set()
    try:
        found |= {p.pid for p in psutil.Process(head.pid).children(recursive=True)}
    except psutil.Error:
        pass
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                found.add(p.pid)
        except psutil.Error:
            pass
    found.discard(os.getpid())
    return found


def stop_own_cluster(head: subprocess.Popen, pids: set, temp_dir: str) -> None:
    """SIGTERM to the cluster's own process group, then SIGKILL by PID to what is left of its own processes."""
    if head.poll() is None:
        assert os.getpgid(head.pid) == head.pid != os.getpgid(0), "the cluster must run in a process group of its own"
    pids = pids | own_processes(head, temp_dir)
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)]
        if not alive:
            break
        time.sleep(1)
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            # ours: still named by our temp dir (a reused PID would not be)
            if any(temp_dir in part for part in proc.cmdline()) or proc.ppid() == head.pid:
                proc.kill()
        except psutil.Error:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_smoke_sweep_on_a_ray_start_head_cluster(tiny, tmp_path):
    port = free_port()
    temp_dir = f"/tmp/hrc-{port}"
    env = {**os.environ, **RAY_ENV, "HOME": str(quiet_home(str(tmp_path)))}  # no cloud-metadata probe
    ray = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pids: set = set()
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        pids |= own_processes(head, temp_dir)
        overrides = tiny("+method=kd", f"sweep.ray.address=127.0.0.1:{port}")
        proc = subprocess.run([sys.executable, "-m", "harness", "sweep", *overrides], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=900)
        pids |= own_processes(head, temp_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "lift of the distilled arm" in proc.stdout
        reruns = ResultsStore(load_config(overrides)["store"]["url"]).query(stage="reruns", status="completed")
        assert sorted(r["arm"] for r in reruns) == ["distilled", "distilled", "student-only", "student-only"]
    finally:
        stop_own_cluster(head, pids, temp_dir)


STOP_BY_NAME = [re.compile(p) for p in (r"\bray\W+stop\b", r"\bpkill\b", r"\bkillall\b",
                                         r"kill_all_processes", r"\bray_stop\b")]


def test_no_test_stops_processes_by_name():
    """No test may end processes it did not start: no `ray stop` (every Ray of the user), pkill or
    killall; tests stop Ray by their own PIDs, process groups or temp dirs."""
    here = Path(__file__).resolve()
    offenders = []
    for path in sorted(here.parent.glob("*.py")):
        if path == here:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if any(p.search(line) for p in STOP_BY_NAME):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "tests stopping processes by name:\n" + "\n".join(offenders)
