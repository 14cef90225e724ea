"""Declared settings: each method's `Config` dataclass (and each section schema of `harness.config`)
is the single source of its settings.

A field is declared with `param(default, kind=..., doc=..., low=..., high=..., choices=...)`; its
metadata says what the setting is:

* `kind`: `temperature` (searched by the protocol's `$temperatures`), `weight` (a loss weight the
  protocol's `$weights` tunes), `aux_weight` (weights a training extra or an auxiliary copy of a
  term: a boundary head's or projector's BCE, the aux-head copy, a discriminator's objective; not
  tuned) or `structural` (everything else).
* a range (`low` / `high`, each end closed unless `low_open` / `high_open`) and / or `choices` (for a
  list field: the values its items may take), checked at config load by `check_section` and again
  when a method is built (unit use);
* for a temperature, `gate`: the weight field(s) that switch its term off; while all of them are 0
  the temperature is not searched (e.g. cwd `feature_tau` while `feature_weight` is 0).

Checks that relate fields to each other, with no model needed, are a classmethod of the Config,
`cross_check(values, prefix) -> message or None` (e.g. brd `temperature_cap >= tau`). Checks that
need the models' channels stay in the method's `__init__`.

This module imports no torch and knows no method: the registry (`harness.methods`) answers
questions about the registered methods (`kind_of`, `path_kind`, `paths_of_kind`), and
`python -m harness.methods.docs --markdown [METHOD ...]` prints the parameter tables of
`docs/methods.md` (generated from the metadata; a test checks that the docs hold exactly them).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from harness.errors import ConfigError

KINDS = ("temperature", "weight", "aux_weight", "structural")
# the features every segmenter provides (harness.models.SegOutput.features)
FEATURES = ("stage1", "stage2", "stage3", "stage4", "head")
_META = "harness.param"


@dataclass(frozen=True)
class Param:
    """The metadata of one setting."""
    kind: str = "structural"
    doc: str = ""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[Tuple[Any, ...]] = None
    gate: Tuple[str, ...] = ()
    why: str = ""  # appended to a range message, e.g. "tau only grows"

    def range_text(self) -> str:
        """'positive', '>= 0', 'in [0, 1)', ... ('' without a range)."""
        lo, hi = self.low, self.high
        if lo is None and hi is None:
            return ""
        if hi is None:
            if lo == 0 and self.low_open:
                return "positive"
            return f"{'>' if self.low_open else '>='} {lo}"
        if lo is None:
            return f"{'<' if self.high_open else '<='} {hi}"
        return f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"

    def admits(self, value: Any) -> bool:
        """Whether a number lies in the range (True without one)."""
        v = float(value)
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return True


class Field(NamedTuple):
    name: str
    default: Any
    kind: str
    doc: str
    range: str                       # Param.range_text()
    choices: Optional[Tuple[Any, ...]]
    gate: Tuple[str, ...]


def param(default: Any = dataclasses.MISSING, *, kind: str = "structural", doc: str = "",
          low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
          high_open: bool = False, choices: Optional[Sequence[Any]] = None,
          gate: Union[str, Sequence[str], None] = None, why: str = ""):
    """A Config field with its metadata; a list default is given as a list (copied per instance)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got '{kind}'")
    if gate and kind != "temperature":
        raise ValueError("only a temperature has a gate")
    meta = Param(kind=kind, doc=doc, low=low, high=high, low_open=low_open, high_open=high_open,
                 choices=tuple(choices) if choices is not None else None,
                 gate=(gate,) if isinstance(gate, str) else tuple(gate or ()), why=why)
    if isinstance(default, list):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata={_META: meta})
    return dataclasses.field(default=default, metadata={_META: meta})


def meta_of(f: dataclasses.Field) -> Param:
    return f.metadata.get(_META, Param())


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def defaults_of(config: type) -> Dict[str, Any]:
    """{name: default} in field order."""
    return {f.name: _default(f) for f in dataclasses.fields(config)}


def fields_of(config: type) -> List[Field]:
    """(name, default, kind, doc, range, choices, gate) of every field, in declaration order."""
    out = []
    for f in dataclasses.fields(config):
        m = meta_of(f)
        out.append(Field(f.name, _default(f), m.kind, m.doc, m.range_text(), m.choices, m.gate))
    return out


# ----------------------------------------------------------------------------------- checks
def _fmt_choices(choices: Sequence[Any]) -> str:
    return ", ".join(str(c) for c in choices)


def _check_value(path: str, m: Param, value: Any) -> Optional[str]:
    if value is None:
        return None  # the type (Optional or not) is the schema's business
    if m.choices is not None:
        if isinstance(value, (list, tuple)):
            bad = [v for v in value if v not in m.choices]
            if bad:
                return f"'{path}' items must be among {_fmt_choices(m.choices)}, got {bad}"
        elif value not in m.choices:
            return f"'{path}' must be one of {_fmt_choices(m.choices)}, got '{value}'"
    if m.range_text():
        try:
            ok = m.admits(value)
        except (TypeError, ValueError):
            return f"'{path}' must be a number {m.range_text()}, got {value!r}"
        if not ok:
            why = f" ({m.why})" if m.why else ""
            return f"'{path}' must be {m.range_text()}{why}, got {value}"
    return None


def check_section(method: str, config: type, values: Mapping[str, Any]) -> None:
    """Raise ConfigError (one message) unless `values` (a whole `method.<name>` section, or a part of
    one: missing keys take their defaults) satisfy the Config's metadata and its `cross_check`."""
    prefix = f"method.{method}"
    known = [f.name for f in dataclasses.fields(config)]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}.{unknown[0]}'. Valid keys in '{prefix}': "
                          f"{', '.join(known)}")
    full = {**defaults_of(config), **dict(values)}
    for f in dataclasses.fields(config):
        message = _check_value(f"{prefix}.{f.name}", meta_of(f), full[f.name])
        if message:
            raise ConfigError(message)
    cross = getattr(config, "cross_check", None)
    message = cross(full, prefix) if cross is not None else None
    if message:
        raise ConfigError(message)


def check_schema(prefix: str, schema: type, values: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first value of a validated config section that its schema field's
    metadata refuses (range, choices); nested schema sections are checked too."""
    for f in dataclasses.fields(schema):
        if f.name not in values:
            continue
        path, value = f"{prefix}.{f.name}" if prefix else f.name, values[f.name]
        nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(nested) and isinstance(value, Mapping):
            check_schema(path, type(nested), value)
            continue
        message = _check_value(path, meta_of(f), value)
        if message:
            raise ConfigError(message)


def check_finite(values: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first NaN or infinite number anywhere in a config (comparisons with
    NaN are all false, so a range check alone lets it through)."""
    if isinstance(values, Mapping):
        for key, value in values.items():
            check_finite(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            check_finite(value, f"{prefix}[{i}]")
    elif isinstance(values, float) and not math.isfinite(values):
        raise ConfigError(f"'{prefix}' must be a finite number, got {values}")


# ------------------------------------------------------------------------------------- docs
def _md_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return repr(value)


def markdown_table(config: type) -> str:
    """One row per field: key, default, kind, range / choices, doc."""
    rows = ["| key | default | kind | range / choices | meaning |", "|---|---|---|---|---|"]
    for f in fields_of(config):
        limits = []
        if f.choices is not None:
            limits.append(", ".join(f"`{c}`" for c in f.choices))
        if f.range:
            limits.append(f.range)
        if f.gate:
            limits.append("off while " + " and ".join(f"`{g}`" for g in f.gate) + " = 0")
        rows.append(f"| `{f.name}` | {_md_value(f.default)} | {f.kind} | {'; '.join(limits) or '—'} | {f.doc} |")
    return "\n".join(rows)
