"""The reading layer: results database rows -> blocks -> Markdown / CSV / LaTeX tables and PNG figures.

Every table reads the completed rerun rows through `harness.report.blocks`, recomputes its numbers
from them, and ends with `source_lines(...)`: database, protocol, budget, seeds, date, git commit.
Modules: `blocks` (rows, blocks, row ids, source footer), `filters` (the command-line row filters),
`render` (cells, Markdown/LaTeX tables, `publish`), `leaderboard`, `significance`, `energy`,
`literature` (+ literature.yaml) and `figures`.

Nothing here runs a model or imports torch: what must be measured by running one (params, FLOPs,
latency, inference energy, teacher entropy, qualitative predictions) lives in `harness.measure`, and
the caller (`harness.cli`) hands the measured values in as plain data.
"""
from harness.report.blocks import Block, find_row, load_blocks, row_id, source_lines

__all__ = ["Block", "find_row", "load_blocks", "row_id", "source_lines"]
