"""Methods and datasets from outside the package: entry points and the config's `plugins:` list.

Two ways in, both loaded before the config is validated (`harness.config.load_config`) and again at
the start of every sweep trial (`harness.sweep.trial.trainable`: Ray runs trials in other processes):

* **Entry points** of an installed distribution, read with `importlib.metadata`:

      [project.entry-points."harness.methods"]
      prob_mse = "my_kd.prob_mse:ProbMSE"          # a Method class (registered) or a module that registers
      [project.entry-points."harness.datasets"]
      my_streets = "my_kd.streets:Streets"          # a dataset class with a `Config` dataclass

* **`plugins: [...]`** in the config (mmsegmentation's `custom_imports`), e.g.
  `python -m harness train plugins=[~/kd/prob_mse.py] +method=prob_mse`. Each entry is an importable
  module name (`my_kd.prob_mse`), a path to a `.py` file, or a path to a folder: a package folder
  (`__init__.py`) is imported as that package, any other folder has its `*.py` files imported
  (sorted), and its config-group sub-folders (`dataset/`, `method/`, `student/`, ...) join Hydra's
  search path, so `dataset=NAME` finds `<folder>/dataset/NAME.yaml` (a config-only dataset needs no
  Python at all, see docs/add_a_dataset.md). Relative paths are taken from the working directory
  of the command and stored absolute, so trials find them wherever they run.

A plug-in registers with `harness.methods.register(MethodClass)` or
`harness.data.register(name, DatasetClass, ConfigClass)`; a name that is already registered is a
`ConfigError` naming both sources. Importing the same entry twice in one process does nothing.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

from harness.errors import ConfigError

ENTRY_POINT_GROUPS = ("harness.methods", "harness.datasets")
CONFIG_GROUPS = ("dataset", "method", "student", "teacher", "optim", "budget", "recipe")

_loaded: dict = {}            # resolved entry -> how it was loaded (import once per process)
_entry_points_loaded: set = set()   # entry-point groups already imported
# group -> register(name, obj, source): set by the registries themselves (harness.methods, harness.data)
# when they are imported, so this module never imports them (no import loop)
_registrars: dict = {}


def set_registrar(group: str, register) -> None:
    """Called by a registry on import: how an entry point's class of `group` is registered."""
    if group not in ENTRY_POINT_GROUPS:
        raise ValueError(f"unknown entry-point group {group!r}; valid: {', '.join(ENTRY_POINT_GROUPS)}")
    _registrars[group] = register
_current: List[str] = []      # the plug-in being imported (register() names it as the source)


def current_source() -> Optional[str]:
    """What is being loaded right now (for the registries' duplicate-name messages)."""
    return _current[-1] if _current else None


@contextlib.contextmanager
def _loading(source: str) -> Iterator[None]:
    _current.append(source)
    try:
        yield
    finally:
        _current.pop()


# ------------------------------------------------------------------------------- entry points
def load_entry_points(groups: Optional[Iterable[str]] = None) -> None:
    """Import the entry points of `groups` (default: every group whose registry is imported) once per
    process. A group's registry (harness.methods / harness.data) calls this itself when first used."""
    for group in (ENTRY_POINT_GROUPS if groups is None else groups):
        if group in _entry_points_loaded or group not in _registrars:
            continue
        _entry_points_loaded.add(group)
        for ep in sorted(metadata.entry_points(group=group), key=lambda e: e.name):
            dist = getattr(getattr(ep, "dist", None), "name", None)
            source = f"entry point '{ep.name} = {ep.value}' ({group}{', ' + dist if dist else ''})"
            with _loading(source):
                try:
                    obj = ep.load()
                except Exception as e:  # noqa: BLE001 - a broken plug-in is the user's to fix: say which
                    raise ConfigError(f"{source} failed to load: {type(e).__name__}: {e}") from None
                _register_object(group, ep.name, obj, source)


def _register_object(group: str, name: str, obj, source: str) -> None:
    """An entry point may name a class (registered here) or a module (which registered itself)."""
    if not isinstance(obj, type):
        return
    _registrars[group](name, obj, source)


# -------------------------------------------------------------------------- the plugins list
def is_path(entry: str) -> bool:
    """A file or folder (contains a '/', ends with .py, or exists here), else a module name."""
    return ("/" in entry or os.sep in entry or entry.endswith(".py") or entry.startswith(("~", "."))
            or Path(entry).exists())


def resolve(entries: Optional[Iterable[str]]) -> List[str]:
    """The entries with paths made absolute (module names unchanged)."""
    out = []
    for entry in entries or []:
        entry = str(entry).strip()
        out.append(str(Path(entry).expanduser().resolve()) if is_path(entry) else entry)
    return out


def search_path(entries: Optional[Iterable[str]]) -> List[str]:
    """Folders among the entries that hold config groups (`<folder>/dataset/*.yaml`, ...)."""
    out = []
    for entry in resolve(entries):
        folder = Path(entry)
        if is_path(entry) and folder.is_dir() and any((folder / g).is_dir() for g in CONFIG_GROUPS):
            out.append(str(folder))
    return out


def load(entries: Optional[Iterable[str]] = None) -> List[str]:
    """Load the entry points and the listed plug-ins (each once per process); return the resolved list."""
    load_entry_points()
    resolved = resolve(entries)
    for entry in resolved:
        if entry in _loaded:
            continue
        source = f"plugins entry '{entry}'"
        with _loading(source):
            _loaded[entry] = _load_path(entry) if is_path(entry) else _load_module(entry)
    return resolved


def _load_module(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise ConfigError(
                f"plugins entry '{name}': no module named '{e.name}'. Give an importable module name "
                f"(installed, or its folder on PYTHONPATH), a path to a .py file, or a folder "
                f"(paths contain a '/', e.g. plugins=[./{name.replace('.', '/')}.py])") from None
        raise ConfigError(f"plugins entry '{name}' failed to import: {type(e).__name__}: {e}") from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"plugins entry '{name}' failed to import: {type(e).__name__}: {e}") from None
    _export_cwd(module, name)
    return getattr(module, "__file__", None) or name


def _export_cwd(module, name: str) -> None:
    """A module found only through the working directory: put that on PYTHONPATH for Ray's workers."""
    file = getattr(module, "__file__", None)
    if not file:
        return
    root = Path(file).resolve().parents[name.count(".") + (1 if Path(file).name == "__init__.py" else 0)]
    if root == Path.cwd().resolve():
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if str(root) not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *[p for p in paths if p]])


def _load_path(entry: str) -> str:
    path = Path(entry)
    if not path.exists():
        raise ConfigError(f"plugins entry '{entry}': no such file or folder. Give a .py file, a folder, or an "
                          f"importable module name (no '/')")
    if path.is_file():
        if path.suffix != ".py":
            raise ConfigError(f"plugins entry '{entry}' is a file but not a .py file")
        _import_file(path, path.stem)
    elif (path / "__init__.py").is_file():
        _import_file(path / "__init__.py", path.name, package=path)
    else:
        for file in sorted(path.glob("*.py")):
            _import_file(file, file.stem)
    return entry


def _import_file(file: Path, name: str, package: Optional[Path] = None) -> None:
    if name in sys.modules:  # never shadow another module: a private name instead
        existing = getattr(sys.modules[name], "__file__", None)
        if existing and Path(existing).resolve() == file.resolve():
            return
        name = f"harness_plugin_{abs(hash(str(file))):x}_{name}"
    spec = importlib.util.spec_from_file_location(
        name, file, submodule_search_locations=[str(package)] if package else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        del sys.modules[name]
        raise
    except Exception as e:  # noqa: BLE001
        del sys.modules[name]
        raise ConfigError(f"plugins entry '{file}' failed to import: {type(e).__name__}: {e}") from None


def source_of(obj) -> str:
    """Where a class comes from: the plug-in being loaded, else its file."""
    import inspect

    try:
        file = inspect.getsourcefile(obj) or obj.__module__
    except TypeError:
        file = obj.__module__
    current = current_source()
    return f"{current} ({obj.__module__}.{obj.__qualname__} in {file})" if current else \
        f"{obj.__module__}.{obj.__qualname__} in {file}"


def from_overrides(overrides: Iterable[str], conf_dir: Path) -> List[str]:
    """The `plugins` list a command will compose: `plugins=[...]` from the overrides, else config.yaml's."""
    from omegaconf import OmegaConf

    value = None
    for ov in overrides:
        key, _, rest = ov.partition("=")
        if key.lstrip("+") == "plugins":
            value = rest
    if value is None:
        top = OmegaConf.load(conf_dir / "config.yaml")
        listed = top.get("plugins") if hasattr(top, "get") else None
        return [str(v) for v in (listed or [])]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([f"plugins={value}"])[0].value()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"plugins={value}: write a list, e.g. plugins=[my_kd.prob_mse,./streets/] ({e})") from None
    if parsed is None:
        return []
    return [str(v) for v in (parsed if isinstance(parsed, list) else [parsed])]
