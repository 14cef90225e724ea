"""Run checkpoints: every run's final student, and the whole training state for a bit-identical resume.

    <paths.results>/checkpoints/<run_id>/
        final.pt      {"state_dict": student weights, "run_id", "config_hash"}: written when a run ends
                      (any status but failed; `checkpoint.final`); `show` and `reproduce --weights` read it
        last.pt       the training state after iteration n: student, optimiser, every method's own state
                      (its modules' state dicts, its own optimiser, its random generator), the RNG states
                      (torch, CUDA, numpy, python), the data stream's position and the history so far.
                      Written every `checkpoint.every` iterations and when a run is interrupted (Ctrl-C /
                      SIGINT in the main thread: the iteration under way finishes, the state is saved,
                      then the run stops; a second Ctrl-C stops at once without saving)
        iter_<n>.pt   older states, `checkpoint.keep_last` files in all with last.pt (the fallback when
                      the newest cannot be read)
        last.json     {"key", "run_id", "iteration"}: finds last.pt without loading it
        run.lock      held while the run trains: a live run's state is never taken over

A run whose `resume_key` (what it computes: `run_definition` + device, threads, workers, determinism;
not paths, logging or the store) matches a `last.json` resumes from that state and keeps its run
id, so the one record it stores is the run that was interrupted. When a run ends, its last.pt,
iter_*.pt and last.json are deleted: the same command run afterwards is a new run, not a resume.

A state that cannot be read (corrupt, written by other code, another architecture) is ignored with a
warning and the run trains from scratch: on a deterministic run that gives the same result, only later.

Files are written through a BytesIO buffer (the archive's inner name never depends on the temporary
file) and moved into place with os.replace, so a kill never leaves half a file; they are loaded with
`weights_only=True` (tensors, numbers, strings, lists and dicts only: numpy and python RNG states are
stored as such).

The data stream's position is restored by replaying the current epoch up to it (same sampler
generator state, the same batches drawn and dropped), which costs loading at most one epoch. With
`num_workers=0` (the default) the resume is bit-identical on the same machine; with worker processes
their augmentation RNGs are not restored, and the resumed run is close but not identical (a warning
says so).
"""
from __future__ import annotations

import io
import json
import os
import random
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from harness.config import run_definition, stable_hash

STATE_FORMAT = "harness-run-state-1"
COMPUTING_KEYS = ("deterministic", "threads", "num_workers", "channels_last", "cudnn_benchmark")


def resume_key(cfg: dict, device: torch.device) -> str:
    """What a run computes, beyond `run_hash`: the settings that change the numbers on a machine."""
    return stable_hash({**run_definition(cfg), **{k: cfg.get(k) for k in COMPUTING_KEYS}, "device": device.type})


def run_dir(cfg: dict, run_id: str) -> Path:
    return Path(cfg["paths"]["results"]) / "checkpoints" / run_id.replace(":", "_").replace("/", "_")


def final_path(cfg: dict, run_id: str) -> Path:
    """Where the final student of run `run_id` is (`cfg` gives `paths.results`)."""
    return run_dir(cfg, run_id) / "final.pt"


def write_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the final student
def save_final(cfg: dict, run_id: str, model: torch.nn.Module, config_hash: str) -> Path:
    path = final_path(cfg, run_id)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic({"state_dict": state, "run_id": run_id, "config_hash": config_hash}, path)
    return path


class CheckpointError(ValueError):
    """A saved student that cannot be used (corrupt, foreign, another architecture)."""


def load_final(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    """Load the final.pt at `path` into `model` (built from the run's student config), or CheckpointError."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = saved["state_dict"] if isinstance(saved, dict) and "state_dict" in saved else saved
        model.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - unreadable, foreign or the wrong shapes: one message
        raise CheckpointError(f"saved student {path} cannot be used ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return model


# ------------------------------------------------------------------------------ the data stream
class BatchStream:
    """Reshuffled epochs forever; the order depends only on the seed (the same batches, and the same
    draws from the sampler generator, as `while True: yield from loader`). Its position is the
    generator's state at the start of the current epoch and the batches taken since."""

    def __init__(self, loader: DataLoader, generator: torch.Generator):
        self.loader, self.generator = loader, generator
        self._it: Optional[Iterator] = None
        self._epoch_start: Optional[torch.Tensor] = None
        self._taken = 0

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self._it is None:
                self._epoch_start, self._taken = self.generator.get_state(), 0
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self._taken += 1
            return batch

    def state(self) -> Dict[str, Any]:
        return {"epoch_start": self._epoch_start, "taken": self._taken, "generator": self.generator.get_state()}

    def restore(self, state: Dict[str, Any]) -> None:
        """Replay the epoch under way up to the saved position (its batches are loaded and dropped)."""
        if state["epoch_start"] is None:
            return
        self.generator.set_state(state["epoch_start"])
        self._it, self._epoch_start, self._taken = iter(self.loader), state["epoch_start"], 0
        for _ in range(state["taken"]):
            next(self._it)
            self._taken += 1
        self.generator.set_state(state["generator"])


# ------------------------------------------------------------------------------ the training state
def rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _generators(methods: Sequence[torch.nn.Module]) -> List[torch.Generator]:
    seen: Dict[int, torch.Generator] = {}
    for m in methods:
        g = getattr(getattr(m, "ctx", None), "generator", None)
        if isinstance(g, torch.Generator) and id(g) not in seen:
            seen[id(g)] = g
    return list(seen.values())


def training_state(key: str, run_id: str, fit_state, student, optimizer, methods, batches: BatchStream) -> Dict:
    """Everything a bit-identical resume needs, after `fit_state.iterations` steps."""
    return {"format": STATE_FORMAT, "key": key, "run_id": run_id, "iteration": fit_state.iterations,
            "student": student.state_dict(), "optimizer": optimizer.state_dict(),
            "methods": [m.state_dict() for m in methods],
            "method_optimizers": [m.own_optimizer().state_dict() if m.own_optimizer() is not None else None
                                  for m in methods],
            "generators": [g.get_state() for g in _generators(methods)],
            "rng": rng_state(), "data": batches.state(),
            "fit": {"iterations": fit_state.iterations, "history": fit_state.history,
                    "last_terms": fit_state.last_terms, "train_time_s": fit_state.train_time_s}}


def restore(state: Dict, student, optimizer, methods, batches: BatchStream) -> Dict:
    """Put a run built from scratch into `state`; returns the fit's part. The data stream is replayed
    first (it draws from the global RNG), then every RNG is set."""
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    if len(state["methods"]) != len(methods):
        raise ValueError(f"the state has {len(state['methods'])} methods, the run {len(methods)}")
    for m, s, opt in zip(methods, state["methods"], state["method_optimizers"]):
        m.load_state_dict(s)
        if (opt is None) != (m.own_optimizer() is None):
            raise ValueError(f"method {m.name}: optimiser in the state and in the run differ")
        if opt is not None:
            m.own_optimizer().load_state_dict(opt)
    batches.restore(state["data"])
    for g, s in zip(_generators(methods), state["generators"]):
        g.set_state(s)
    set_rng_state(state["rng"])
    return state["fit"]


class Checkpoints:
    """The checkpoint folder of one run: resume lookup, periodic states, the final student."""

    def __init__(self, cfg: dict, key: str, run_id: str, keep_last: int = 1):
        from filelock import FileLock

        self.cfg, self.key, self.run_id, self.keep_last = cfg, key, run_id, max(1, keep_last)
        self.dir = run_dir(cfg, run_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(self.dir / "run.lock"))
        self.lock.acquire(timeout=0)
        self.adopted: List[Tuple[Path, Any]] = []  # other folders whose state this run took over

    @classmethod
    def open(cls, cfg: dict, key: str, run_id: Optional[str], new_id: str, keep_last: int = 1,
             resume: bool = True) -> Tuple["Checkpoints", Optional[Dict]]:
        """The run's checkpoints and the state to resume from (None: from scratch). Without an
        explicit `run_id` a resumed run keeps the run id of the state it resumes."""
        from filelock import FileLock, Timeout

        root = Path(cfg["paths"]["results"]) / "checkpoints"
        found = []
        for meta_path in root.glob("*/last.json") if root.is_dir() and resume else []:
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("key") == key:
                found.append((meta.get("run_id") != run_id, -int(meta.get("iteration") or 0), str(meta_path.parent),
                              meta.get("run_id")))
        for _, _, folder, owner in sorted(found):
            lock = FileLock(str(Path(folder) / "run.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # a live run (the same computation) holds it
            state = read_state(Path(folder), key)
            if state is None:
                lock.release()
                continue
            chosen = run_id or owner or new_id
            if run_dir(cfg, chosen) == Path(folder):
                lock.release()  # re-taken by the constructor
                ck = cls(cfg, key, chosen, keep_last)
            else:
                ck = cls(cfg, key, chosen, keep_last)
                ck.adopted.append((Path(folder), lock))
            return ck, state
        return cls(cfg, key, run_id or new_id, keep_last), None

    def save_state(self, state: Dict) -> None:
        last = self.dir / "last.pt"
        meta_path = self.dir / "last.json"
        if self.keep_last > 1 and last.is_file() and meta_path.is_file():
            previous = json.loads(meta_path.read_text()).get("iteration")
            os.replace(last, self.dir / f"iter_{int(previous):09d}.pt")
            for old in sorted(self.dir.glob("iter_*.pt"))[:-(self.keep_last - 1)]:
                old.unlink()
        write_atomic(state, last)
        _write_json({"key": self.key, "run_id": self.run_id, "iteration": state["iteration"]}, meta_path)

    def save_final(self, model: torch.nn.Module, config_hash: str) -> Path:
        return save_final(self.cfg, self.run_id, model, config_hash)

    def close(self, ended: bool) -> None:
        """Release the run's folders; when the run ended (not interrupted) its states are deleted."""
        folders = [(self.dir, self.lock), *self.adopted] if ended else [(self.dir, self.lock)]
        for folder, lock in folders:
            if ended:
                for f in [folder / "last.json", folder / "last.pt", *folder.glob("iter_*.pt")]:
                    f.unlink(missing_ok=True)
            lock.release()
            if ended:
                (folder / "run.lock").unlink(missing_ok=True)
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        if not ended:
            for _, lock in self.adopted:
                lock.release()


def read_state(folder: Path, key: str) -> Optional[Dict]:
    """The newest readable state in `folder` for `key` (last.pt, then iter_*.pt), else None with a warning."""
    for path in [folder / "last.pt", *sorted(folder.glob("iter_*.pt"), reverse=True)]:
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a state that cannot be read is skipped, never fatal
            warn(f"checkpoint {path} cannot be read ({type(e).__name__}); ignored")
            continue
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("key") != key:
            warn(f"checkpoint {path} is not a training state of this run; ignored")
            continue
        return state
    return None


def warn(message: str) -> None:
    print(f"[harness] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ Ctrl-C
class Interrupt:
    """`requested` turns true on the first SIGINT or SIGTERM (`signum` says which); a second one
    interrupts at once."""
    requested = False
    signum: int = 0


@contextmanager
def deferred_interrupt():
    """While training: the first SIGINT asks the loop to stop after the iteration under way (the
    caller then saves the state); only in the main thread (Ray workers keep their own handling)."""
    flag = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        prev = signal.getsignal(sig)
        if prev is None:  # installed from outside Python: put Python's default back afterwards
            prev = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        previous[sig] = prev

    def on_signal(signum, frame):
        flag.requested, flag.signum = True, signum
        for sig, prev in previous.items():
            signal.signal(sig, prev)
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        warn(f"interrupted ({name}): saving the training state after this iteration (again to stop at once)")

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        yield flag
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
