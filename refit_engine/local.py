"""One rank's tensors of one model, described for the plan compiler: `ShardedTensors`.

Each rank says which global tensors it holds pieces of and where; `gather_layouts` collects
every rank's description over a process group (the one collective step of planning) and builds
the `Layout` of each side. Adapters (refit_engine.megatron for megatron-core models) produce
`ShardedTensors`; users with plain tensors fill one by hand:

    local = ShardedTensors()
    local.add("layers.0.fc1.weight", fc1_shard, global_shape=(8192, 4096),
              split=Split(0, tp, stride=2), part=tp_rank)
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from refit_engine import arrays, dtypes, transforms
from refit_engine.errors import RefitError
from refit_engine.layouts import (
    Layout,
    Split,
    TensorMeta,
    part_pieces,
    placement_box,
    row_major_strides,
)
from refit_engine.tables import MAX_DIMS, PLACEMENT


@dataclass(frozen=True)
class Entry:
    """A piece of global tensor `name` stored in this rank's local tensor `key`."""

    name: str
    global_shape: tuple[int, ...]
    dtype: str
    key: str
    local_shape: tuple[int, ...]
    start: tuple[int, ...]
    extent: tuple[int, ...]
    local_offset: int
    local_strides: tuple[int, ...]
    # A quantized destination's format ("fp8_block128", "mxfp8"; see refit_engine.transforms);
    # None: the dtype's own (a float dtype other than the source's is a cast).
    format: str | None = None


@dataclass
class ShardedTensors:
    """The tensors of one model on this rank, and which pieces of which global tensors they hold."""

    entries: list[Entry] = field(default_factory=list)
    tensors: dict[str, object] = field(default_factory=dict)  # key -> torch/NumPy/CuPy array
    # key -> the object that owns the tensor (e.g. a megatron Parameter, whose .data may be
    # replaced), so a plan can tell when a tensor was swapped out after planning.
    current: dict[str, object] = field(default_factory=dict)
    # Global ranks the model's own process groups span (adapters fill it), checked against
    # the refit's group.
    claimed_ranks: set = field(default_factory=set)
    # Problems found by add(): kept, not raised, so that plan() reports them on every rank
    # (raising here would leave the other ranks waiting in plan's collective).
    errors: list = field(default_factory=list)
    # key -> the scale tensor of a quantized destination local tensor (add(format=...)).
    scales: dict[str, object] = field(default_factory=dict)

    def add(self, name: str, tensor, global_shape: Sequence[int], split: Split | None = None,
            part: int = 0, key: str | None = None, offset: int = 0,
            part_shape: Sequence[int] | None = None, format: str | None = None,
            scale=None) -> None:
        """This rank holds part `part` of `name` (cut by `split`; whole if None) in `tensor`.

        key: the local tensor's name (default `name`); several global tensors may share one
            local tensor (grouped experts): pass the same tensor and key, and each one's element
            `offset` where its part starts (stored contiguously, shape `part_shape`).
        format, scale: a destination quantized while it is refit (`refit_engine.transforms`):
            format "fp8_block128" or "mxfp8", `tensor` float8_e4m3fn (or uint8) and `scale`
            its scale tensor (`transforms.scale_shape` of the tensor's shape; None: allocated
            here, then found in `scales[key]`). A destination whose float dtype differs from
            its source's (float32, bfloat16, float16) is cast by plan(..., cast=True).
        A problem (a split that does not divide, an unsupported tensor) is recorded in
        `errors` and raised by `refit_engine.plan` on every rank.
        """
        try:
            self._add(name, tensor, global_shape, split, part, key, offset, part_shape, format,
                      scale)
        except RefitError as exc:
            self.errors.append(exc)

    def _add(self, name, tensor, global_shape, split, part, key, offset, part_shape, format,
             scale) -> None:
        _check_arguments(name, global_shape, split, part, key, offset, part_shape)
        key = key or name
        if format is not None:
            self.scales[key] = transforms.checked_scale(name, key, tensor, format, scale,
                                                        self.scales.get(key))
        try:
            info = arrays.info(tensor)
        except (TypeError, ValueError) as exc:
            raise RefitError(f"local tensor cannot be refit: {exc}", tensor=name) from exc
        if key in self.tensors and self.tensors[key] is not tensor:
            raise RefitError(f"local tensor key '{key}' is bound to two different tensors",
                             tensor=name)
        global_shape = tuple(int(s) for s in global_shape)
        local_shape = tuple(int(s) for s in part_shape) if part_shape is not None else (
            split.local_shape(name, global_shape) if split else global_shape)
        _check_arrangement(name, key, info.shape, local_shape)
        self.tensors[key] = tensor
        strides = row_major_strides(local_shape)
        for start, extent, local_offset in part_pieces(name, global_shape, split, part, strides,
                                                       offset):
            self.entries.append(Entry(name, global_shape, info.dtype, key, info.shape, start,
                                      extent, local_offset, strides, format))


def _writable(array) -> bool:
    flags = getattr(array, "flags", None)  # NumPy; torch tensors and CuPy arrays are writable
    return bool(getattr(flags, "writeable", True)) if flags is not None else True


def _is_index(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_arguments(name, global_shape, split, part, key, offset, part_shape) -> None:
    """ShardedTensors.add's arguments, before anything uses them: a float or negative size
    silently truncated, or a TypeError on one rank, would be worse than this error."""
    if not isinstance(name, str) or not name:
        raise RefitError(f"tensor name must be a non-empty string, not {name!r}", tensor=str(name))
    if key is not None and (not isinstance(key, str) or not key):
        raise RefitError(f"key must be None or a non-empty string, not {key!r}", tensor=name)
    for what, shape in (("global_shape", global_shape), ("part_shape", part_shape)):
        if shape is None and what == "part_shape":
            continue
        try:
            dims = list(shape)
        except TypeError:
            raise RefitError(f"{what} must be a sequence of sizes, not {shape!r}",
                             tensor=name) from None
        if not all(_is_index(d) and d >= 0 for d in dims):
            raise RefitError(f"{what} {tuple(dims)} must hold non-negative integers",
                             tensor=name)
        if math.prod(int(d) for d in dims) >= 1 << 56:
            raise RefitError(f"{what} {tuple(dims)} is too large to address", tensor=name)
    if split is not None and not isinstance(split, Split):
        raise RefitError(f"split must be a refit_engine.Split or None, not {split!r}",
                         tensor=name)
    if not _is_index(part) or not _is_index(offset) or offset < 0:
        raise RefitError(f"part and offset must be integers (offset >= 0), not {part!r} and "
                         f"{offset!r}", tensor=name)


def _check_arrangement(name: str, key: str, shape: tuple, part_shape: tuple) -> None:
    """A local tensor holding exactly its part's elements must have the part's shape (size-1
    dims aside): one of the same size but another shape (a transpose made contiguous, a flat
    copy) would be refit element by element into the wrong places. Larger tensors (several
    parts at offsets, grouped experts) are checked against their parts by the plan compiler."""
    if shape == part_shape or math.prod(shape) != math.prod(part_shape):
        return
    if [s for s in shape if s != 1] == [s for s in part_shape if s != 1]:
        return  # unit dims only: the same arrangement of elements
    raise RefitError(f"local tensor '{key}' has shape {shape}, but its part of the tensor has "
                     f"local shape {part_shape} (the same {math.prod(shape)} elements, arranged "
                     "differently): give the tensor in its part's shape", tensor=name)


def checked_info(meta, tensor, side: str, device: str | None = None) -> arrays.ArrayInfo:
    """The tensor bound to local tensor `meta` (a layouts.BufferMeta), checked: storage, one
    contiguous block of the declared size (and on `device`, when given)."""
    try:
        info = arrays.info(tensor)
    except (TypeError, ValueError) as exc:
        raise RefitError(f"{side} local tensor '{meta.key}' cannot be refit: {exc}",
                         tensor=meta.key, ranks=[meta.rank]) from exc
    expected = meta.numel * dtypes.itemsize(meta.dtype)
    problem = None
    if info.device == "meta":
        problem = "is a meta tensor (no storage)"
    elif not info.contiguous:
        problem = "is not contiguous"
    elif info.nbytes != expected:
        problem = f"has {info.nbytes} bytes, expected {expected}"
    elif device is not None and info.device != device:
        problem = f"is on {info.device}, expected {device}"
    elif side == "destination" and not _writable(tensor):
        problem = "is read-only (a NumPy array with writeable=False)"
    if problem:
        raise RefitError(f"{side} local tensor '{meta.key}' {problem}", tensor=meta.key,
                         ranks=[meta.rank])
    return info


# Zero-element tensors are legitimate (nothing moves for them), but the plan compiler refuses
# pieces with a zero extent (check_pieces) and tensors no source piece holds
# (index_source_replicas). So build_layout keeps them out of the compiler's tables: their local
# tensors stay (buffers without pieces), and the tensors are kept here, per layout, for
# check_empty_tensors to match between the sides.
_EMPTY: "weakref.WeakKeyDictionary[Layout, dict]" = weakref.WeakKeyDictionary()


def empty_tensors(layout: Layout) -> dict:
    """{name: (TensorMeta, holder ranks)} of the zero-element tensors `build_layout` kept out of
    `layout`'s tables."""
    return _EMPTY.get(layout, {})


def _declared_twice(first, second) -> RefitError:
    return RefitError(f"declared twice with different metadata: {first} and {second}",
                      tensor=second.name)


def _add_empty(layout: Layout, empty: dict, e: Entry, rank: int) -> None:
    meta = TensorMeta(e.name, e.global_shape, e.dtype)
    if len(meta.shape) > MAX_DIMS:
        raise RefitError(f"{len(meta.shape)} dims; at most {MAX_DIMS} are supported",
                         tensor=e.name)
    try:
        earlier = layout.tensor(e.name)  # declared non-empty by an earlier rank
    except KeyError:
        earlier = None
    if earlier is not None:
        raise _declared_twice(earlier, meta)
    seen = empty.setdefault(e.name, (meta, set()))
    if seen[0] != meta:
        raise _declared_twice(seen[0], meta)
    seen[1].add(rank)


def build_layout(per_rank: Sequence[tuple[int, list[Entry]]]) -> Layout:
    """The Layout of one side from every rank's entries, in rank order (same on every rank)."""
    layout = Layout()
    empty = {}
    for rank, entries in per_rank:
        try:
            for e in entries:
                if not math.prod(e.global_shape):
                    _add_empty(layout, empty, e, rank)
                    layout.add_buffer(rank, e.key, e.local_shape, e.dtype)
                    continue
                if e.name in empty:
                    raise _declared_twice(empty[e.name][0],
                                          TensorMeta(e.name, e.global_shape, e.dtype))
                layout.add_tensor(e.name, e.global_shape, e.dtype)
                layout.add_buffer(rank, e.key, e.local_shape, e.dtype)
                if math.prod(e.extent):  # a zero-size block of a packed split holds nothing
                    layout.add_piece(e.name, rank, e.key, e.start, e.extent, e.local_offset,
                                     e.local_strides)
        except RefitError as exc:  # e.g. this rank declares a tensor unlike an earlier rank
            if exc.ranks:
                raise
            raise RefitError(exc.reason, tensor=exc.tensor, ranks=[rank]) from exc
    if empty:
        _EMPTY[layout] = empty
    return layout


def check_empty_tensors(src: Layout, dst: Layout) -> None:
    """The zero-element tensors of both sides match, by name, global shape and dtype, as the
    plan compiler checks the others (a tensor empty on one side only and non-empty on the other
    is refused by the plan compiler, as missing from one side)."""
    src_empty, dst_empty = empty_tensors(src), empty_tensors(dst)
    for name, (meta, ranks) in dst_empty.items():
        if name not in src_empty:
            raise RefitError("destination tensor has no source: missing from the source layout "
                             f"(a zero-size tensor of shape {meta.shape})", tensor=name,
                             ranks=ranks)
        other, other_ranks = src_empty[name]
        if other.shape != meta.shape:
            raise RefitError(f"global shape differs: source {other.shape}, destination "
                             f"{meta.shape}", tensor=name, ranks=ranks | other_ranks)
        if other.dtype != meta.dtype:
            raise RefitError(f"dtype differs between source and destination ({other.dtype} and "
                             f"{meta.dtype})", tensor=name, ranks=ranks | other_ranks)
    for name in sorted(src_empty.keys() - dst_empty.keys()):
        raise RefitError("source tensor is not in the destination layout (extra tensor; a "
                         f"zero-size tensor of shape {src_empty[name][0].shape})", tensor=name,
                         ranks=src_empty[name][1])


def from_layout(layout: Layout, rank: int, tensors: dict) -> ShardedTensors:
    """This rank's part of a whole-cluster `layout`, bound to `tensors` ({key: tensor}): the
    inverse of `build_layout`, for layouts described centrally (tests, synthetic models)."""
    local = ShardedTensors()
    for row in layout.placements():
        buffer = layout.buffers[int(row[PLACEMENT["buffer"]])]
        if buffer.rank != rank:
            continue
        meta = layout.tensors[int(row[PLACEMENT["tensor"]])]
        start, extent, strides = placement_box(row, len(meta.shape))
        local.tensors[buffer.key] = tensors[buffer.key]
        local.entries.append(Entry(meta.name, meta.shape, meta.dtype, buffer.key, buffer.shape,
                                   start, extent, int(row[PLACEMENT["local_offset"]]), strides))
    return local
