"""Start (or join) Ray for a sweep, with no traffic beyond loopback, and always shut it down.

A local Ray's processes inherit the driver's environment at `ray.init`. Ray's dashboard probes
the cloud metadata address 169.254.169.254 unless `~/ray_bootstrap_config.yaml` exists, so for
the duration of `ray.init` HOME points at a folder of ours holding an empty one; usage stats are
off. `RAY_CHDIR_TO_TRIAL_DIR=0` keeps trials in the driver's working directory (all our paths are
absolute anyway). An unreachable `ray.address` is a ConfigError found before anything is written.

Loopback only: Ray binds each of its servers (GCS, raylet, every worker's and the driver's gRPC
server, runtime-env and dashboard agents, the autoscaler's metrics port) to loopback only when the
node's IP *is* 127.0.0.1, and to all interfaces (or the external address) otherwise. But
`ray.init(_node_ip_address="127.0.0.1")` alone does not get there: Ray replaces a loopback node IP
with the machine's external address unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (the flag Ray
uses on laptops), so for the duration of `ray.init` that flag is set, in the environment (read by
Ray's processes at import) and in the already-imported constant (read by this process).
`tests/test_ray_network.py` lists every listening socket of the session and checks it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from pathlib import Path
from typing import Iterator, Optional

from harness.errors import ConfigError

RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "RAY_AUTH_MODE": "disabled",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    # Ctrl-C must stop the whole sweep: Tune's own SIGINT handler would end only the current stage's
    # Tuner.fit() (returning normally), and the driver would go on with the next stage.
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
    "CODECARBON_LOG_LEVEL": "error",
}
# A local Ray only: with it Ray keeps the node IP 127.0.0.1, and so binds every server to loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def check_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast (ConfigError) when nothing listens at host:port."""
    host, _, port = address.replace("ray://", "").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"sweep.ray.address must be host:port (e.g. 127.0.0.1:6379), got '{address}'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConfigError(f"no Ray cluster reachable at sweep.ray.address={address} ({e.strerror or e}); start "
                          f"one with `ray start --head --port={port}` or leave sweep.ray.address=null "
                          f"to start a local Ray") from None


def quiet_home(results_dir: str) -> Path:
    home = Path(results_dir) / "ray" / "home"
    home.mkdir(parents=True, exist_ok=True)
    bootstrap = home / "ray_bootstrap_config.yaml"
    if not bootstrap.exists():
        bootstrap.write_text("{}\n")
    return home


def local_temp_dir(results_dir: str) -> str:
    """The local Ray's temp dir (sessions, logs, sockets); short: unix socket paths stay < 108 chars."""
    return f"/tmp/hray-{hashlib.sha1(str(results_dir).encode()).hexdigest()[:8]}"


def start_local(num_cpus: Optional[int], results_dir: str, num_gpus: Optional[float] = None) -> None:
    """A local Ray whose processes cannot probe the cloud metadata address."""
    import ray

    os.environ.update(RAY_ENV)
    home = quiet_home(results_dir)
    temp = local_temp_dir(results_dir)
    kwargs = {"num_gpus": num_gpus} if num_gpus is not None else {}
    with _environ(HOME=str(home), **LOOPBACK_ENV), _loopback_node_ip():
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp,
                 _node_ip_address="127.0.0.1",
                 log_to_driver=os.environ.get("HARNESS_RAY_LOGS") == "1", configure_logging=False, **kwargs)


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the block (Ray's processes inherit them), then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _loopback_node_ip() -> Iterator[None]:
    """Ray's node-IP lookup answers loopback in this process (ray may have been imported before)."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def ray_session(address: Optional[str], num_cpus: Optional[int], results_dir: str,
                num_gpus: Optional[float] = None) -> Iterator[None]:
    """Ray for one sweep; shut down on the way out (Ctrl-C included) unless a caller started it."""
    import ray

    os.environ.update(RAY_ENV)
    if ray.is_initialized():  # a caller (the test session) already started Ray: use it, leave it
        yield
        return
    on_sigterm = _python_sigterm_handler()
    if address:
        check_address(address)
        ray.init(address=address, log_to_driver=os.environ.get("HARNESS_RAY_LOGS") == "1",
                 configure_logging=False)
    else:
        start_local(num_cpus, results_dir, num_gpus)
    _restore_sigterm(on_sigterm)
    try:
        yield
    finally:
        ray.shutdown()


def _python_sigterm_handler():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.getsignal(signal.SIGTERM)


def _restore_sigterm(handler) -> None:
    """`ray.init` installs its C++ failure-signal handler for SIGTERM in the driver (a stack dump, no
    clean stop); put the driver's own Python handler back (the CLI's: unwind like Ctrl-C, exit 143)."""
    import signal

    if callable(handler) or handler in (signal.SIG_DFL, signal.SIG_IGN):
        signal.signal(signal.SIGTERM, handler)
