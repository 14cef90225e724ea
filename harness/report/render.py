"""Rendering: cells (percent, p-values, markers), Markdown and LaTeX tables, and writing the files.

Every table of the report layer is a text built from these helpers; `publish` writes its files
(``<out_dir>/<name>.<ext>``), echoes the Markdown and says on stderr why a table is empty.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from harness.report.blocks import MISSING


def pct(value: Optional[float], digits: int = 2) -> Optional[float]:
    """A fraction as percentage points, rounded for display; None stays None."""
    return None if value is None else round(100.0 * value, digits)


def fmt_p(p: Optional[float]) -> str:
    if p is None:
        return MISSING
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def stars(p: Optional[float]) -> str:
    """Significance marker of a (Holm-adjusted) p-value: * < 0.05, ** < 0.01, *** < 0.001."""
    if p is None:
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"\textless{}", ">": r"\textgreater{}"}


def tex(text: Any) -> str:
    """Escape LaTeX's special characters in plain text."""
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))


def tex_title(text: Any) -> str:
    """`tex` plus the arrow of 'student <- teacher'."""
    return tex(text).replace(r"\textless{}-", r"$\leftarrow$")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> List[str]:
    """A pipe table padded to column width, so it also reads in a terminal."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    align = (align or "l" * len(header)).ljust(len(header), "l")

    def line(r):
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align)) + "|"
    return [line(cells[0]), rule] + [line(r) for r in cells[1:]]


def publish(out_dir: Any, name: str, outputs: Dict[str, Any], quiet: bool, empty: str) -> Dict[str, Path]:
    """Write `<out_dir>/<name>.<ext>` for each output (a text, or a function writing to the path),
    echo the Markdown and the paths unless `quiet`, and say why a table is empty on stderr."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{name}.{ext}" for ext in outputs}
    for ext, content in outputs.items():  # each file appears whole or not at all (a kill mid-write)
        tmp = out / f".{name}.{os.getpid()}.tmp.{ext}"
        if callable(content):
            content(tmp)
        else:
            tmp.write_text(content)
        os.replace(tmp, paths[ext])
    if not quiet:
        print(outputs["md"])
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if empty:
        print(empty, file=sys.stderr)
    return paths
