"""Start (or join) Ray for a sweep, with no traffic beyond loopback, and always shut it down.

A local Ray's processes inherit the driver's environment at `ray.init`. Ray's dashboard probes
the cloud metadata address 169.254.169.254 unless `~/ray_bootstrap_config.yaml` exists, so for
the duration of `ray.init` HOME points at a folder of ours holding an empty one; usage stats are
off. `RAY_CHDIR_TO_TRIAL_DIR=0` keeps trials in the driver's working directory (all our paths are
absolute anyway). An unreachable `ray.address` is a ConfigError found before anything is written.
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


def start_local(num_cpus: Optional[int], results_dir: str, num_gpus: Optional[float] = None) -> None:
    """A local Ray whose processes cannot probe the cloud metadata address."""
    import ray

    os.environ.update(RAY_ENV)
    home = quiet_home(results_dir)
    # short: unix socket paths under it must stay below 108 characters
    temp = f"/tmp/hray-{hashlib.sha1(str(results_dir).encode()).hexdigest()[:8]}"
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        kwargs = {"num_gpus": num_gpus} if num_gpus is not None else {}
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _temp_dir=temp,
                 _node_ip_address="127.0.0.1",  # loopback only
                 log_to_driver=os.environ.get("HARNESS_RAY_LOGS") == "1", configure_logging=False, **kwargs)
    finally:
        if saved is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved


@contextlib.contextmanager
def ray_session(address: Optional[str], num_cpus: Optional[int], results_dir: str,
                num_gpus: Optional[float] = None) -> Iterator[None]:
    """Ray for one sweep; shut down on the way out (Ctrl-C included) unless a caller started it."""
    import ray

    os.environ.update(RAY_ENV)
    if ray.is_initialized():  # a caller (the test session) already started Ray: use it, leave it
        yield
        return
    if address:
        check_address(address)
        ray.init(address=address, log_to_driver=os.environ.get("HARNESS_RAY_LOGS") == "1",
                 configure_logging=False)
    else:
        start_local(num_cpus, results_dir, num_gpus)
    try:
        yield
    finally:
        ray.shutdown()
