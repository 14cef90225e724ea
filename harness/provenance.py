"""Where a number came from: code version, package versions, machine."""
from __future__ import annotations

import functools
import platform
import socket
import subprocess
import sys
from importlib import metadata

from harness.config import PROJECT_ROOT

PACKAGES = ("torch", "torchvision", "numpy", "ray", "optuna", "hydra-core", "omegaconf",
            "codecarbon", "sqlalchemy", "scipy", "pandas")


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the harness checkout, with '-dirty' when tracked files have uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def host() -> str:
    return f"{socket.gethostname()} ({platform.machine()}, {platform.processor() or 'unknown cpu'})"
