"""The row filters of every report command, parsed once from the command line.

``python -m harness leaderboard dataset=synthetic student=... teacher=... budget=quick +method=kd
test=permutation paths.results=...``: ``dataset=``, ``student=``, ``teacher=``, ``budget=`` and
``+method=`` (repeatable, ``+method=[cwd,gskd]`` is the combination ``cwd+gskd``) select rows by name;
``test=`` chooses the leaderboard's test; everything else is a config override. A filter selects
which rows are shown, never what a number is (a p-value is the same with or without a filter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from harness.report.blocks import method_label

TESTS = ("t", "permutation")
RETIRED_TESTS = {"welch": "test=t (paired t on the common seeds; Welch when the arms share fewer than two)",
                 "mann-whitney": "test=permutation (exact permutation test of the same comparison; Mann-Whitney "
                                 "ignored the pairing of seeds)"}
FILTER_KEYS = ("dataset", "student", "teacher", "budget", "method", "test")


@dataclass(frozen=True)
class Filters:
    """The filters as given, in command-line order (``method``: the list of method labels)."""

    given: Tuple[Tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, overrides: Sequence[str]) -> Tuple["Filters", List[str]]:
        """(filters, config overrides such as paths.results=... or store.url=...)."""
        given: Dict[str, Any] = {}
        rest: List[str] = []
        for ov in overrides:
            key, _, value = ov.partition("=")
            name = key.lstrip("+~")
            if name in FILTER_KEYS and value:
                if name == "method":
                    given.setdefault("method", []).append(method_label(value.strip("[]")))
                else:
                    given[name] = value
            else:
                rest.append(ov)
        if "test" in given and given["test"] not in TESTS:
            from harness.errors import ConfigError

            retired = RETIRED_TESTS.get(given["test"])
            raise ConfigError(f"unknown test '{given['test']}'. Valid: {', '.join(TESTS)}"
                              + (f"; '{given['test']}' was replaced by {retired}" if retired else ""))
        return cls(tuple((k, tuple(v) if k == "method" else v) for k, v in given.items())), rest

    @classmethod
    def of(cls, **values: Any) -> "Filters":
        """Filters from keyword values (``method=['kd']``); None values are left out."""
        given = []
        for k, v in values.items():
            if v is None:
                continue
            if k not in FILTER_KEYS:
                raise ValueError(f"unknown filter '{k}'; valid: {', '.join(FILTER_KEYS)}")
            given.append((k, tuple(method_label(m) for m in v) if k == "method" else v))
        return cls(tuple(given))

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.given).get(key, default)

    @property
    def test(self) -> str:
        return self.get("test", "t")

    @property
    def methods(self) -> Optional[List[str]]:
        methods = self.get("method")
        return list(methods) if methods else None

    def _names(self) -> Dict[str, Any]:
        return {k: v for k, v in self.given if k not in ("method", "test")}

    def selection(self) -> Dict[str, Any]:
        """The keyword arguments of `load_blocks` (``methods`` last, only when given)."""
        out = self._names()
        if self.methods:
            out["methods"] = self.methods
        return out

    def shown(self) -> str:
        """'dataset=..., method=[...]' of the row filters (no test), or 'none'."""
        return ", ".join(f"{k}={v}" for k, v in {**self._names(), "method": self.methods}.items() if v) or "none"

    def shown_all(self) -> str:
        """Every filter as given, test included, or 'none'."""
        return ", ".join(f"{k}={list(v) if k == 'method' else v}" for k, v in self.given if v) or "none"
