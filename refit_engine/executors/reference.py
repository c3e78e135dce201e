"""The reference executor and the global-tensor helpers: NumPy only, the tests' oracle.

`run_reference` applies every rank's plan with plain NumPy views: local copies, packing each
bucket into staging, moving every message to its receiver, unpacking. It checks that senders
and receivers agree on every message, so a plan whose sides do not pair up fails here.

`materialize` makes per-rank buffers from global tensors (the source side) or poisoned ones
(the destination side); `assemble` rebuilds global tensors from buffers through the pieces, so
a result can be compared with the global tensors bit for bit.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from numpy.lib.stride_tricks import as_strided

from refit_engine import dtypes
from refit_engine.compiler import RankPlan, bucket_messages, segments_in_bucket
from refit_engine.errors import RefitError
from refit_engine.layouts import Layout, placement_box
from refit_engine.tables import PLACEMENT, SEG

Buffers = dict  # (rank, key) -> contiguous NumPy array (any dtype; bytes are what count)


def _bytes_of(array: np.ndarray) -> np.ndarray:
    if not array.flags.c_contiguous:
        raise RefitError("buffer is not contiguous")
    return array.reshape(-1).view(np.uint8)


def _window(flat: np.ndarray, offset: int, rows: int, row_bytes: int, pitch: int) -> np.ndarray:
    """rows x row_bytes view of `flat` starting at `offset`, rows `pitch` apart (bounds checked)."""
    if rows == 0:
        return flat[:0].reshape(0, row_bytes)
    end = offset + (rows - 1) * pitch + row_bytes
    if offset < 0 or end > flat.size:
        raise RefitError(f"copy [{offset}, {end}) runs past a buffer of {flat.size} bytes")
    return as_strided(flat[offset:], shape=(rows, row_bytes), strides=(pitch, 1))


def _copy(segments: np.ndarray, src_flat, dst_flat) -> None:
    """src_flat / dst_flat: buffer index -> byte array (index -1 is staging)."""
    for seg in segments:
        rows, row_bytes = int(seg[SEG["rows"]]), int(seg[SEG["row_bytes"]])
        src = _window(src_flat[int(seg[SEG["src_buffer"]])], int(seg[SEG["src_offset"]]), rows,
                      row_bytes, int(seg[SEG["src_pitch"]]))
        dst = _window(dst_flat[int(seg[SEG["dst_buffer"]])], int(seg[SEG["dst_offset"]]), rows,
                      row_bytes, int(seg[SEG["dst_pitch"]]))
        dst[...] = src


def run_reference(plans: Mapping[int, RankPlan], src: Layout, dst: Layout,
                  src_buffers: Buffers, dst_buffers: Buffers) -> None:
    """Apply every rank's plan to the buffers (in place on `dst_buffers`)."""
    src_flat = {i: _bytes_of(src_buffers[(b.rank, b.key)]) for i, b in enumerate(src.buffers)}
    dst_flat = {i: _bytes_of(dst_buffers[(b.rank, b.key)]) for i, b in enumerate(dst.buffers)}
    # Sent messages, keyed (sender, receiver, bucket) -> bytes, as a transport would carry them.
    wire: dict[tuple[int, int, int], np.ndarray] = {}
    for rank, plan in plans.items():
        _copy(plan.local, src_flat, dst_flat)
        for bucket, size in enumerate(plan.send_staging_bytes):
            staging = np.zeros(size, dtype=np.uint8)
            in_bucket = segments_in_bucket(plan.send, bucket)
            _copy(in_bucket, src_flat, {-1: staging})
            for peer, offset, nbytes in bucket_messages(plan.send_messages, bucket):
                wire[(rank, peer, bucket)] = staging[offset:offset + nbytes].copy()
    for rank, plan in plans.items():
        for bucket, size in enumerate(plan.recv_staging_bytes):
            staging = np.zeros(size, dtype=np.uint8)
            for peer, offset, nbytes in bucket_messages(plan.recv_messages, bucket):
                message = wire.pop((peer, rank, bucket), None)
                if message is None or message.size != nbytes:
                    raise RefitError(
                        f"rank {rank} expects {nbytes} bytes from rank {peer} in bucket {bucket}, "
                        f"but the sender's plan has "
                        f"{'no such message' if message is None else f'{message.size} bytes'}",
                        ranks=[rank, peer])
                staging[offset:offset + nbytes] = message
            in_bucket = segments_in_bucket(plan.recv, bucket)
            _copy(in_bucket, {-1: staging}, dst_flat)
    if wire:
        (sender, receiver, bucket), message = next(iter(wire.items()))
        raise RefitError(f"rank {sender} sends {message.size} bytes to rank {receiver} in bucket "
                         f"{bucket} that the receiver's plan does not expect",
                         ranks=[sender, receiver])


# -- global tensors <-> per-rank buffers ------------------------------------------------------

def _piece_views(layout: Layout, buffers: Buffers, ranks=None):
    """Yields (tensor name, global index tuple, local strided view) for every piece (of `ranks`)."""
    for row in layout.placements():
        tensor, buffer = int(row[PLACEMENT["tensor"]]), int(row[PLACEMENT["buffer"]])
        offset = int(row[PLACEMENT["local_offset"]])
        meta, buf = layout.tensors[tensor], layout.buffers[buffer]
        if ranks is not None and buf.rank not in ranks:
            continue
        start, extent, strides = placement_box(row, len(meta.shape))
        flat = buffers[(buf.rank, buf.key)].reshape(-1).view(dtypes.numpy_bits_dtype(meta.dtype))
        local = as_strided(flat[offset:], shape=extent,
                           strides=tuple(s * flat.itemsize for s in strides))
        index = tuple(slice(s, s + e) for s, e in zip(start, extent))
        yield meta.name, index, local


def random_globals(layout: Layout, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh random bits for every tensor (as unsigned ints of the tensor's element size)."""
    out = {}
    for meta in layout.tensors:
        bits = dtypes.numpy_bits_dtype(meta.dtype)
        out[meta.name] = rng.integers(0, np.iinfo(bits).max, size=meta.shape, dtype=bits,
                                      endpoint=True)
    return out


def materialize(layout: Layout, globals_: Mapping[str, np.ndarray] | None = None,
                poison: int = 0xA5, ranks=None) -> Buffers:
    """Per-rank buffers (of `ranks`, default all): every byte `poison`, then each piece filled
    from `globals_` if given."""
    buffers = {}
    for b in layout.buffers:
        if ranks is not None and b.rank not in ranks:
            continue
        bits = dtypes.numpy_bits_dtype(b.dtype)
        raw = np.full(b.numel * bits.itemsize, poison, dtype=np.uint8)  # every byte poisoned
        buffers[(b.rank, b.key)] = raw.view(bits).reshape(b.shape)
    if globals_ is not None:
        for name, index, local in _piece_views(layout, buffers, ranks):
            local[...] = globals_[name][index]
    return buffers


def assemble(layout: Layout, buffers: Buffers) -> dict[str, np.ndarray]:
    """Global tensors rebuilt from every piece; raises if two replicas of a box differ."""
    out = {m.name: None for m in layout.tensors}
    seen = {}
    for name, index, local in _piece_views(layout, buffers):
        if out[name] is None:
            meta = layout.tensor(name)
            out[name] = np.zeros(meta.shape, dtype=dtypes.numpy_bits_dtype(meta.dtype))
            seen[name] = np.zeros(meta.shape, dtype=bool)
        region = out[name][index]
        mask = seen[name][index]
        if mask.any() and not np.array_equal(region[mask], local[mask]):
            raise RefitError("replicas of the same box hold different values", tensor=name)
        region[...] = local
        mask[...] = True
    return out
