"""The schema of every table that crosses the plan compiler's boundary, by column name.

Tables are int64 arrays, one row per item. Code reads a column by name, never by position:
`pieces[:, PIECE["tensor"]]`, `segment[SEG["rows"]]`, `tensors[:, span(TENSOR, "shape")]`.

- into the plan compiler (`Layout.tables()`, a `LayoutTables`): tensors (TENSOR_FIELDS),
  buffers (BUFFER_FIELDS), pieces (PIECE_FIELDS) and the flat holders array (piece p's holders
  are holders[first:first + count], its `holders_first` and `holders_count`);
- out of it (a compiler.RankPlan): segments (SEGMENT_FIELDS) and messages (MESSAGE_FIELDS);
- placements (PLACEMENT_FIELDS): one row per holder of each piece (`Layout.placements()`),
  for the reference executor and the tests; made here, never seen by the plan compiler.

Every name the plan compiler reads or writes comes from the compiled core
(`_core.TENSOR_FIELDS`, `BUFFER_FIELDS`, `PIECE_FIELDS`, `SEGMENT_FIELDS`, `MESSAGE_FIELDS`,
defined once in csrc/plan/schema.h); per-dimension columns are named `shape.0`, `start.0`, ...
(`span` finds them). Only the placement table, which never crosses the boundary, is named here.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refit_engine import _core

MAX_DIMS = int(_core.MAX_DIMS)  # dims of a tensor at most: every box column comes in MAX_DIMS


def dim_field(prefix: str, dim: int) -> str:
    """The name of one per-dimension column: dim_field("start", 0) is "start.0"."""
    return f"{prefix}.{dim}"


def _dims(prefix: str) -> tuple[str, ...]:
    return tuple(dim_field(prefix, d) for d in range(MAX_DIMS))


TENSOR_FIELDS = tuple(_core.TENSOR_FIELDS)
BUFFER_FIELDS = tuple(_core.BUFFER_FIELDS)
PIECE_FIELDS = tuple(_core.PIECE_FIELDS)
SEGMENT_FIELDS = tuple(_core.SEGMENT_FIELDS)
MESSAGE_FIELDS = tuple(_core.MESSAGE_FIELDS)
# A box of a global tensor and where it lies in a local tensor: global start and extent, and
# the local tensor's element strides (the last columns of a piece).
BOX_FIELDS = _dims("start") + _dims("extent") + _dims("stride")
PLACEMENT_FIELDS = ("tensor", "buffer", "local_offset") + BOX_FIELDS


def columns(fields: tuple[str, ...]) -> dict[str, int]:
    """Column name -> index, for one table's fields."""
    return {name: i for i, name in enumerate(fields)}


TENSOR = columns(TENSOR_FIELDS)
BUFFER = columns(BUFFER_FIELDS)
PIECE = columns(PIECE_FIELDS)
PLACEMENT = columns(PLACEMENT_FIELDS)
SEG = columns(SEGMENT_FIELDS)
MSG = columns(MESSAGE_FIELDS)


def span(table: dict[str, int], prefix: str) -> slice:
    """The MAX_DIMS columns `prefix`.0, `prefix`.1, ... of a table (shape, start, extent,
    stride), which lie side by side in every table that has them."""
    first = table[dim_field(prefix, 0)]
    return slice(first, first + MAX_DIMS)


def box_span(table: dict[str, int]) -> slice:
    """All BOX_FIELDS columns of a table that has them (pieces, placements), in BOX_FIELDS order."""
    first = table[BOX_FIELDS[0]]
    return slice(first, first + len(BOX_FIELDS))


class LayoutTables(NamedTuple):
    """One side's tables, in the order the plan compiler takes them."""

    names: list[str]        # tensor names, one per tensors row
    tensors: np.ndarray     # TENSOR_FIELDS
    buffers: np.ndarray     # BUFFER_FIELDS
    pieces: np.ndarray      # PIECE_FIELDS
    holders: np.ndarray     # flat: buffer index of each holder of each piece


for _table, _fields in ((TENSOR, TENSOR_FIELDS), (PIECE, PIECE_FIELDS)):
    # span and box_span rely on per-dimension columns side by side, in dimension order.
    for _prefix in ("shape",) if _table is TENSOR else ("start", "extent", "stride"):
        assert _fields[span(_table, _prefix)] == _dims(_prefix), _fields
assert PIECE_FIELDS[box_span(PIECE)] == BOX_FIELDS, PIECE_FIELDS
del _table, _fields, _prefix
