"""Distillation methods: one file each, registered by name (the `+method=NAME` of the CLI).

The registry also answers what a setting of a registered method is (`kind_of`, `path_kind`) and
which settings of the selected methods are temperatures or loss weights (`paths_of_kind`, what the
protocol's `$temperatures` / `$weights` expand to), from each Config's field metadata
(`harness.params`).

Methods from outside the package register with `register(MethodClass)` (see `harness.plugins`: entry
points in the group `harness.methods`, or the config's `plugins:` list); `+method=NAME` then works
as for a built-in, its defaults taken from the Config (a yaml is optional).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional

from harness.methods.afdcd import AfDCD
from harness.methods.base import Batch, Method, MethodContext, Progress
from harness.methods.brd import BRD
from harness.methods.cirkd import CIRKD
from harness.methods.cwd import ChannelWiseKD
from harness.methods.dist import DIST
from harness.methods.gskd import GSKD
from harness.methods.heteroakd import HeteroAKD
from harness.methods.ifvd import IFVD
from harness.methods.kd import PixelKD
from harness.params import KINDS, meta_of
from harness.methods.skd import SKD
from harness.errors import ConfigError

# One line per method; keep the list sorted by file name.
_ALL = (
    AfDCD,
    BRD,
    CIRKD,
    ChannelWiseKD,
    DIST,
    GSKD,
    HeteroAKD,
    IFVD,
    PixelKD,
    SKD,
)
METHODS: Dict[str, type] = {m.name: m for m in _ALL}
_SOURCES: Dict[str, str] = {m.name: f"built-in ({m.__module__})" for m in _ALL}


def register(cls: type, source: Optional[str] = None) -> type:
    """Add a method class (a `Method` subclass with `name` and a `Config` dataclass) to the registry,
    so `+method=<cls.name>` selects it; usable as a class decorator. A name that is taken is a
    ConfigError naming both sources; registering the same class again does nothing."""
    from harness.plugins import source_of

    name = getattr(cls, "name", None)
    if not isinstance(cls, type) or not issubclass(cls, Method):
        raise ConfigError(f"harness.methods.register needs a subclass of harness.methods.Method, got {cls!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"method class {cls.__qualname__} needs a class attribute `name` (an identifier, "
                          f"the `+method=` name), got {name!r}")
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise ConfigError(f"method '{name}' ({cls.__qualname__}) needs a `Config` dataclass (its settings, "
                          f"declared with harness.params.param)")
    source = source or source_of(cls)
    old = METHODS.get(name)
    if old is not None:
        if old is cls or (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__):
            return cls
        raise ConfigError(f"method '{name}' is registered twice: by {_SOURCES[name]} and by {source}; "
                          f"rename one (its class attribute `name`)")
    METHODS[name] = cls
    _SOURCES[name] = source
    _store_defaults(name, cls.Config)
    return cls


def _store_defaults(name: str, config: type) -> None:
    """`+method=NAME` without a yaml: Hydra's ConfigStore holds `{NAME: <the Config's defaults>}`."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.structured(config), resolve=False)
    defaults = {k: v for k, v in values.items() if v != "???"}
    ConfigStore.instance().store(group="method", name=name, node={name: defaults})


def source(name: str) -> str:
    """Where method `name` was registered from (built-in, entry point or plugins entry)."""
    return _SOURCES[name]


def _plugins() -> None:
    from harness.plugins import load_entry_points

    load_entry_points(["harness.methods"])


def _register_entry_point(name: str, cls: type, source: str) -> None:  # noqa: ARG001 - the class names itself
    register(cls, source=source)


def build_methods(method_cfg: Dict[str, dict], ctx: MethodContext) -> List[Method]:
    """One module per selected method, in a stable (sorted) order."""
    _plugins()
    unknown = sorted(set(method_cfg) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(sorted(METHODS))} (a plug-in method "
                         f"must be loaded first: harness.plugins.load(cfg['plugins']))")
    return [METHODS[name](method_cfg[name], ctx) for name in sorted(method_cfg)]



def config_of(method: str) -> type:
    _plugins()
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'. Valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[method].Config


def kind_of(method: str, key: str) -> str:
    """`temperature`, `weight`, `aux_weight` or `structural` for `method.<method>.<key>`."""
    for f in dataclasses.fields(config_of(method)):
        if f.name == key:
            return meta_of(f).kind
    raise KeyError(f"method '{method}' has no setting '{key}'")


def path_kind(path: str) -> Optional[str]:
    """kind_of for a config path `method.<name>.<key>`; None for a path outside a method."""
    parts = path.split(".")
    if len(parts) != 3 or parts[0] != "method":
        return None
    return kind_of(parts[1], parts[2])


def paths_of_kind(method_section: Mapping[str, Mapping[str, Any]], kind: str) -> Dict[str, float]:
    """{config path: value} of the selected methods' settings of one kind (`temperature`, `weight`,
    ...), methods in sorted order, fields in declaration order. A temperature whose gate weights are
    all 0 (its term off) is left out."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got '{kind}' (the protocol maps its placeholders)")
    out: Dict[str, float] = {}
    for method, values in sorted((method_section or {}).items()):
        for f in dataclasses.fields(config_of(method)):
            m = meta_of(f)
            if m.kind != kind or f.name not in values:
                continue
            if m.gate and all(float(values.get(g, 0) or 0) == 0 for g in m.gate):
                continue
            out[f"method.{method}.{f.name}"] = float(values[f.name])
    return out


__all__ = ["Batch", "Method", "MethodContext", "Progress", "METHODS", "build_methods", "config_of", "kind_of",
           "path_kind", "paths_of_kind", "register", "source"]


from harness import plugins as _plugin_loader  # noqa: E402 - after register(): the loader calls it

_plugin_loader.set_registrar("harness.methods", _register_entry_point)
