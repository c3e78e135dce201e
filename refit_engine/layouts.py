"""Layouts: which rank holds which box of which global tensor, and where in its local tensor.

One `Layout` describes one model (one side of a refit) on every rank. It holds four tables:

- tensors: logical tensors, by canonical name (the same on both sides: global layer and global
  expert indices), with global shape and dtype;
- buffers: the local tensors ranks hold, by (rank, key), with local shape and dtype;
- pieces: "these ranks each hold box [start, start + extent) of tensor T, at element
  `local_offset` of their own buffer, with element strides `local_strides`";
- holders: each piece's buffers, in ascending rank.

A placement is one holder's copy of a piece (rank R holds the box in buffer B): DP replicas are
many placements but one piece, which keeps cluster-scale tables small (`placements()` lists
them one by one, for the reference executor and tests).

Every parallel layout reduces to pieces, built here by `Layout.place` from a `Split`:

- replicated tensors and DP replicas: several holders of the same part;
- TP on any dim: `Split(dim, parts)`;
- partition stride (SwiGLU fc1 keeps [gate_i; up_i] on rank i): `Split(0, tp, stride=2)`;
- block-interleaved packed tensors: `Split(dim, tp, blocks=[b0, b1, ...])`, per-rank block sizes:
  the global dim is blocks of b_j * parts, and rank i holds chunk i of every block, in order;
- EP: per-expert tensors named by global expert index, placed on the ranks holding the expert;
  grouped expert tensors: one buffer per rank (`key=`), each expert at its `offset`;
- ETP, PP, non-collocated models: just which ranks are holders (see `refit_engine.harness.grid`).

Tables cross into the plan compiler as int64 arrays; their columns are named in
`refit_engine.tables`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from refit_engine import dtypes
from refit_engine.errors import RefitError
from refit_engine.tables import (
    BOX_FIELDS,
    BUFFER,
    BUFFER_FIELDS,
    MAX_DIMS,
    PIECE,
    PIECE_FIELDS,
    PLACEMENT,
    PLACEMENT_FIELDS,
    TENSOR,
    TENSOR_FIELDS,
    LayoutTables,
    box_span,
    columns,
    span,
)

# The names these tables had here before refit_engine.tables (the harness reads them).
TENSOR_COLUMNS, BUFFER_COLUMNS, BOX_COLUMNS = TENSOR_FIELDS, BUFFER_FIELDS, BOX_FIELDS
PIECE_COLUMNS, PLACEMENT_COLUMNS = PIECE_FIELDS, PLACEMENT_FIELDS
# A piece as Layout keeps it while building (the holders apart): also the key that finds the
# piece a new placement joins.
_PIECE_ROW = columns(("tensor", "local_offset") + BOX_FIELDS)
_PADS = [(0,) * n for n in range(MAX_DIMS + 1)]


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class BufferMeta:
    rank: int
    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Split:
    """How a tensor is cut along one dim into `parts` parts (TP, ETP, vocab parallel, ...).

    stride: megatron's partition stride (2 for SwiGLU fc1): the dim is `stride` equal blocks.
    blocks: per-rank sizes of unequal blocks packed along the dim (e.g. fused q/k/v); overrides
        stride. Rank i's local dim is chunk i of every block, concatenated in block order.
    """

    dim: int
    parts: int
    stride: int = 1
    blocks: tuple[int, ...] | None = None

    def local_blocks(self, name: str, shape: Sequence[int], ranks: Iterable[int]) -> tuple[int, ...]:
        """Per-rank block sizes along `dim`, checked against the global shape."""
        if not 0 <= self.dim < len(shape):
            raise RefitError(f"split dim {self.dim} is out of range for shape {tuple(shape)}",
                             tensor=name, ranks=ranks)
        size = shape[self.dim]
        if self.blocks is not None:
            blocks = tuple(int(b) for b in self.blocks)
            if sum(blocks) * self.parts != size:
                raise RefitError(
                    f"packed blocks {list(blocks)} x {self.parts} parts do not add up to dim "
                    f"{self.dim} of size {size}", tensor=name, ranks=ranks)
            return blocks
        if self.parts <= 0 or self.stride <= 0 or size % (self.parts * self.stride):
            raise RefitError(
                f"dim {self.dim} of size {size} does not divide into {self.parts} parts"
                + (f" with stride {self.stride}" if self.stride > 1 else ""),
                tensor=name, ranks=ranks)
        return (size // (self.parts * self.stride),) * self.stride

    def boxes(self, name: str, shape: Sequence[int], part: int, ranks: Iterable[int] = ()):
        """(global start, local start along dim, size) of each block that part `part` holds."""
        blocks = self.local_blocks(name, shape, ranks)
        if not 0 <= part < self.parts:
            raise RefitError(f"part {part} is out of range for {self.parts} parts",
                             tensor=name, ranks=ranks)
        out, global_base, local_base = [], 0, 0
        for b in blocks:
            out.append((global_base + part * b, local_base, b))
            global_base += b * self.parts
            local_base += b
        return out

    def local_shape(self, name: str, shape: Sequence[int], ranks: Iterable[int] = ()) -> tuple[int, ...]:
        local = list(shape)
        local[self.dim] = sum(self.local_blocks(name, shape, ranks))
        return tuple(local)


def part_pieces(name: str, shape: Sequence[int], split: Split | None, part: int,
                strides: Sequence[int], offset: int = 0, ranks: Iterable[int] = ()):
    """(start, extent, local offset) of every box of `name` that part `part` holds, the part
    stored contiguously from element `offset` of a local tensor with element `strides`
    (the whole tensor when `split` is None)."""
    shape = tuple(shape)
    if split is None:
        return [((0,) * len(shape), shape, offset)]
    out = []
    for global_start, local_start, size in split.boxes(name, shape, part, ranks):
        start, extent = [0] * len(shape), list(shape)
        start[split.dim], extent[split.dim] = global_start, size
        out.append((tuple(start), tuple(extent), offset + local_start * strides[split.dim]))
    return out


def row_major_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= int(size)
    return tuple(reversed(strides))


class Layout:
    """All ranks' pieces of one model's tensors (one side of a refit)."""

    def __init__(self):
        self.tensors: list[TensorMeta] = []
        self.buffers: list[BufferMeta] = []
        self._tensor_index: dict[str, int] = {}
        self._buffer_index: dict[tuple[int, str], int] = {}
        # Pieces: rows of _PIECE_ROW and {rank: buffer} of their holders; _piece_index finds
        # the pieces a new placement may join.
        self._pieces: list[tuple[int, ...]] = []
        self._holders: list[dict[int, int]] = []
        self._piece_index: dict[tuple[int, ...], list[int]] = {}
        self._tables = None

    # -- building -------------------------------------------------------------------------

    def add_tensor(self, name: str, shape: Sequence[int], dtype) -> int:
        index = self._tensor_index.get(name)
        if index is not None and _same(self.tensors[index], shape, dtype):
            return index  # the common case when gathering: declared by an earlier rank
        meta = TensorMeta(name, tuple(int(s) for s in shape), dtypes.dtype_name(dtype))
        if len(meta.shape) > MAX_DIMS:
            raise RefitError(f"{len(meta.shape)} dims; at most {MAX_DIMS} are supported", tensor=name)
        if index is not None:
            if self.tensors[index] != meta:
                raise RefitError(f"declared twice with different metadata: {self.tensors[index]} "
                                 f"and {meta}", tensor=name)
            return index
        self._tensor_index[name] = len(self.tensors)
        self.tensors.append(meta)
        self._tables = None
        return len(self.tensors) - 1

    def add_buffer(self, rank: int, key: str, shape: Sequence[int], dtype) -> int:
        index = self._buffer_index.get((int(rank), key))
        if index is not None and _same(self.buffers[index], shape, dtype):
            return index
        meta = BufferMeta(int(rank), key, tuple(int(s) for s in shape), dtypes.dtype_name(dtype))
        if index is not None:
            if self.buffers[index] != meta:
                raise RefitError(f"local tensor '{key}' declared twice on rank {rank} with "
                                 f"shapes {self.buffers[index].shape} and {meta.shape}",
                                 tensor=key, ranks=[rank])
            return index
        self._buffer_index[(meta.rank, key)] = len(self.buffers)
        self.buffers.append(meta)
        self._tables = None
        return len(self.buffers) - 1

    def add_piece(self, name: str, rank: int, key: str, start: Sequence[int],
                  extent: Sequence[int], local_offset: int = 0,
                  local_strides: Sequence[int] | None = None) -> None:
        """Rank `rank` holds box [start, start + extent) of `name` in its buffer `key`."""
        tensor = self._tensor_index[name]
        buffer = self._buffer_index[(int(rank), key)]
        ndim = len(self.tensors[tensor].shape)
        if len(start) != ndim or len(extent) != ndim:
            raise RefitError(f"piece has {len(start)} dims but the tensor has {ndim}",
                             tensor=name, ranks=[rank])
        strides = local_strides if local_strides is not None else row_major_strides(extent)
        pad = _PADS[MAX_DIMS - ndim]
        row = ((tensor, int(local_offset)) + tuple(map(int, start)) + pad
               + tuple(map(int, extent)) + pad + tuple(map(int, strides)) + pad)
        # Join the first piece with this box and placement that this rank does not hold yet
        # (a rank holding the same box twice gets a second piece).
        rank = int(rank)
        candidates = self._piece_index.setdefault(row, [])
        piece = next((p for p in candidates if rank not in self._holders[p]), None)
        if piece is None:
            piece = len(self._pieces)
            candidates.append(piece)
            self._pieces.append(row)
            self._holders.append({})
        self._holders[piece][rank] = buffer
        self._tables = None

    def place(self, name: str, shape: Sequence[int], dtype, holders: Iterable[tuple[int, int]],
              split: Split | None = None, key: str | None = None, offset: int = 0,
              buffer_shape: Sequence[int] | None = None) -> None:
        """Declare tensor `name` and its pieces on every holder.

        holders: (rank, part) pairs; DP replicas are several ranks with the same part. `part`
            is ignored when `split` is None (replicated).
        key: the local tensor's key (default: the tensor's name). Several tensors can share one
            buffer (grouped experts): give `key`, `buffer_shape` and each tensor's `offset` in
            elements; the tensor's part is stored contiguously there.
        """
        holders = [(int(r), int(p)) for r, p in holders]
        ranks = [r for r, _ in holders]
        self.add_tensor(name, shape, dtype)
        shape = tuple(int(s) for s in shape)
        local_shape = split.local_shape(name, shape, ranks) if split else shape
        key = key or name
        strides = row_major_strides(local_shape)
        for rank, part in holders:
            self.add_buffer(rank, key, buffer_shape or local_shape, dtype)
            for start, extent, local_offset in part_pieces(name, shape, split, part, strides,
                                                           offset, ranks):
                self.add_piece(name, rank, key, start, extent, local_offset, strides)

    # -- reading --------------------------------------------------------------------------

    def tensor(self, name: str) -> TensorMeta:
        return self.tensors[self._tensor_index[name]]

    def buffer_index(self, rank: int, key: str) -> int:
        return self._buffer_index[(int(rank), key)]

    @property
    def ranks(self) -> list[int]:
        return sorted({b.rank for b in self.buffers})

    def buffers_of(self, rank: int) -> list[int]:
        return [i for i, b in enumerate(self.buffers) if b.rank == rank]

    def tables(self) -> LayoutTables:
        """The int64 tables the plan compiler reads (columns: refit_engine.tables)."""
        if self._tables is None:
            tensors = np.zeros((len(self.tensors), len(TENSOR_FIELDS)), dtype=np.int64)
            tensors[:, TENSOR["ndim"]] = [len(t.shape) for t in self.tensors]
            tensors[:, TENSOR["itemsize"]] = [dtypes.itemsize(t.dtype) for t in self.tensors]
            tensors[:, TENSOR["dtype_code"]] = [dtypes.dtype_code(t.dtype) for t in self.tensors]
            shapes = tensors[:, span(TENSOR, "shape")]  # a view: filled in place
            for i, t in enumerate(self.tensors):
                shapes[i, :len(t.shape)] = t.shape
            buffers = np.zeros((len(self.buffers), len(BUFFER_FIELDS)), dtype=np.int64)
            buffers[:, BUFFER["rank"]] = [b.rank for b in self.buffers]
            buffers[:, BUFFER["numel"]] = [b.numel for b in self.buffers]
            buffers[:, BUFFER["itemsize"]] = [dtypes.itemsize(b.dtype) for b in self.buffers]
            rows = np.array(self._pieces, dtype=np.int64).reshape(-1, len(_PIECE_ROW))
            counts = np.array([len(by_rank) for by_rank in self._holders], dtype=np.int64)
            pieces = np.zeros((len(self._pieces), len(PIECE_FIELDS)), dtype=np.int64)
            pieces[:, PIECE["tensor"]] = rows[:, _PIECE_ROW["tensor"]]
            pieces[:, PIECE["holders_first"]] = np.cumsum(counts) - counts
            pieces[:, PIECE["holders_count"]] = counts
            pieces[:, PIECE["local_offset"]] = rows[:, _PIECE_ROW["local_offset"]]
            pieces[:, box_span(PIECE)] = rows[:, box_span(_PIECE_ROW)]
            holders = [by_rank[r] for by_rank in self._holders for r in sorted(by_rank)]
            self._tables = LayoutTables([t.name for t in self.tensors], tensors, buffers, pieces,
                                        np.array(holders, dtype=np.int64))
        return self._tables

    def placements(self) -> np.ndarray:
        """One row per holder of every piece (columns: PLACEMENT_FIELDS)."""
        tables = self.tables()
        return expand_placements(tables.pieces, tables.holders)

    def __repr__(self) -> str:
        return (f"Layout({len(self.tensors)} tensors, {len(self.buffers)} local tensors on "
                f"{len(self.ranks)} ranks, {len(self._pieces)} pieces, "
                f"{sum(map(len, self._holders))} placements)")


def _same(meta, shape: Sequence[int], dtype) -> bool:
    """Whether `meta` (a TensorMeta or BufferMeta) already has this shape and dtype: a cheap
    test first, for the many repeats of one declaration."""
    if meta.shape != tuple(shape):
        return False
    return meta.dtype == dtype or meta.dtype == dtypes.dtype_name(dtype)


def placement_box(row, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(start, extent, local strides) of one placement row (PLACEMENT_FIELDS), as ints."""
    def dims(prefix: str) -> tuple[int, ...]:
        return tuple(int(v) for v in row[span(PLACEMENT, prefix)][:ndim])
    return dims("start"), dims("extent"), dims("stride")


def expand_placements(pieces: np.ndarray, holders: np.ndarray) -> np.ndarray:
    """Plan compiler tables (pieces, holders) as one row per holder of each piece, in piece
    order (columns: PLACEMENT_FIELDS)."""
    counts = pieces[:, PIECE["holders_count"]]
    which = np.repeat(np.arange(len(pieces)), counts)
    # Position of each placement in its piece's run of holders.
    within = np.arange(len(which)) - np.repeat(np.cumsum(counts) - counts, counts)
    out = np.empty((len(which), len(PLACEMENT_FIELDS)), dtype=np.int64)
    out[:, PLACEMENT["tensor"]] = pieces[which, PIECE["tensor"]]
    out[:, PLACEMENT["buffer"]] = holders[pieces[which, PIECE["holders_first"]] + within]
    out[:, PLACEMENT["local_offset"]] = pieces[which, PIECE["local_offset"]]
    out[:, box_span(PLACEMENT)] = pieces[which][:, box_span(PIECE)]
    return out
