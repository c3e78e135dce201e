"""Memory planner and dry run: will a refit configuration fit, and what will it move?

For a Kimi K2 configuration (source and destination TP / PP / EP / ETP on a number of GPUs,
collocated or not) this builds both layouts and every rank's plan without any GPU, then reports
per GPU: weights of the source and destination models, staging, total against the GPU's
memory; bytes moved locally and over links; and the floor (bytes over bandwidth, the largest
over ranks). A configuration that cannot fit is refused with a message saying by how much.

The transport is the plan's (`--transport`, default auto as the library's): same-node peers
over CUDA IPC need no staging and no pack / unpack passes; NCCL peers keep both. `--transport
nccl` gives the figures of every peer over NCCL.

Aliasing (`--alias`, `plan(..., alias=True)`; collocated only): a destination local tensor the
plan fills byte for byte from one source local tensor of the same rank shares its storage
(refit_engine.aliasing.aliasable_buffers on each rank's plan). Its bytes are counted once in
memory and never copied: they leave the local copies, the traffic and the prediction.

Destination format (`--dst-format`, issue 16): bf16 keeps every tensor in its own dtype; fp8 is
Kimi K2's rule (`refit_engine.quantize.KIMI_K2_FORMATS`: linear weights fp8_block128, e4m3 plus
one float32 scale per 128 x 128 block; embeddings, output layer, norms and router bf16, the
router's expert bias fp32). The destination model then takes the smaller bytes; a piece sent to
an NCCL peer crosses quantized (1 byte an element, plus its blocks' scales) where its tensor's
shards hold whole blocks on both sides (every Kimi K2 shard at TP 1-8), else as the source's BF16
(then quantized by the receiver); IPC reads stay BF16 over NVLink and the receiver writes FP8;
local copies read BF16 and write FP8 (`TensorFormats`). Staging stays the plan's (sized for BF16
messages: an upper bound). A destination tensor in another format never aliases the source.

    python -m refit_engine.memory --src tp=8,ep=64 --dst tp=4,ep=128 --gpus 128 --gpu h100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from typing import NamedTuple

import numpy as np

from refit_engine import _core, dtypes, quantize
from refit_engine.aliasing import aliasable_buffers, without_buffers
from refit_engine.compiler import DEFAULT_BUCKET_BYTES, MSG, SEG, Planner, RankPlan
from refit_engine.errors import RefitError
from refit_engine.harness.cli import layout_arg, overrides_arg, positive_float, positive_int
from refit_engine.harness.cost import (RankFigures, box_scales, floor, format_size, predict,
                                       rank_figures, tensor_bytes)
from refit_engine.harness.grid import ParallelGrid, parse_layout_spec
from refit_engine.harness.models.kimi_k2 import (KimiK2Config, kimi_k2_parameters,
                                                 kimi_k2_tables, stage_of)
from refit_engine.harness.topology import (PRESETS, TRANSPORTS, Topology, check_transport,
                                           describe_transport, preset)
from refit_engine.tables import BUFFER, PIECE, TENSOR, LayoutTables, span

GIB = 2**30

# --dst-format's choices: format rules per canonical name (refit_engine.quantize.format_for);
# None: every tensor in its own dtype (the training model's: BF16, the expert bias FP32).
DST_FORMATS: dict[str, tuple[tuple[str, str], ...] | None] = {
    "bf16": None, "fp8": quantize.KIMI_K2_FORMATS}


DST_FORMAT_HELP = {
    "bf16": "bf16 (every tensor in its own dtype, as the training model)",
    "fp8": "fp8 (Kimi K2's rule: linear weights fp8_block128, e4m3 + a float32 scale per 128 x "
           "128 block; embeddings, output layer, norms, router bf16; expert bias fp32)"}


def dst_rules(dst_format: str):
    """The rule table of a --dst-format choice (ValueError for an unknown one)."""
    if dst_format not in DST_FORMATS:
        raise ValueError(f"unknown destination format {dst_format!r} "
                         f"(known: {', '.join(DST_FORMATS)})")
    return DST_FORMATS[dst_format]


def _weights_per_rank(tables: LayoutTables, world: int) -> list[int]:
    """Bytes of local tensors per rank, from a side's tables."""
    buffers = tables.buffers
    per_rank = np.bincount(buffers[:, BUFFER["rank"]],
                           weights=buffers[:, BUFFER["numel"]] * buffers[:, BUFFER["itemsize"]],
                           minlength=world)
    return [int(b) for b in per_rank[:world]]


def weights_per_gpu_gib(cfg: KimiK2Config, grid: ParallelGrid, rules=None) -> float:
    """Largest per-GPU weight bytes of one model, from parameter counts alone (no layout),
    so hopeless configurations are refused in milliseconds. `rules`: the model's formats
    (`DST_FORMATS`; None: the parameters' own dtypes); a shard's scales are taken as its share
    of the whole tensor's."""
    def nbytes(p):
        fmt = quantize.KEEP if rules is None else quantize.format_for(p.name, rules)
        return tensor_bytes(p.shape, fmt, dtypes.itemsize(p.dtype))
    return _per_gpu_gib(cfg, grid, nbytes)


def _per_gpu_gib(cfg: KimiK2Config, grid: ParallelGrid, nbytes) -> float:
    """Largest per-GPU sum of `nbytes(param)` over the stages, each parameter's share of it."""
    per_stage = [0.0] * grid.pp
    for p in kimi_k2_parameters(cfg):
        n = nbytes(p)
        if p.expert is not None:
            n /= grid.ep * grid.etp
        elif p.split:
            n /= grid.tp
        per_stage[stage_of(cfg, grid, p)] += n
    return max(per_stage) / GIB


def _kept_gib(cfg: KimiK2Config, grid: ParallelGrid, rules) -> float:
    """Largest per-GPU bytes of the parameters whose format `rules` keep (they may alias)."""
    def nbytes(p):
        kept = quantize.format_name(quantize.format_for(p.name, rules)) in (
            quantize.KEEP, quantize.format_name(p.dtype))
        return dtypes.itemsize(p.dtype) * math.prod(p.shape) if kept else 0
    return _per_gpu_gib(cfg, grid, nbytes)


# Staging allowance before a plan exists: double-buffered send and receive, one bucket per peer,
# for a typical 16 peers (the dry run replaces it with the plan's exact figure).
TYPICAL_PEERS = 16


def staging_allowance(topo: Topology, ranks: int, transport: str, bucket_bytes: int) -> int:
    """Bytes of staging to allow per GPU before a plan exists: none where every peer can be
    IPC (GPUs, one node, transport auto or ipc); otherwise the typical peers' (how many of a
    rank's peers are across nodes is the plan's to say)."""
    if not topo.cpu_ranks and transport != "nccl" and ranks <= topo.gpus_per_node:
        return 0
    return 4 * bucket_bytes * TYPICAL_PEERS


def memory_need(cfg, src: ParallelGrid, dst: ParallelGrid, topo: Topology, collocated: bool,
                bucket_bytes: int = DEFAULT_BUCKET_BYTES, transport: str = "auto",
                alias: bool = False, dst_format: str = "bf16") -> dict:
    """GiB per GPU before building anything: the largest weights of each side (the destination
    in `dst_format`), the staging allowance, and `need`, what the busiest GPU needs at least.
    With aliasing (collocated only) a rank can share at most the smaller of its two models
    (only tensors that keep their format: none of the quantized ones), so `shared` is that
    bound and `need` the larger side plus staging; the dry run replaces it with the plan's
    exact figure."""
    rules = dst_rules(dst_format)
    src_gib, dst_gib = weights_per_gpu_gib(cfg, src), weights_per_gpu_gib(cfg, dst, rules)
    ranks = max(src.offset + src.world, dst.offset + dst.world)
    staging_gib = staging_allowance(topo, ranks, transport, bucket_bytes) / GIB
    shared = 0.0
    if alias and collocated:  # the smaller side, of the tensors that keep their format
        shared = (min(src_gib, dst_gib) if rules is None
                  else min(_kept_gib(cfg, src, rules), _kept_gib(cfg, dst, rules)))
    weights = src_gib + dst_gib - shared if collocated else max(src_gib, dst_gib)
    return {"src": src_gib, "dst": dst_gib, "staging": staging_gib, "shared": shared,
            "need": weights + staging_gib}


def check_fits(cfg, src: ParallelGrid, dst: ParallelGrid, topo: Topology, collocated: bool,
               headroom: float = 0.9, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
               transport: str = "auto", alias: bool = False,
               dst_format: str = "bf16") -> tuple[float, float]:
    """Refuse (RefitError) a configuration whose weights and staging cannot fit, before
    building anything. `headroom`: the fraction of GPU memory they may use; `transport`: the
    plan's (IPC peers need no staging); `alias`: aliased bytes counted once (`memory_need`:
    the smaller model at most, before the plan says exactly); `dst_format`: the destination
    model's (`DST_FORMATS`). Returns the largest per-GPU weights of each side, in GiB."""
    budget = topo.memory_gib * headroom
    m = memory_need(cfg, src, dst, topo, collocated, bucket_bytes, transport, alias, dst_format)
    src_gib, dst_gib, staging_gib, need = m["src"], m["dst"], m["staging"], m["need"]
    if need > budget:
        cpu = topo.cpu_ranks  # CPU ranks over gloo: a memory budget, not a GPU
        unit = "rank" if cpu else "GPU"
        have = (f"CPU ranks (gloo) have {topo.memory_gib:.0f} GiB of memory budget each" if cpu
                else f"{topo.name} GPUs have {topo.memory_gib:.0f} GiB")
        raise RefitError(
            f"does not fit: weights and staging need {need:.1f} GiB per {unit} (source {src_gib:.1f} GiB at "
            f"TP{src.tp}/PP{src.pp}/EP{src.ep}/ETP{src.etp}"
            + (f" + destination {dst_gib:.1f} GiB at TP{dst.tp}/PP{dst.pp}/EP{dst.ep}/ETP{dst.etp}"
               if collocated else "")
            + (f" - at most {m['shared']:.1f} GiB aliased (the smaller side)" if m["shared"]
               else "") + f" + staging {staging_gib:.1f} GiB"
            + (" (every peer over CUDA IPC)" if not staging_gib else "")
            + f") but {have} ({budget:.0f} GiB usable "
            f"at {headroom:.0%}); raise EP (experts are 99% of the weights) or TP")
    return src_gib, dst_gib


def staged_peers(transports: dict[int, str]) -> np.ndarray:
    """Peers whose messages go through staging (all but IPC), as an array for np.isin."""
    return np.array([p for p, t in transports.items() if t != "ipc"], dtype=np.int64)


def staged_messages(messages: np.ndarray, peers: np.ndarray) -> np.ndarray:
    return messages[np.isin(messages[:, MSG["peer"]], peers)]


def staging_bytes(plan: RankPlan, transports: dict[int, str]) -> int:
    """Device staging of one rank: two buffers per direction (double-buffered), each as large
    as its largest bucket needs for the staged messages. IPC peers are read in place, so a
    rank whose peers are all IPC has none. With every peer staged this is the plan's own
    send/recv_staging_bytes figure."""
    peers = staged_peers(transports)

    def largest_bucket(messages: np.ndarray) -> int:
        # NOTE: the IPC executor packs the staged messages of a bucket end to end
        # (refit_engine.executors.ipc.without_peers), so a bucket needs their sum.
        rows = staged_messages(messages, peers)
        if not len(rows):
            return 0
        return int(np.bincount(rows[:, MSG["bucket"]], weights=rows[:, MSG["bytes"]]).max())
    return 2 * (largest_bucket(plan.send_messages) + largest_bucket(plan.recv_messages))


def staged_buckets(plan: RankPlan, transports: dict[int, str]) -> int:
    """Buckets the staged messages take (num_buckets where every peer is staged, 0 where none
    is): each carries a message latency in the cost model, IPC reads carry none."""
    peers = staged_peers(transports)
    buckets = [staged_messages(m, peers)[:, MSG["bucket"]]
               for m in (plan.send_messages, plan.recv_messages)]
    return max((int(b.max()) + 1 for b in buckets if len(b)), default=0)


def holder_pairs(tables: LayoutTables) -> tuple[np.ndarray, np.ndarray]:
    """(piece, buffer) of every holder of every piece, piece by piece."""
    pieces, count = tables.pieces, tables.pieces[:, PIECE["holders_count"]]
    # Holder slot of every (piece, holder) pair, piece by piece: first + 0, 1, ...
    starts = np.repeat(pieces[:, PIECE["holders_first"]] - (np.cumsum(count) - count), count)
    slots = starts + np.arange(int(count.sum()))
    return np.repeat(np.arange(len(pieces)), count), tables.holders[slots]


def buffer_tensors(tables: LayoutTables) -> np.ndarray:
    """The tensor each local tensor holds (a piece of; -1: none)."""
    piece, buffer = holder_pairs(tables)
    out = np.full(len(tables.buffers), -1, dtype=np.int64)
    out[buffer] = tables.pieces[piece, PIECE["tensor"]]
    return out


class TableBuffers:
    """One side's local tensors as `aliasing.aliasable_buffers` reads a Layout's (`.buffers[i]`
    with dtype, numel and shape), from the planner's tables: the dry run has no Layout (one of
    2048 ranks takes a minute to build). The tables hold no local shapes, so a local tensor is
    seen flat: for kimi_k2_tables that loses nothing, since each local tensor holds one box of
    one tensor, and the same tensor's box filled at the same offsets, as many elements of the
    same dtype, is the same local shape."""

    def __init__(self, tables: LayoutTables):
        self._codes = tables.tensors[buffer_tensors(tables), TENSOR["dtype_code"]]
        self._numel = tables.buffers[:, BUFFER["numel"]]
        self.buffers = self

    def __len__(self) -> int:
        return len(self._numel)

    def __getitem__(self, i: int) -> _FlatBuffer:
        numel = int(self._numel[i])
        return _FlatBuffer(_core.DTYPE_NAMES[int(self._codes[i])], numel, (numel,))


class _FlatBuffer(NamedTuple):
    dtype: str
    numel: int
    shape: tuple


class TensorFormats:
    """Each destination tensor's format by a rule table (`quantize.format_for` on its canonical
    name; None: "keep", every tensor in its own dtype) and the bytes the dry run counts with it,
    per destination tensor (the plan's segments' `tensor` index):

    - the destination model: `buffer_bytes`, each local tensor's pieces by `cost.box_bytes`;
    - a segment (`segment_bytes`): what it moves as planned (the source's bytes: what packs,
      local copies and IPC reads read, and IPC carries over NVLink), what crosses NCCL (`wire`:
      quantized where `wire_quantized`, else the source's bytes) and what lands in the
      destination (`written`: its elements in the destination's format plus the scales whose
      block starts in it, so that however buckets cut a piece its blocks count once).

    `wire_quantized`: the tensor's format has scales and every piece of it on both sides holds
    whole blocks (`quantize.shard_cut` None), so every box sent can be quantized by its sender;
    otherwise boxes may cut a block and the tensor crosses as the source's bytes."""

    def __init__(self, src: LayoutTables, dst: LayoutTables, rules=None):
        self.src, self.dst, self.rules = src, dst, rules
        self.itemsize = dst.tensors[:, TENSOR["itemsize"]]
        self.formats = [quantize.KEEP if rules is None else quantize.format_for(n, rules)
                        for n in dst.names]
        sizes = [format_size(f, i) for f, i in zip(self.formats, self.itemsize.tolist())]
        self.element = np.array([z.element for z in sizes], dtype=np.int64)
        self.scale = np.array([z.scale for z in sizes], dtype=np.int64)
        self.block = np.array([z.block for z in sizes], dtype=np.int64).reshape(-1, 2)
        self.quantized = self.scale > 0
        # Another format than the source's: such a tensor cannot share the source's storage.
        self.transformed = self.quantized | (self.element != self.itemsize)
        shapes = dst.tensors[:, span(TENSOR, "shape")]
        for t in np.flatnonzero(self.quantized):
            try:
                quantize.scale_shape(shapes[t, :dst.tensors[t, TENSOR["ndim"]]], self.formats[t])
            except ValueError as exc:
                raise ValueError(f"{dst.names[t]}: {exc}") from None
        index = {n: i for i, n in enumerate(dst.names)}
        self._dst_of = {"dst": np.arange(len(dst.names)),
                        "src": np.array([index.get(n, -1) for n in src.names], dtype=np.int64)}
        self.wire_quantized = self.quantized & ~self._cuts("src") & ~self._cuts("dst")
        self._lookup: dict[str, tuple] = {}

    @property
    def identity(self) -> bool:
        return not self.transformed.any()

    def _tables(self, side: str) -> LayoutTables:
        return self.src if side == "src" else self.dst

    def _cuts(self, side: str) -> np.ndarray:
        """Per destination tensor: a piece of it on `side` cuts a block of its format."""
        tables, dst_of = self._tables(side), self._dst_of[side]
        pieces = tables.pieces
        t = dst_of[pieces[:, PIECE["tensor"]]]
        mine = np.flatnonzero((t >= 0) & self.quantized[np.maximum(t, 0)])
        cut = np.zeros(len(self.formats), dtype=bool)
        if not len(mine):
            return cut
        start, extent = span(PIECE, "start"), span(PIECE, "extent")
        boxes = np.column_stack([t[mine], pieces[mine, start][:, :2], pieces[mine, extent][:, :2]])
        shapes = self.dst.tensors[:, span(TENSOR, "shape")]
        for tensor, r0, c0, rows, cols in np.unique(boxes, axis=0).tolist():  # few distinct
            if quantize.shard_cut(shapes[tensor, :2], (r0, rows, c0, cols), self.formats[tensor]):
                cut[tensor] = True
        return cut

    def buffer_bytes(self) -> np.ndarray:
        """Bytes of every destination local tensor in its format: numel x itemsize where the
        format is kept, else the sum of its pieces' `cost.box_bytes`."""
        tables = self.dst
        out = tables.buffers[:, BUFFER["numel"]] * tables.buffers[:, BUFFER["itemsize"]]
        piece, buffer = holder_pairs(tables)
        t = tables.pieces[piece, PIECE["tensor"]]
        moved = self.transformed[t]
        if not moved.any():
            return out
        piece, buffer, t = piece[moved], buffer[moved], t[moved]
        rows = tables.pieces[piece]
        extent = rows[:, span(PIECE, "extent")]
        ndim = tables.tensors[t, TENSOR["ndim"]]
        numel = np.where(np.arange(extent.shape[1]) < ndim[:, None], extent, 1).prod(axis=1)
        nbytes = numel * self.element[t]
        q = self.quantized[t]
        scales = box_scales(rows[q][:, span(PIECE, "start")][:, :2],
                            extent[q][:, :2], self.block[t[q]])
        nbytes[q] += scales * self.scale[t[q]]
        out = out.copy()
        out[np.unique(buffer)] = 0
        np.add.at(out, buffer, nbytes)
        return out

    def _pieces_of(self, side: str) -> tuple:
        """Sorted (buffer, local offset) keys of every holder of every piece, and the piece."""
        if side not in self._lookup:
            piece, buffer = holder_pairs(self._tables(side))
            keys = buffer * _OFFSETS + self._tables(side).pieces[piece, PIECE["local_offset"]]
            order = np.argsort(keys, kind="stable")
            self._lookup[side] = keys[order], piece[order]
        return self._lookup[side]

    def segment_bytes(self, segments: np.ndarray, side: str) -> tuple[np.ndarray, ...]:
        """(moved, wire, written) bytes of each segment, read on `side` ("src": a send's, whose
        source is a local tensor; "dst": a receive's or a local copy's)."""
        rows, row_bytes = segments[:, SEG["rows"]], segments[:, SEG["row_bytes"]]
        t = segments[:, SEG["tensor"]]
        moved = rows * row_bytes
        elements = moved // self.itemsize[t]
        written, wire = elements * self.element[t], moved.copy()
        q = np.flatnonzero(self.quantized[t])
        if len(q):
            scales = self._block_starts(segments[q], side) * self.scale[t[q]]
            written[q] += scales
            quantized = elements[q] * self.element[t[q]] + scales
            wire[q] = np.where(self.wire_quantized[t[q]], quantized, moved[q])
        return moved, wire, written

    def _block_starts(self, segments: np.ndarray, side: str) -> np.ndarray:
        """How many blocks (of the tensor's format) start in each segment: have their first
        element, the top-left one of the global 2-D tensor, among the segment's. A segment is
        `rows` runs of `row_bytes`, `pitch` apart, in one 2-D piece of a local tensor stored row
        major: a run may cover several of its rows (coalesced), rows > 1 runs one row each."""
        tables = self._tables(side)
        t = segments[:, SEG["tensor"]]
        item = self.itemsize[t]
        keys, piece_of = self._pieces_of(side)
        buffer, offset = segments[:, SEG[f"{side}_buffer"]], segments[:, SEG[f"{side}_offset"]]
        element = offset // item
        at = np.searchsorted(keys, buffer * _OFFSETS + element, side="right") - 1
        piece = tables.pieces[piece_of[np.maximum(at, 0)]]
        start, extent, stride = (piece[:, span(PIECE, f)] for f in ("start", "extent", "stride"))
        width = stride[:, 0]  # elements per local row
        i0, j0 = np.divmod(element - piece[:, PIECE["local_offset"]], np.maximum(width, 1))
        n, rows = segments[:, SEG["row_bytes"]] // item, segments[:, SEG["rows"]]
        pitch = segments[:, SEG[f"{side}_pitch"]] // item
        bad = ((at < 0) | (keys[np.maximum(at, 0)] // _OFFSETS != buffer) | (stride[:, 1] != 1)
               | (extent[:, 1] != width) | (offset % item != 0)
               | ((rows > 1) & ((j0 + n > width) | (pitch != width))))
        s0, s1 = start[:, 0], start[:, 1]
        r0, c0 = s0 + i0, s1 + j0
        br, bc = self.block[t, 0], self.block[t, 1]

        def first_rows(a, b):  # rows in [a, b) where a block of the piece starts
            return _block_firsts(a, b, br, s0)

        def first_cols(a, b):
            return _block_firsts(a, b, bc, s1)
        # One run of n elements from local (i0, j0): the rest of row i0, whole rows, a tail.
        head = np.minimum(n, width - j0)
        whole, tail = np.divmod(n - head, np.maximum(width, 1))
        one_run = (first_rows(r0, r0 + 1) * first_cols(c0, c0 + head)
                   + first_rows(r0 + 1, r0 + 1 + whole) * first_cols(s1, s1 + width)
                   + (tail > 0) * first_rows(r0 + 1 + whole, r0 + 2 + whole)
                   * first_cols(s1, s1 + tail))
        last = np.where(rows > 1, i0 + rows - 1, i0 + whole + (tail > 0))
        # Several runs, one local row each, one row apart.
        runs = first_rows(r0, r0 + rows) * first_cols(c0, c0 + n)
        bad |= last >= extent[:, 0]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{self.dst.names[t[i]]}: the dry run cannot count the "
                             f"{self.formats[t[i]]} scales of segment "
                             f"{dict(zip(SEG, segments[i].tolist()))} on the {side} side "
                             "(a row-major 2-D piece, runs within its rows, is what it reads)")
        return np.where(rows > 1, runs, one_run)


_OFFSETS = 1 << 40  # (buffer, element offset) keys: offsets below 2^40 elements


def _block_firsts(a, b, step, first):
    """How many of [a, b) (elementwise) are where a block of a piece starting at `first` starts
    along one dimension: multiples of `step`, and `first` itself (a block cut by the piece's
    edge starts there for the piece)."""
    multiples = np.maximum(-(-b // step) - -(-a // step), 0)
    return multiples + ((first % step != 0) & (a <= first) & (first < b))


def plan_tables(cfg: KimiK2Config, src: ParallelGrid, dst: ParallelGrid, topo: Topology,
                bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                src_tables: LayoutTables | None = None, dst_format: str = "bf16") -> dict:
    """Both sides' tables, every rank's plan, the ranks and the destination's formats
    ({"src", "dst", "plans", "world", "formats"}: a `TensorFormats` of `dst_format`);
    `src_tables`: the source's, already built for `src` (the advisor plans many destinations
    beside one)."""
    # The planner's tables built with NumPy: a Layout of 2048 GPUs would take a minute.
    src_tables = src_tables if src_tables is not None else kimi_k2_tables(cfg, src)
    dst_tables = kimi_k2_tables(cfg, dst)
    plans = Planner(src_tables, dst_tables, bucket_bytes, topo.gpus_per_node).plan_all()
    world = max(src.offset + src.world, dst.offset + dst.world)
    return {"src": src_tables, "dst": dst_tables, "plans": plans, "world": world,
            "formats": TensorFormats(src_tables, dst_tables, dst_rules(dst_format)),
            "dst_format": dst_format}


def aliases_per_rank(planned: dict) -> dict[int, dict[int, int]]:
    """{rank: {destination buffer: source buffer}} that plan(..., alias=True) would share
    (aliasing.aliasable_buffers on each rank's plan; none where a rank holds one side only,
    nor for a destination tensor in another format than the source's)."""
    src, dst = TableBuffers(planned["src"]), TableBuffers(planned["dst"])
    out = {r: aliasable_buffers(p, src, dst) for r, p in planned["plans"].items()}
    formats = planned.get("formats")
    if formats is None or formats.identity:
        return out
    transformed = formats.transformed[buffer_tensors(planned["dst"])]
    return {r: {d: s for d, s in shared.items() if not transformed[d]}
            for r, shared in out.items()}


def dry_run(cfg: KimiK2Config, src: ParallelGrid, dst: ParallelGrid, topo: Topology,
            bucket_bytes: int = DEFAULT_BUCKET_BYTES, headroom: float = 0.9,
            transport: str = "auto", alias: bool = False, dst_format: str = "bf16") -> dict:
    """Every rank's figures (`RankFigures`), the floor and the prediction of a refit whose
    plan takes `transport` (refit_engine.plan's option: auto, nccl, ipc) and `alias`
    (plan(alias=True): shared local tensors counted once and never copied; collocated only),
    into a destination model in `dst_format` (`DST_FORMATS`: bf16, fp8)."""
    check_transport(topo, transport)
    dst_rules(dst_format)
    collocated = src.offset == dst.offset
    alias = alias and collocated
    check_fits(cfg, src, dst, topo, collocated, headroom, bucket_bytes, transport, alias,
               dst_format)
    planned = plan_tables(cfg, src, dst, topo, bucket_bytes, dst_format=dst_format)
    return figures(planned, topo, transport, headroom, aliases_per_rank(planned) if alias else None)


def _per_peer(segments: np.ndarray, nbytes: np.ndarray) -> dict[int, int]:
    peers = segments[:, SEG["peer"]]
    return {int(p): int(nbytes[peers == p].sum()) for p in np.unique(peers)}


def transformed_bytes(p: RankPlan, formats: TensorFormats, transports: dict[int, str]):
    """A rank's bytes where the destination's format differs (`TensorFormats`): {peer: {"sent",
    "received"}} as they cross the link (quantized to NCCL peers, the source's bytes over IPC),
    and `RankFigures`' written / read fields for its local copies, IPC reads, unpacks, packs."""
    ipc = np.array([q for q, t in transports.items() if t == "ipc"], dtype=np.int64)
    out = {}
    per_peer: dict[int, dict[str, int]] = {}
    for kind, segments, side in (("sent", p.send, "src"), ("received", p.recv, "dst")):
        moved, wire, written = formats.segment_bytes(segments, side)
        over_ipc = np.isin(segments[:, SEG["peer"]], ipc)
        for peer, n in _per_peer(segments, np.where(over_ipc, moved, wire)).items():
            per_peer.setdefault(peer, {"sent": 0, "received": 0})[kind] = n
        if kind == "sent":
            out["pack_read"] = int(moved[~over_ipc].sum())
        else:
            out["unpack_written"] = int(written[~over_ipc].sum())
            out["ipc_written"] = int(written[over_ipc].sum())
    out["local_written"] = int(formats.segment_bytes(p.local, "dst")[2].sum())
    return per_peer, out


def figures(planned: dict, topo: Topology, transport: str = "auto", headroom: float = 0.9,
            aliases: dict[int, dict[int, int]] | None = None) -> dict:
    """The dry run's result from `plan_tables`' plans. `aliases`: `aliases_per_rank`'s (None:
    aliasing off): their destination bytes count once in memory (`RankFigures.aliased_bytes`)
    and leave the local copies, hence the prediction. The destination's formats are
    `planned["formats"]`'s (a `TensorFormats`; absent: every tensor in its own dtype)."""
    src_tables, dst_tables, plans = planned["src"], planned["dst"], planned["plans"]
    world = planned["world"]
    formats = planned.get("formats")
    formats = None if formats is None or formats.identity else formats
    src_w = _weights_per_rank(src_tables, world)
    dst_bytes = (formats.buffer_bytes() if formats else
                 dst_tables.buffers[:, BUFFER["numel"]] * dst_tables.buffers[:, BUFFER["itemsize"]])
    dst_w = np.bincount(dst_tables.buffers[:, BUFFER["rank"]], weights=dst_bytes,
                        minlength=world)[:world].astype(np.int64).tolist()
    ranks, buckets = [], {}
    for r in range(world):
        p = plans.get(r)
        if p is None:
            ranks.append(RankFigures(r, src_bytes=src_w[r], dst_bytes=dst_w[r]))
            continue
        shared = (aliases or {}).get(r, {})
        aliased = int(dst_bytes[list(shared)].sum()) if shared else 0
        p = without_buffers(p, shared)  # aliased local tensors: nothing copies them
        per_peer = p.bytes_per_peer()
        transports = {peer: topo.peer_transport(r, peer, transport) for peer in per_peer}
        peers = staged_peers(transports)
        messages = sum(len(staged_messages(m, peers)) for m in (p.send_messages, p.recv_messages))
        written = {}
        if formats:
            per_peer, written = transformed_bytes(p, formats, transports)
        ranks.append(rank_figures(r, p.bytes_local, per_peer, topo, transports,
                                  src_bytes=src_w[r], dst_bytes=dst_w[r],
                                  staging_bytes=staging_bytes(p, transports), messages=messages,
                                  aliased_bytes=aliased, **written))
        buckets[r] = staged_buckets(p, transports)
    budget = topo.memory_gib * headroom * GIB
    worst = max(ranks, key=lambda f: f.total_bytes)
    result = {"ranks": ranks, "floor": floor(ranks, topo), "topology": topo,
              "transport": transport, "predicted": predict(ranks, topo, buckets),
              "alias": aliases is not None, "fits": worst.total_bytes <= budget,
              "dst_format": planned.get("dst_format", "bf16")}
    if not result["fits"]:
        result["reason"] = (
            f"does not fit: rank {worst.rank} needs {worst.total_bytes / GIB:.1f} GiB (source "
            f"{worst.src_bytes / GIB:.1f} + destination {worst.dst_bytes / GIB:.1f}"
            + (f" - aliased {worst.aliased_bytes / GIB:.1f}" if aliases is not None else "")
            + f" + staging {worst.staging_bytes / GIB:.1f} GiB, the plan's) but "
            f"{topo.memory_gib:.0f} GiB each, {budget / GIB:.0f} usable at {headroom:.0%}")
    return result


def parse_grid(text: str, world: int, offset: int = 0) -> ParallelGrid:
    return ParallelGrid(world, offset=offset, **parse_layout_spec(text))


def report(result: dict) -> str:
    ranks, topo = result["ranks"], result["topology"]
    worst = max(ranks, key=lambda f: f.total_bytes)

    def most(what: str, label: str) -> str:  # the largest figure over ranks, and whose it is
        top = max(ranks, key=lambda f: getattr(f, what))
        return f"{label + ' (rank ' + str(top.rank) + ')':<34}{getattr(top, what) / GIB:>10.2f}"
    fl = result["floor"]
    intra, inter = topo.intra_link, topo.inter_link
    transport = result.get("transport", "nccl")  # results from before IPC: every peer staged
    lines = [
        f"transport {describe_transport(topo, transport)}" + _ipc_refusal(ranks, topo, transport),
        *([f"destination format {DST_FORMAT_HELP[result['dst_format']]}"]
          if result.get("dst_format", "bf16") != "bf16" else []),
        f"{'per GPU (max over ranks)':<34}{'GiB':>10}",
        f"{'source weights':<34}{max(f.src_bytes for f in ranks) / GIB:>10.2f}",
        f"{'destination weights':<34}{max(f.dst_bytes for f in ranks) / GIB:>10.2f}",
        f"{'staging (2 x send + 2 x recv)':<34}{max(f.staging_bytes for f in ranks) / GIB:>10.2f}",
        *_aliased_lines(result),
        f"{'total (rank ' + str(worst.rank) + ')':<34}{worst.total_bytes / GIB:>10.2f}"
        f"   of {topo.memory_gib:.0f} GiB: {'fits' if result['fits'] else 'DOES NOT FIT'}",
        f"{'local copy (max)':<34}{max(f.local_bytes for f in ranks) / GIB:>10.2f}"
        + ("   (aliased bytes are not copied)" if result.get("alias") else ""),
        *_format_lines(result),
        most("sent_intra", f"sent over {intra}"), most("received_intra", f"received over {intra}"),
        most("received_ipc", "of which read over IPC"),
        most("sent_inter", f"sent over {inter}"), most("received_inter", f"received over {inter}"),
        f"predicted: {result['predicted']['seconds'] * 1e3:.2f} ms (rank "
        f"{result['predicted']['rank']}, {result['predicted']['term']})",
        f"floor: {fl['seconds'] * 1e3:.2f} ms (rank {fl['rank']}, {fl['term']}) on "
        f"{topo.describe(len(ranks))}: {intra} {topo.intra_node_gbps:g} GB/s, {inter} "
        f"{topo.inter_node_gbps:g} GB/s, copy {topo.copy_gbps:g} GB/s",
    ]
    return "\n".join(lines)


def _format_lines(result: dict) -> list[str]:
    """In another destination format: what local copies write (they read the source's)."""
    if result.get("dst_format", "bf16") == "bf16":
        return []
    ranks = result["ranks"]
    return [(f"{'  written in ' + result['dst_format'] + ' (max)':<34}"
             f"{max(f.local_write_bytes for f in ranks) / GIB:>10.2f}   (read as the source's)")]


def summary(result: dict) -> dict:
    """The dry run's key figures (--json): GiB per GPU, the largest over ranks; links in the
    busiest direction."""
    ranks = result["ranks"]
    worst = max(ranks, key=lambda f: f.total_bytes)

    def most(value) -> float:
        return max(value(f) for f in ranks) / GIB
    return {"fits": result["fits"], "floor_s": result["floor"]["seconds"],
            "predicted_s": result["predicted"]["seconds"],
            "predicted_term": result["predicted"]["term"],
            "dst_format": result.get("dst_format", "bf16"),
            "max_gpu_gib": worst.total_bytes / GIB,
            "max_src_gib": most(lambda f: f.src_bytes), "max_dst_gib": most(lambda f: f.dst_bytes),
            "max_staging_gib": most(lambda f: f.staging_bytes),
            "alias": result.get("alias", False),
            "max_aliased_gib": most(lambda f: f.aliased_bytes),
            "max_local_gib": most(lambda f: f.local_bytes),
            "max_local_written_gib": most(lambda f: f.local_write_bytes),
            "max_nvlink_gib": most(lambda f: max(f.sent_intra, f.received_intra)),
            "max_ipc_gib": most(lambda f: f.received_ipc),
            "max_network_gib": most(lambda f: max(f.sent_inter, f.received_inter)),
            "transport": result["transport"], "topology": asdict(result["topology"]),
            **({"reason": result["reason"]} if "reason" in result else {})}


def _aliased_lines(result: dict) -> list[str]:
    """With aliasing: how much each rank shares with the source (counted once, never copied)."""
    if not result.get("alias"):
        return []
    ranks = result["ranks"]
    top = max(ranks, key=lambda f: f.aliased_bytes)
    total = sum(f.aliased_bytes for f in ranks)
    dst = sum(f.dst_bytes for f in ranks)
    share = total / dst if dst else 0.0
    return [(f"{'aliased, counted once (rank ' + str(top.rank) + ')':<34}"
             f"{top.aliased_bytes / GIB:>10.2f}   {total / GIB:.1f} GiB over {len(ranks)} ranks: "
             f"{share:.1%} of the destination shares the source's storage")]


def _ipc_refusal(ranks: list[RankFigures], topo: Topology, transport: str) -> str:
    """What the library says of transport "ipc" on more than one node: it refuses the plan
    (refit_engine.peers.choose_transports); the figures count peers on other nodes over NCCL."""
    if transport != "ipc" or len(ranks) <= topo.gpus_per_node:
        return ""
    return ("\n  (refit_engine.plan(transport=\"ipc\") refuses ranks on more than one node: use "
            "auto; peers on other nodes are counted over NCCL here)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refit_engine.memory",
                                     description="Kimi K2 refit memory planner and dry run")
    parser.add_argument("--src", type=layout_arg, default="tp=8,ep=64",
                        help="source layout (default tp=8,ep=64)")
    parser.add_argument("--dst", type=layout_arg, default="tp=4,ep=128",
                        help="destination layout (default tp=4,ep=128)")
    parser.add_argument("--gpus", type=positive_int, default=128,
                        help="GPUs of each model (default 128)")
    parser.add_argument("--gpu", default="h100", choices=sorted(PRESETS),
                        help="topology preset: memory, bandwidths, GPUs per node (default h100)")
    parser.add_argument("--non-collocated", action="store_true",
                        help="destination on --gpus more GPUs after the source's")
    parser.add_argument("--layers", type=positive_int, default=61,
                        help="Kimi K2 layers (default 61, the published model)")
    parser.add_argument("--model", type=overrides_arg, default={},
                        help="Kimi K2 overrides, e.g. hidden=64,num_experts=8")
    parser.add_argument("--bucket-mib", type=positive_int, default=DEFAULT_BUCKET_BYTES >> 20,
                        help=f"largest message between two ranks in one bucket, MiB (default "
                             f"{DEFAULT_BUCKET_BYTES >> 20})")
    parser.add_argument("--headroom", type=positive_float, default=0.9,
                        help="fraction of GPU memory weights and staging may use (default 0.9)")
    parser.add_argument("--transport", default="auto", choices=TRANSPORTS,
                        help="the plan's transport: auto (the library's default: same-node peers "
                             "over CUDA IPC, other nodes over NCCL), nccl (every peer over NCCL: "
                             "the figures before IPC), ipc (same-node peers over IPC)")
    parser.add_argument("--alias", action="store_true",
                        help="plan(alias=True): destination tensors the plan fills byte for byte "
                             "from one source tensor of the same rank share its storage, counted "
                             "once and never copied (collocated only)")
    parser.add_argument("--dst-format", default="bf16", choices=sorted(DST_FORMATS),
                        help="the inference model's formats: " + "; ".join(
                            f"{k}: {v}" for k, v in DST_FORMAT_HELP.items()) + " (default bf16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--per-rank", action="store_true",
                        help="also print every rank's memory and bytes moved")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.headroom > 1:
        parser.error(f"--headroom is a fraction of GPU memory, at most 1, not {args.headroom}")
    try:
        cfg = KimiK2Config(**{"num_layers": args.layers, **args.model})
    except TypeError as exc:
        parser.error(f"--model: {exc}")
    try:
        src = parse_grid(args.src, args.gpus)
        dst = parse_grid(args.dst, args.gpus, offset=args.gpus if args.non_collocated else 0)
    except RefitError as exc:
        parser.error(f"{exc.reason} (--gpus {args.gpus})")
    if args.alias and args.non_collocated:
        parser.error("--alias: aliasing shares the storage of one rank's two models, so it needs "
                     "a collocated refit (not --non-collocated)")
    total = args.gpus * (2 if args.non_collocated else 1)
    topo = preset(args.gpu, total)
    try:
        check_transport(topo, args.transport)
    except ValueError as exc:
        parser.error(f"--transport: {exc} (--gpu {args.gpu})")
    try:
        result = dry_run(cfg, src, dst, topo, args.bucket_mib << 20, args.headroom,
                         args.transport, args.alias, args.dst_format)
    except RefitError as exc:
        print(f"refused: {exc.reason}", file=sys.stderr)
        if args.json:
            print(json.dumps({"fits": False, "reason": exc.reason}))
        return 2
    if args.json:
        print(json.dumps(summary(result)))
    else:
        print(f"Kimi K2 ({cfg.num_layers} layers) source {args.src} -> destination {args.dst} "
              f"on {topo.describe(total)} "
              f"({'non-collocated' if args.non_collocated else 'collocated'}"
              f"{', aliasing on' if args.alias else ''})")
        print(report(result))
        if "reason" in result:
            print(result["reason"])
        if args.per_rank:
            print(per_rank_table(result["ranks"], topo))
    return 0 if result["fits"] else 2


def per_rank_table(ranks: list[RankFigures], topo: Topology | None = None) -> str:
    intra = topo.intra_link if topo else "NVLink"
    head = (f"{'rank':>5}{'source GiB':>11}{'dest GiB':>10}{'aliased':>8}{'staging GiB':>12}"
            f"{'total GiB':>10}"
            f"{'local GiB':>10}{intra[:7] + ' out':>11}{intra[:7] + ' in':>10}{'IPC in':>8}"
            f"{'net out':>9}{'net in':>8}")
    rows = [head]
    for f in ranks:
        rows.append(f"{f.rank:>5}{f.src_bytes / GIB:>11.2f}{f.dst_bytes / GIB:>10.2f}"
                    f"{f.aliased_bytes / GIB:>8.2f}{f.staging_bytes / GIB:>12.2f}"
                    f"{f.total_bytes / GIB:>10.2f}"
                    f"{f.local_bytes / GIB:>10.2f}{f.sent_intra / GIB:>11.2f}"
                    f"{f.received_intra / GIB:>10.2f}{f.received_ipc / GIB:>8.2f}"
                    f"{f.sent_inter / GIB:>9.2f}"
                    f"{f.received_inter / GIB:>8.2f}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
