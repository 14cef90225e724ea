"""Datasets: one registry, one factory.

``build_dataset(cfg, split, augment, cache_dir)`` looks ``cfg["name"]`` up in :data:`DATASETS` and
returns a ``torch.utils.data.Dataset`` whose items are ``(float32 3 x H x W image, int64 H x W
mask)``, with attributes ``num_classes``, ``ignore_index``, ``class_names``, ``palette``, ``split``
and a ``class_frequencies()`` method.  Every dataset class is built with the same call,
``cls(cfg, split, augment=..., cache_dir=...)``, and lists its ``SPLITS`` (and, when fixed, its
``CLASS_NAMES``).

A dataset yaml with ``type: folder`` needs no Python: :class:`~harness.data.folder.ConfigFolder` reads
``img_dir`` / ``ann_dir`` / ``class_names`` / ``palette`` from it.  A dataset class from outside the
package registers with :func:`register` (``harness.plugins``: entry points of the group
``harness.datasets`` or the config's ``plugins:`` list); ``dataset=NAME`` then selects it.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from .ade20k import ADE20K
from .camvid import CamVid
from .cityscapes import Cityscapes
from .folder import ConfigFolder
from .synthetic import SyntheticStreets
from .transforms import SegTransform
from .voc import VOC

DATASETS: dict[str, type] = {
    "synthetic": SyntheticStreets,
    "cityscapes": Cityscapes,
    "voc": VOC,
    "ade20k": ADE20K,
    "camvid": CamVid,
    "folder": ConfigFolder,  # `type: folder` in a dataset yaml (any name)
}
CONFIGS: dict[str, type] = {}  # plug-in datasets' Config dataclasses (the built-ins' live in harness.config)
_SOURCES: dict[str, str] = {name: f"built-in ({cls.__module__})" for name, cls in DATASETS.items()}


def register(name: str, cls: type, config: type | None = None, source: str | None = None) -> type:
    """Add a dataset class to the registry so ``dataset=NAME`` selects it.

    ``cls(cfg, split, augment=..., cache_dir=...)`` must return the items described above; ``config``
    (default ``cls.Config``) is the dataclass its yaml section is validated against (it must have a
    ``name`` field; fields without a default must be set by the yaml or the command line).  A name
    that is taken is a ConfigError naming both sources; registering the same class again does nothing.
    """
    import dataclasses

    from harness.errors import ConfigError
    from harness.plugins import source_of

    config = config if config is not None else getattr(cls, "Config", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"a dataset name must be an identifier (the `dataset=` option), got {name!r}")
    if not isinstance(cls, type):
        raise ConfigError(f"harness.data.register('{name}', ...) needs a dataset class, got {cls!r}")
    if not dataclasses.is_dataclass(config) or "name" not in {f.name for f in dataclasses.fields(config)}:
        raise ConfigError(f"dataset '{name}' ({cls.__qualname__}) needs a Config dataclass with a `name` field "
                          f"(pass it to harness.data.register or set {cls.__qualname__}.Config)")
    source = source or source_of(cls)
    old = DATASETS.get(name)
    if old is not None:
        if old is cls or (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__):
            return cls
        raise ConfigError(f"dataset '{name}' is registered twice: by {_SOURCES[name]} and by {source}; rename one")
    DATASETS[name] = cls
    CONFIGS[name] = config
    _SOURCES[name] = source
    _store_defaults(name, config)
    return cls


def _store_defaults(name: str, config: type) -> None:
    """``dataset=NAME`` without a yaml: Hydra's ConfigStore holds the Config's defaults."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.structured(config), resolve=False)
    node = {k: v for k, v in values.items() if v != "???"}
    ConfigStore.instance().store(group="dataset", name=name, node={**node, "name": name})


def kind_of(cfg: dict) -> str:
    """The registry key of a dataset section: ``type`` (``folder``) when given, else ``name``."""
    return str(cfg.get("type") or cfg.get("name"))


def _plugins() -> None:
    from harness.plugins import load_entry_points

    load_entry_points(["harness.datasets"])


def _register_entry_point(name: str, cls: type, source: str) -> None:
    register(name, cls, getattr(cls, "Config", None), source=source)


def build_dataset(cfg: dict, split: str, augment: dict | None = None, cache_dir: str | None = None) -> Dataset:
    """The ``split`` of the dataset described by ``cfg`` (the plain dict of the dataset config group).

    ``augment`` is ``None`` for evaluation (normalise only) or ``{"crop_size": [h, w],
    "scale_range": [lo, hi], "flip": bool}`` for training.  Raises ``ValueError`` for an unknown
    name or split, or when ``cfg``'s ``num_classes`` / ``class_names`` disagree with the dataset.
    """
    _plugins()
    name = kind_of(cfg)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    cls = DATASETS[name]
    splits = tuple(getattr(cls, "SPLITS", ()))
    if splits and split not in splits:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; valid: {', '.join(splits)}")
    check_config(cfg)
    return cls(cfg, split, augment=augment, cache_dir=cache_dir)


def check_config(cfg: dict, layout: bool = True) -> None:
    """Raise ValueError when a dataset config cannot describe its dataset (checked before any work).

    Datasets read from disk also check their values and that ``root`` has the expected layout
    (``ConfigError``, a ValueError, naming the expected sub-folders).
    """
    _plugins()
    name = kind_of(cfg)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    _check_classes(name, cfg, getattr(DATASETS[name], "CLASS_NAMES", None))
    own_check = getattr(DATASETS[name], "check_config", None)
    if own_check is not None and layout:  # layout=False: the files need not be on this machine (plans)
        own_check(cfg)


def _check_classes(name: str, cfg: dict, class_names) -> None:
    if class_names is None:
        return
    expected = list(class_names)
    if "num_classes" in cfg and int(cfg["num_classes"]) != len(expected):
        raise ValueError(
            f"dataset {name!r}: cfg num_classes={cfg['num_classes']} but the dataset has {len(expected)} classes "
            f"({', '.join(expected)})"
        )
    if "class_names" in cfg and list(cfg["class_names"]) != expected:
        raise ValueError(
            f"dataset {name!r}: cfg class_names {list(cfg['class_names'])} do not match the dataset's {expected}"
        )


__all__ = ["ADE20K", "CONFIGS", "DATASETS", "VOC", "CamVid", "Cityscapes", "ConfigFolder", "SegTransform",
           "SyntheticStreets", "build_dataset", "check_config", "kind_of", "register"]


from harness import plugins as _plugin_loader  # noqa: E402 - after register(): the loader calls it

_plugin_loader.set_registrar("harness.datasets", _register_entry_point)
