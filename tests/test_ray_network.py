"""The local Ray a sweep starts listens on loopback only: every socket of every one of its processes.

A child process starts Ray through `ray_session` exactly as `harness sweep` does, runs a Tune fit
and keeps an actor alive (so GCS, raylet, agents, monitor, driver and workers all exist), then
waits; meanwhile this test lists the listening sockets of the child and of all its descendants.
Its own module and its own process: no other Ray of the test session is involved, and only the
processes of this Ray are ever stopped."""
import ipaddress
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from harness.config import PROJECT_ROOT

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent("""
    import sys
    import ray
    from ray import tune
    from harness.sweep.ray_runtime import ray_session

    def trainable(config):
        tune.report({"score": config["x"]})

    with ray_session(None, 2, sys.argv[1]):
        @ray.remote(num_cpus=0)
        class Idle:
            def ping(self):
                return 1

        actor = Idle.remote()
        ray.get(actor.ping.remote())
        tune.Tuner(trainable, param_space={"x": tune.grid_search([1, 2])},
                   run_config=tune.RunConfig(storage_path=sys.argv[2], verbose=0)).fit()
        print("READY", flush=True)
        sys.stdin.readline()  # hold Ray up while the test looks
    print("DONE", flush=True)
""")


def is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def session_processes(driver: psutil.Process, temp_dir: str) -> list:
    """The driver, its descendants, and any process naming the session's temp dir (reparented ones)."""
    procs = {driver.pid: driver}
    procs.update({p.pid: p for p in driver.children(recursive=True)})
    for p in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(p.info["cmdline"] or []):
            procs.setdefault(p.pid, p)
    return list(procs.values())


def listeners(procs: list) -> list:
    """(pid, name, proto, host, port) of every listening TCP and every bound UDP socket."""
    found = []
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.laddr and (c.status == psutil.CONN_LISTEN or c.type.name == "SOCK_DGRAM"):
                    found.append((p.pid, name, c.type.name, c.laddr.ip, c.laddr.port))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def test_local_ray_listens_on_loopback_only(tmp_path):
    from harness.sweep.ray_runtime import local_temp_dir

    results = tmp_path / "results"
    temp_dir = local_temp_dir(str(results))
    child = subprocess.Popen([sys.executable, "-c", DRIVER, str(results), str(tmp_path / "tune")],
                             cwd=PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        line = child.stdout.readline()
        assert line.strip() == "READY", child.stderr.read()[-3000:] if child.poll() is not None else line
        time.sleep(1)  # let late listeners (agents, monitor metrics) bind
        seen = session_processes(psutil.Process(child.pid), temp_dir)
        names = {p.name() for p in seen if p.is_running()}
        assert {"gcs_server", "raylet"} <= names, names  # we are looking at the whole session
        socks = listeners(seen)
        assert len(socks) >= 4, socks  # at least GCS, raylet, driver, a worker
        exposed = [s for s in socks if not is_loopback(s[3])]
        assert not exposed, f"listening beyond loopback: {exposed}"

        child.stdin.write("\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0 and "DONE" in out, err[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        # ray.shutdown() ends the session's processes; end any it left, ours only, by PID
        for p in seen:
            try:
                if p.is_running() and p.pid != child.pid:
                    p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
