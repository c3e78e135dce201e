"""The schema of every table that crosses the plan compiler's boundary, by column name.

Tables are int64 arrays, one row per item. Code reads a column by name, never by position:
`pieces[:, PIECE["tensor"]]`, `segment[SEG["rows"]]`, `tensors[:, span(TENSOR, "shape")]`.

- into the plan compiler (`Layout.tables()`, a `LayoutTables`): tensors (TENSOR_FIELDS),
  buffers (BUFFER_FIELDS), pieces (PIECE_FIELDS) and the flat holders array (piece p's holders
  are holders[first:first + count], its `holders_first` and `holders_count`);
- out of it (a compiler.RankPlan): segments (SEGMENT_FIELDS) and messages (MESSAGE_FIELDS);
- placements (PLACEMENT_FIELDS): one row per holder of each piece (`Layout.placements()`),
  for the reference executor and the tests; made here, never seen by the plan compiler.

The compiled core exports the names of the tables it builds (`_core.SEGMENT_FIELDS`,
`_core.MESSAGE_FIELDS`); the input tables' names are written here, matching the row structs
the plan compiler reads (csrc/plan/types.h), until the core exports those too.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refit_engine import _core

MAX_DIMS = int(_core.MAX_DIMS)  # dims of a tensor at most: every box column comes in MAX_DIMS


def _dims(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{d}" for d in range(MAX_DIMS))


TENSOR_FIELDS = ("ndim", "itemsize", "dtype_code") + _dims("shape")
BUFFER_FIELDS = ("rank", "numel", "itemsize")
# A box of a global tensor and where it lies in a local tensor: global start and extent, and
# the local tensor's element strides.
BOX_FIELDS = _dims("start") + _dims("extent") + _dims("stride")
PIECE_FIELDS = ("tensor", "holders_first", "holders_count", "local_offset") + BOX_FIELDS
PLACEMENT_FIELDS = ("tensor", "buffer", "local_offset") + BOX_FIELDS
SEGMENT_FIELDS = tuple(_core.SEGMENT_FIELDS)
MESSAGE_FIELDS = tuple(_core.MESSAGE_FIELDS)


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
    """The MAX_DIMS columns `prefix`0, `prefix`1, ... of a table (shape, start, extent, stride),
    which lie side by side in every table that has them."""
    first = table[f"{prefix}0"]
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


for _table, _fields in ((PIECE, PIECE_FIELDS), (PLACEMENT, PLACEMENT_FIELDS)):
    # box_span relies on the box columns being contiguous and in BOX_FIELDS order.
    assert _fields[box_span(_table)] == BOX_FIELDS
del _table, _fields
