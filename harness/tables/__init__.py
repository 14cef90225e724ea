"""Tables and reports built from the results database (leaderboard, significance, literature).

Every table reads the completed rerun rows through `harness.tables.common`, recomputes its numbers
from them, and ends with `source_lines(...)`: database, protocol, budget, seeds, date, git commit.
"""
from harness.tables.common import Block, find_row, load_blocks, row_id, source_lines

__all__ = ["Block", "find_row", "load_blocks", "row_id", "source_lines"]
