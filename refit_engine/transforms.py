"""Destinations in another format than their source: casts and FP8 while the refit copies.

A destination tensor may differ from its source in format (issue 16):

- a cast between float32, bfloat16 and float16 (`plan(..., cast=True)`): the destination has
  the other dtype;
- "fp8_block128": float8 e4m3 with one float32 scale_inv per 128 x 128 block of the global
  tensor (DeepSeek-V3 / Kimi K2 serving weights);
- "mxfp8": float8 e4m3 with one e8m0 scale per 32 consecutive elements of a row (OCP MX).

`refit_engine.quantize` defines every bit; the kernels (csrc/transform) produce exactly it.

How a plan carries a transform. The plan compiler plans bytes of one dtype per tensor, so the
destination is planned as a *carrier*: the same layout in the source's dtype (`carrier_entries`).
Its segments then say where each source element lands in the destination, in carrier bytes.
`RankTransforms` rewrites every segment that lands in a transformed local tensor into rows of
a transform table (csrc/transform/transform_table.h), which the executors run in place of the
plain copy, in the same pass (local copies, CUDA IPC reads, unpacks):

- fused: every segment into the local tensor covers whole blocks (fp8_block128: 128 x 128
  tiles of the global tensor; mxfp8: 32-element groups of a row; casts: always). Each segment
  is quantized on its way in: one pass, no extra memory.
- assembled: some segment cuts a block (its scale depends on elements from another segment).
  The segments land in a carrier tensor of the source dtype, and one more table row per
  matrix quantizes it after the refit's last copy (`finish_rows`).

A destination *shard* that cuts a block is refused at plan time on every rank
(`check_quantized_pieces`): its scales would depend on elements another rank holds.

Quantized local tensors are 2-D, or batches of 2-D matrices [..., R, C] whose blocks are the
global tensor's blocks; each has a scale tensor [..., ceil(R/128), ceil(C/128)] float32
(fp8_block128) or [..., R, ceil(C/32)] uint8 (mxfp8), `scale_shape`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from refit_engine import _core, arrays, dtypes, quantize
from refit_engine.errors import RefitError
from refit_engine.tables import PIECE, SEG, span

__all__ = ["PLAIN_FORMATS", "QUANTIZED_FORMATS", "RankTransforms", "TensorFormat", "TransformRows",
           "buffer_formats", "carrier_entries", "check_quantized_pieces", "checked_scale", "dtype_of", "new_scale",
           "with_fp8_dtype",
           "scale_shape"]

# The plain formats of dtypes a transform reads or writes.
PLAIN_FORMATS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
QUANTIZED_FORMATS = quantize.QUANTIZED  # ("fp8_block128", "mxfp8")
_DTYPE_OF = {v: k for k, v in PLAIN_FORMATS.items()}
_QUANTIZED_DTYPES = ("float8_e4m3fn", "uint8")  # e4m3 bits (NumPy and CuPy have no float8)
SCALE_DTYPES = {"fp8_block128": "float32", "mxfp8": "uint8"}
# Block side along (rows, columns) of the global tensor.
BLOCK = {"fp8_block128": (quantize.BLOCK, quantize.BLOCK), "mxfp8": (1, quantize.MX_GROUP)}
_CODE = dict(_core.TRANSFORM_FORMATS)
_FIELDS = tuple(_core.TRANSFORM_FIELDS)


@dataclass(frozen=True)
class TensorFormat:
    """What a destination tensor holds: its source's plain format `src` turned into `dst`."""

    src: str
    dst: str

    @property
    def quantized(self) -> bool:
        return self.dst in QUANTIZED_FORMATS

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst}"


def dtype_of(fmt: str) -> str:
    """The dtype name of a plain format ("bf16" -> "bfloat16")."""
    return _DTYPE_OF[fmt]


def scale_shape(shape, fmt: str) -> tuple[int, ...]:
    """The scale tensor's shape for a quantized local tensor of `shape` ([..., R, C])."""
    if fmt not in QUANTIZED_FORMATS:
        raise ValueError(f"{fmt!r} has no scales (formats with scales: {QUANTIZED_FORMATS})")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"{fmt} needs a 2-D (or batched 2-D) tensor, not shape {shape}")
    *batch, r, c = shape
    return (*batch, *quantize.scale_shape((r, c), fmt))


def new_scale(tensor, fmt: str):
    """An uninitialized scale tensor for quantized local tensor `tensor`, on its device."""
    shape = scale_shape(tensor.shape, fmt)
    if arrays.kind_of(tensor) == "torch":
        dtype = torch.float32 if SCALE_DTYPES[fmt] == "float32" else torch.uint8
        return torch.empty(shape, dtype=dtype, device=tensor.device)
    if arrays.kind_of(tensor) == "numpy":
        return np.empty(shape, dtype=SCALE_DTYPES[fmt])
    import cupy  # optional: only a CuPy array's owner has it
    return cupy.empty(shape, dtype=SCALE_DTYPES[fmt])


def checked_scale(name: str, key: str, tensor, fmt, scale, earlier):
    """The scale tensor of quantized destination `tensor` (allocated when `scale` is None),
    checked against the format; RefitError naming the tensor otherwise."""
    if fmt not in QUANTIZED_FORMATS:
        raise RefitError(f"format must be None (the dtype's own) or one of {QUANTIZED_FORMATS}, "
                         f"not {fmt!r} (a cast needs no format: give the tensor that dtype)",
                         tensor=name)
    try:
        info = arrays.info(tensor)
    except (TypeError, ValueError) as exc:
        raise RefitError(f"local tensor cannot be refit: {exc}", tensor=name) from exc
    if info.dtype not in _QUANTIZED_DTYPES:
        raise RefitError(f"a {fmt} destination holds float8_e4m3fn (or uint8) elements, not "
                         f"{info.dtype}", tensor=name)
    try:
        expected = scale_shape(info.shape, fmt)
    except ValueError as exc:
        raise RefitError(str(exc), tensor=name) from None
    if scale is None:
        return earlier if earlier is not None else new_scale(tensor, fmt)
    try:
        sinfo = arrays.info(scale)
    except (TypeError, ValueError) as exc:
        raise RefitError(f"scale tensor cannot be written: {exc}", tensor=name) from exc
    if earlier is not None and earlier is not scale:
        raise RefitError(f"local tensor '{key}' is given two different scale tensors",
                         tensor=name)
    if tuple(sinfo.shape) != expected or sinfo.dtype != SCALE_DTYPES[fmt]:
        raise RefitError(f"{fmt} scale tensor must be {SCALE_DTYPES[fmt]} of shape {expected} "
                         f"for a local tensor of shape {tuple(info.shape)}, not {sinfo.dtype} "
                         f"of shape {tuple(sinfo.shape)}", tensor=name)
    if not sinfo.contiguous:
        raise RefitError("scale tensor must be contiguous", tensor=name)
    if sinfo.device != info.device:
        raise RefitError(f"scale tensor is on {sinfo.device}, its tensor on {info.device}",
                         tensor=name)
    return scale


def carrier_entries(src_per_rank, dst_per_rank, cast: bool = False):
    """The destination's entries as the plan compiler plans them (a transformed tensor in its
    source's dtype), and {tensor name: TensorFormat} of every transformed tensor. Raises
    RefitError (tensor, ranks) for a pair of formats no transform makes. cast=False: float
    dtypes that differ are not a cast (the plan compiler refuses them)."""
    src_dtype = {}
    for rank, entries in src_per_rank:
        for e in entries:
            if e.format is not None:
                raise RefitError(f"format={e.format!r} describes a destination; this is a source "
                                 "tensor, read in its own dtype (a source held in FP8 is not a "
                                 "transform refit_engine makes)", tensor=e.name, ranks=[rank])
            src_dtype.setdefault(e.name, e.dtype)
    formats: dict[str, TensorFormat] = {}
    # (rank, key) -> (format or None, a tensor): a local tensor holds tensors of one transform.
    held: dict[tuple[int, str], tuple[TensorFormat | None, str]] = {}
    out = []
    for rank, entries in dst_per_rank:
        mine = []
        for e in entries:
            fmt = _format_of(e, src_dtype.get(e.name), rank, cast)
            other = held.setdefault((rank, e.key), (fmt, e.name))
            if other[0] != fmt:
                def what(f):
                    return "no transform" if f is None else str(f)
                raise RefitError(f"local tensor '{e.key}' holds tensors of different transforms "
                                 f"({other[1]}: {what(other[0])}, {e.name}: {what(fmt)}); a "
                                 "local tensor's pieces share one", tensor=e.name, ranks=[rank])
            if fmt is None:
                mine.append(e)
                continue
            seen = formats.setdefault(e.name, fmt)
            if seen != fmt:
                raise RefitError(f"ranks give this tensor different formats ({seen} and {fmt})",
                                 tensor=e.name, ranks=[rank])
            mine.append(dataclasses.replace(e, dtype=dtype_of(fmt.src), format=None))
        out.append((rank, mine))
    return out, formats


def with_fp8_dtype(per_rank):
    """Entries of quantized destinations held as uint8 given the float8_e4m3fn dtype they hold
    (NumPy and CuPy have no float8), so ranks holding either describe the same tensor."""
    return [(rank, [dataclasses.replace(e, dtype="float8_e4m3fn")
                    if e.format in QUANTIZED_FORMATS and e.dtype == "uint8" else e
                    for e in entries]) for rank, entries in per_rank]


def buffer_formats(layout, formats: dict[str, TensorFormat], rank: int | None = None):
    """{buffer index: TensorFormat} of the transformed local tensors (of `rank`, or all).
    Vectorized over the pieces: a cluster-scale layout has hundreds of thousands."""
    if not formats:
        return {}
    tables = layout.tables()
    kinds = sorted(set(formats.values()), key=str)
    kind_of = {f: i for i, f in enumerate(kinds)}
    per_tensor = np.array([kind_of.get(formats.get(n), -1) for n in tables.names], dtype=np.int64)
    pieces = tables.pieces
    kind = per_tensor[pieces[:, PIECE["tensor"]]] if len(pieces) else np.zeros(0, np.int64)
    counts = pieces[:, PIECE["holders_count"]] if len(pieces) else np.zeros(0, np.int64)
    firsts = pieces[:, PIECE["holders_first"]] if len(pieces) else np.zeros(0, np.int64)
    mine = kind >= 0
    kind, counts, firsts = kind[mine], counts[mine], firsts[mine]
    # Every holder of every transformed piece: its buffer and the piece's format.
    owner = np.repeat(np.arange(len(kind)), counts)
    within = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
    buffers = tables.holders[firsts[owner] + within] if len(owner) else np.zeros(0, np.int64)
    kinds_of_buffer = kind[owner]
    if rank is not None and len(buffers):
        ranks = np.array([b.rank for b in layout.buffers], dtype=np.int64)
        keep = ranks[buffers] == rank
        buffers, kinds_of_buffer = buffers[keep], kinds_of_buffer[keep]
    return {int(b): kinds[int(k)] for b, k in zip(buffers.tolist(), kinds_of_buffer.tolist())}


def _format_of(e, src_dtype: str | None, rank: int, cast: bool) -> TensorFormat | None:
    """The transform destination entry `e` asks for, or None (no transform: the plan compiler
    compares the dtypes itself, and a tensor without a source is its error to report)."""
    if src_dtype is None or (e.format is None and e.dtype == src_dtype):
        return None
    if e.format is None and (not cast or e.dtype not in PLAIN_FORMATS
                             or src_dtype not in PLAIN_FORMATS):
        return None  # not a cast: "dtype differs between source and destination"
    if src_dtype not in PLAIN_FORMATS:
        raise RefitError(f"{e.format} destination needs a float32, bfloat16 or float16 source, "
                         f"not {src_dtype}", tensor=e.name, ranks=[rank])
    dst = e.format or PLAIN_FORMATS[e.dtype]
    if dst in QUANTIZED_FORMATS and len(e.global_shape) != 2:
        raise RefitError(f"{dst} quantizes 2-D weights; this tensor has shape "
                         f"{tuple(e.global_shape)}", tensor=e.name, ranks=[rank])
    return TensorFormat(PLAIN_FORMATS[src_dtype], dst)


def matrix_of(shape) -> tuple[int, int]:
    """(rows, columns) of the 2-D matrices a local tensor of `shape` is made of (a 1-D one is
    one row, a 0-D one element)."""
    if len(shape) >= 2:
        return int(shape[-2]), int(shape[-1])
    return 1, int(shape[0]) if len(shape) else 1


def check_quantized_pieces(layout, formats: dict[str, TensorFormat]) -> None:
    """Every piece of a quantized tensor lies in its local tensor as rows of one matrix whose
    blocks are the global tensor's, and cuts no block: else RefitError naming the tensor,
    its holders and the sizes (the same on every rank: from the gathered layout)."""
    tables = layout.tables()
    names, pieces, holders = tables.names, tables.pieces, tables.holders
    for p in range(len(pieces)):
        row = pieces[p]
        name = names[int(row[PIECE["tensor"]])]
        fmt = formats.get(name)
        if fmt is None or not fmt.quantized:
            continue
        first, count = int(row[PIECE["holders_first"]]), int(row[PIECE["holders_count"]])
        buffers = [layout.buffers[int(b)] for b in holders[first:first + count]]
        ranks = sorted({b.rank for b in buffers})
        start, extent = row[span(PIECE, "start")][:2], row[span(PIECE, "extent")][:2]
        stride = row[span(PIECE, "stride")][:2]
        shape = layout.tensor(name).shape
        box = (int(start[0]), int(extent[0]), int(start[1]), int(extent[1]))
        cut = quantize.shard_cut(shape, box, fmt.dst)
        if cut:
            raise RefitError(f"destination shard cuts a block, so its scales would depend on "
                             f"elements other ranks hold: {cut}", tensor=name, ranks=ranks)
        for b in buffers:
            rows, cols = matrix_of(b.shape)
            offset = int(row[PIECE["local_offset"]])
            r, c = (offset // cols) % rows, offset % cols
            block_r, block_c = BLOCK[fmt.dst]
            problem = None
            if len(b.shape) < 2:
                problem = f"is {len(b.shape)}-D; a {fmt.dst} local tensor is [..., rows, cols]"
            elif int(stride[1]) != 1 or int(stride[0]) != cols:
                problem = (f"holds the piece with element strides {tuple(int(s) for s in stride)}"
                           f"; {fmt.dst} needs its rows as rows of the local matrix ({cols}, 1)")
            elif r + box[1] > rows or c + box[3] > cols:
                problem = "holds the piece across two of its matrices"
            elif (r - box[0]) % block_r or (c - box[2]) % block_c:
                problem = (f"holds the piece at local row {r}, column {c}, global row {box[0]}, "
                           f"column {box[2]}: its blocks would not be the tensor's "
                           f"{block_r} x {block_c} blocks")
            elif ((box[0] + box[1]) % block_r and r + box[1] != rows) or (
                    (box[2] + box[3]) % block_c and c + box[3] != cols):
                problem = "ends the piece in a partial block short of its own edge"
            if problem:
                raise RefitError(f"{fmt.dst} destination local tensor '{b.key}' of shape "
                                 f"{tuple(b.shape)} {problem}", tensor=name, ranks=[b.rank])


@dataclass
class Target:
    """One transformed destination local tensor of this rank."""

    buffer: int
    key: str
    fmt: TensorFormat
    shape: tuple[int, ...]
    address: int = 0        # of the destination tensor (its real dtype)
    scale: int = 0          # of its scale tensor
    carrier: object = None  # assembled: the source-dtype tensor the copies land in

    @property
    def matrix(self) -> tuple[int, int]:
        return matrix_of(self.shape)

    @property
    def in_size(self) -> int:
        """Bytes of a source element."""
        return dtypes.itemsize(dtype_of(self.fmt.src))

    @property
    def out_size(self) -> int:
        """Bytes of a destination element (e4m3: one)."""
        return 1 if self.fmt.quantized else dtypes.itemsize(dtype_of(self.fmt.dst))

    def scale_at(self, b: int, r0: int, c0: int) -> tuple[int, int]:
        """(byte offset in the scale tensor of the block or group holding element (r0, c0) of
        matrix b, bytes between scale rows)."""
        mr, mc = self.matrix
        sr, sc = quantize.scale_shape((mr, mc), self.fmt.dst)
        br, bc = BLOCK[self.fmt.dst]
        ssize = dtypes.itemsize(SCALE_DTYPES[self.fmt.dst])
        return ((b * sr + r0 // br) * sc + c0 // bc) * ssize, sc * ssize


class RankTransforms:
    """This rank's transformed destination local tensors, and the table rows that fill them.

    Built once per plan after binding; the executors ask it to split each of their copy parts
    (source addresses and segments whose destination offsets are carrier bytes) into the
    plain copies and the transform rows (`split`), and for the rows that quantize assembled
    tensors at the end (`finish_rows`)."""

    def __init__(self, plan, dst_layout, formats: dict[str, TensorFormat], dst_tensors: dict,
                 scales: dict, make_carrier):
        """plan: this rank's RankPlan (carrier offsets); dst_layout: the real destination
        layout; dst_tensors: buffer index -> bound tensor; scales: key -> scale tensor;
        make_carrier(nbytes) -> a tensor of that many bytes on the destination's device."""
        self.targets: dict[int, Target] = {}
        self.num_dst_buffers = len(dst_layout.buffers)
        for index, fmt in buffer_formats(dst_layout, formats, plan.rank).items():
            meta = dst_layout.buffers[index]
            t = Target(index, meta.key, fmt, tuple(meta.shape))
            t.address = arrays.info(dst_tensors[index]).address
            if fmt.quantized:
                t.scale = arrays.info(scales[meta.key]).address
            self.targets[index] = t
        self.carriers = []
        segments = np.concatenate([plan.local, plan.recv]) if len(plan.recv) else plan.local
        for t in self.targets.values():
            if not self._fusable(t, segments):
                t.carrier = make_carrier(math.prod(t.shape) * t.in_size)
                self.carriers.append(t.carrier)

        self.wire_targets: dict = {}  # every rank's Target whose pieces travel transformed
        self.plan_of = None           # rank -> its RankPlan (the senders' view of receivers)

    @property
    def fused(self) -> set[int]:
        """This rank's transformed local tensors filled in the copies' own pass."""
        return {b for b, t in self.targets.items() if t.carrier is None}

    def connect(self, wire_targets: dict, plan_of) -> None:
        """What the wire needs beyond this rank (refit.plan, after every rank's `fused` was
        gathered): see refit_engine.wire."""
        self.wire_targets, self.plan_of = wire_targets, plan_of

    @property
    def assembled(self) -> list[str]:
        return [t.key for t in self.targets.values() if t.carrier is not None]

    @property
    def carrier_bytes(self) -> int:
        return sum(int(c.numel() * c.element_size()) for c in self.carriers)

    def bases(self, dst_addresses: np.ndarray) -> np.ndarray:
        """The destination address table the executors use: each assembled tensor's carrier
        in its place (plain copies land there), then each
        transformed tensor itself and its scale tensor, where copies of pieces transformed by
        their sender land."""
        n = len(dst_addresses)
        table = np.zeros(3 * n, dtype=np.int64)
        table[:n] = dst_addresses
        for t in self.targets.values():
            if t.carrier is not None:
                table[t.buffer] = t.carrier.data_ptr()
            table[n + t.buffer] = t.address
            table[2 * n + t.buffer] = t.scale
        return table

    @staticmethod
    def _fusable(t: Target, segments: np.ndarray) -> bool:
        """Whether every segment into `t` can be transformed on its own: it holds whole
        elements (a bucket may end inside one: the plan compiler cuts bytes) and, quantized,
        whole blocks."""
        mine = segments[segments[:, SEG["dst_buffer"]] == t.buffer]
        isz = t.in_size
        if len(mine) and (np.any(mine[:, SEG["dst_offset"]] % isz)
                          or np.any(mine[:, SEG["row_bytes"]] % isz)
                          or np.any((mine[:, SEG["dst_pitch"]] % isz) & (mine[:, SEG["rows"]] > 1))
                          or np.any(mine[:, SEG["src_offset"]] % isz)):
            return False
        if not t.fmt.quantized:
            return True
        return all(whole(t, rect) for seg in mine for rect in rectangles(seg, t.matrix, isz))

    def split(self, src: np.ndarray, segments: np.ndarray):
        """(plain: a boolean mask of `segments` still copied as they are, rows: transform table
        columns) for one copy part; src: each segment's absolute source address. Segments into
        assembled tensors stay plain (they land in the carrier: see `bases`)."""
        plain = np.ones(len(segments), dtype=bool)
        rows = TransformRows()
        if not self.targets or not len(segments):
            return plain, rows
        for i in np.flatnonzero(np.isin(segments[:, SEG["dst_buffer"]],
                                        list(self.targets))):
            t = self.targets[int(segments[i, SEG["dst_buffer"]])]
            if t.carrier is not None:
                continue
            plain[i] = False
            _add_rows(rows, t, segments[i], int(src[i]))
        return plain, rows

    def split_table(self, src: np.ndarray, segments: np.ndarray):
        """`split` as (the plain segments, the transform table's columns or None)."""
        plain, rows = self.split(src, segments)
        return segments[plain], (rows.table() if len(rows) else None)

    def finish_table(self) -> dict | None:
        """`finish_rows` as transform table columns, or None when nothing is assembled."""
        rows = self.finish_rows()
        return rows.table() if len(rows) else None

    def finish_rows(self) -> "TransformRows":
        """Rows transforming every assembled tensor from its carrier, one per matrix."""
        rows = TransformRows()
        for t in self.targets.values():
            if t.carrier is None:
                continue
            r, c = t.matrix
            for b in range(math.prod(t.shape) // (r * c)):
                rows.add(t, t.carrier.data_ptr() + b * r * c * t.in_size, c * t.in_size,
                         (b, 0, 0, r, c))
        return rows


class TransformRows:
    """Transform table columns being built (`_core.TRANSFORM_FIELDS`), row by row."""

    def __init__(self):
        self.columns = {name: [] for name in _FIELDS}

    def __len__(self) -> int:
        return len(self.columns["src"])

    def append(self, fmt: TensorFormat, src: int, dst: int, src_pitch: int, dst_pitch: int,
               rows: int, cols: int, scale: int = 0, scale_pitch: int = 0) -> None:
        """One rectangle (absolute addresses; pitches in bytes)."""
        for name, value in (("src", src), ("dst", dst), ("src_pitch", src_pitch),
                            ("dst_pitch", dst_pitch), ("rows", rows), ("cols", cols),
                            ("src_fmt", _CODE[fmt.src]), ("dst_fmt", _CODE[fmt.dst]),
                            ("scale", scale), ("scale_pitch", scale_pitch)):
            self.columns[name].append(value)

    def add(self, t: Target, src: int, src_pitch: int, rect) -> None:
        """Rectangle rect = (matrix, row, column, rows, columns) of `t`, read at `src`."""
        b, r0, c0, rows, cols = rect
        mr, mc = t.matrix
        scale, pitch = t.scale_at(b, r0, c0) if t.fmt.quantized else (0, 0)
        self.append(t.fmt, src, t.address + ((b * mr + r0) * mc + c0) * t.out_size, src_pitch,
                    mc * t.out_size, rows, cols, t.scale + scale if t.fmt.quantized else 0,
                    pitch)

    def extend(self, other: "TransformRows") -> None:
        for name in _FIELDS:
            self.columns[name].extend(other.columns[name])

    def table(self) -> dict[str, np.ndarray]:
        return {k: np.array(v, dtype=np.int64) for k, v in self.columns.items()}


def _add_rows(rows: TransformRows, t: Target, seg, src: int) -> None:
    if t.fmt.quantized:
        for offset, src_pitch, rect in rectangles(seg, t.matrix, t.in_size):
            rows.add(t, src + offset, src_pitch, rect)
        return
    # A cast is element by element: each segment is one rectangle of its own rows, with the
    # destination's pitch in the destination's element size.
    isz, out = t.in_size, t.out_size
    rows.append(t.fmt, src, t.address + int(seg[SEG["dst_offset"]]) // isz * out,
                int(seg[SEG["src_pitch"]]), int(seg[SEG["dst_pitch"]]) // isz * out,
                int(seg[SEG["rows"]]), int(seg[SEG["row_bytes"]]) // isz)


def whole(t: Target, rect) -> bool:
    """Whether rectangle (offset, pitch, (matrix, row, col, rows, cols)) covers whole blocks."""
    _, _, (_, r0, c0, rows, cols) = rect
    mr, mc = t.matrix
    br, bc = BLOCK[t.fmt.dst]
    return (r0 % br == 0 and c0 % bc == 0 and ((r0 + rows) % br == 0 or r0 + rows == mr)
            and ((c0 + cols) % bc == 0 or c0 + cols == mc))


def rectangles(seg, matrix: tuple[int, int], isz: int):
    """The rectangles of local matrices a segment's destination covers, as (source byte
    offset from the segment's start, source pitch, (matrix, row, col, rows, cols)), in
    order. A segment is `rows` rows of `row_bytes` contiguous bytes, `dst_pitch` apart."""
    mr, mc = matrix
    e0 = int(seg[SEG["dst_offset"]]) // isz
    w = int(seg[SEG["row_bytes"]]) // isz
    n, dp = int(seg[SEG["rows"]]), int(seg[SEG["dst_pitch"]]) // isz
    sp = int(seg[SEG["src_pitch"]])
    out = []
    if n == 1 or dp == w and sp == w * isz:
        n, w, dp = 1, n * w, n * w  # one contiguous run on both sides
    c = e0 % mc
    if c + w <= mc and (n == 1 or dp == mc):
        # Each row inside one matrix row, rows consecutive: split where matrices end.
        _split_rows(out, e0, n, w, sp, mr, mc, 0)
        return out
    for i in range(n):  # general: each segment row in pieces of matrix rows
        start, left, offset = e0 + i * dp, w, i * sp
        while left:
            c = start % mc
            if c == 0 and left >= mc:
                k = left // mc
                _split_rows(out, start, k, mc, mc * isz, mr, mc, offset)
                taken = k * mc
            else:
                taken = min(left, mc - c)
                _split_rows(out, start, 1, taken, taken * isz, mr, mc, offset)
            start, left, offset = start + taken, left - taken, offset + taken * isz
    return out


def _split_rows(out, e0, n, w, sp, mr, mc, offset):
    """n rows of w elements at element e0 (matrix rows consecutive), split at matrix ends."""
    while n:
        b, r, c = e0 // (mr * mc), (e0 // mc) % mr, e0 % mc
        k = min(n, mr - r)
        out.append((offset, sp, (b, r, c, k, w)))
        e0, n, offset = e0 + k * mc, n - k, offset + k * sp
