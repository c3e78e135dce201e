"""Transforming on the sender: FP8 (or a narrower cast) on the wire, not the source's bytes.

A segment a rank sends over a transport (NCCL, gloo) into a destination that is quantized
with whole blocks (`transforms.RankTransforms`: fused) or cast to a narrower dtype is
transformed by the sender's pack, so its message carries e4m3 bytes and scales (about half the
BF16 bytes) and the receiver's unpack is a plain copy. Pieces into assembled destinations,
widening casts and everything CUDA IPC reads stay receiver-side (an IPC read is already one
pass over the source).

Both sides derive the same message layout from the same facts: the receiver's receive segments
(the sender compiles the receiver's plan: the planner's `plan_rank`) and which of its local
tensors are fused (gathered at plan time). A quantized segment is its rectangles of the
destination matrix (`transforms.rectangles`) in order, each as its e4m3 bytes (row-major, its
own width) then its scales (row-major); a cast segment is its rows at the output width. Messages
keep their segments' order, each piece starting on 16 bytes (`ALIGN`), and lie one after the
other in each bucket's staging.

`rewrite` turns one rank's plan into the plan its executor runs (`WirePlan`): send segments of
plain pieces, the pack's transform rows per bucket (source buffer + offset, staging offsets),
receive segments in which the copies of transformed pieces address the destination's own
tensor and its scale tensor through the extended address table of
`transforms.RankTransforms.bases`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refit_engine import dtypes, quantize
from refit_engine.compiler import RankPlan
from refit_engine.errors import RefitError
from refit_engine.tables import MSG, SEG
from refit_engine.transforms import (SCALE_DTYPES, Target, TensorFormat, TransformRows,
                                     buffer_formats, dtype_of, rectangles)

__all__ = ["WirePlan", "for_executor", "on_wire", "pack_table", "packed_peers",
           "rewrite", "wire_targets"]


def on_wire(fmt: TensorFormat) -> bool:
    """Whether a piece into a fused destination of format `fmt` is transformed by its sender:
    quantized, or cast to fewer bytes."""
    if fmt.quantized:
        return True
    return dtypes.itemsize(dtype_of(fmt.dst)) < dtypes.itemsize(dtype_of(fmt.src))


def wire_targets(dst_layout, formats: dict, fused_by_rank: dict) -> dict[int, Target]:
    """{buffer index: Target} of every rank's destination local tensors whose pieces travel
    transformed (fused, and `on_wire`): what every sender needs to know of its receivers."""
    out = {}
    for index, fmt in buffer_formats(dst_layout, formats).items():
        meta = dst_layout.buffers[index]
        if on_wire(fmt) and index in fused_by_rank.get(meta.rank, ()):
            out[index] = Target(index, meta.key, fmt, tuple(meta.shape))
    return out


@dataclass
class _Piece:
    """One transformed rectangle of a segment on the wire (offsets within the message)."""

    src_offset: int   # from the segment's source start, bytes
    src_pitch: int
    rows: int
    cols: int
    data: int         # its output bytes in the message, row-major at its own width
    data_pitch: int
    dst_offset: int   # where they land in the destination tensor, bytes
    dst_pitch: int
    scale: int = -1   # its scales in the message (-1: none)
    scale_pitch: int = 0
    scale_rows: int = 0
    scale_dst: int = 0  # where they land in the scale tensor, bytes
    scale_dst_pitch: int = 0


def _layout(recv_seg, src_pitch: int, t: Target, start: int) -> tuple[list[_Piece], int]:
    """The wire pieces of one transformed segment whose message bytes begin at `start`, and
    where its bytes end. recv_seg: the receiver's segment (destination geometry); src_pitch:
    the sender's source pitch."""
    isz, out = t.in_size, t.out_size
    if not t.fmt.quantized:
        rows, cols = int(recv_seg[SEG["rows"]]), int(recv_seg[SEG["row_bytes"]]) // isz
        piece = _Piece(0, src_pitch, rows, cols, start, cols * out,
                       int(recv_seg[SEG["dst_offset"]]) // isz * out,
                       int(recv_seg[SEG["dst_pitch"]]) // isz * out)
        return [piece], start + rows * cols * out
    seg = np.array(recv_seg, copy=True)
    seg[SEG["src_pitch"]] = src_pitch
    mr, mc = t.matrix
    ssize = dtypes.itemsize(SCALE_DTYPES[t.fmt.dst])
    pieces, at = [], start
    for offset, pitch, (b, r0, c0, nr, nc) in rectangles(seg, (mr, mc), isz):
        srows, scols = quantize.scale_shape((nr, nc), t.fmt.dst)
        piece = _Piece(offset, pitch, nr, nc, at, nc, (b * mr + r0) * mc + c0, mc)
        at += nr * nc
        piece.scale, piece.scale_pitch, piece.scale_rows = at, scols * ssize, srows
        piece.scale_dst, piece.scale_dst_pitch = t.scale_at(b, r0, c0)
        at += srows * scols * ssize
        pieces.append(piece)
    return pieces, at


@dataclass
class WirePlan:
    """A rank's plan with transformed pieces on the wire (see the module's notes)."""

    plan: RankPlan
    # bucket -> [(peer, source buffer, source byte offset, _Piece (staging offsets), format)]
    pack: dict[int, list] = field(default_factory=dict)
    bytes_saved: int = 0  # source bytes this rank no longer sends or receives as such


def _rows_of(segments: np.ndarray, peer: int, bucket: int) -> np.ndarray:
    return np.flatnonzero((segments[:, SEG["peer"]] == peer) & (segments[:, SEG["bucket"]] == bucket))


def rewrite(plan: RankPlan, wire_peers, targets: dict[int, Target], receiver_segments,
            num_dst_buffers: int) -> WirePlan:
    """`plan` with every segment to or from `wire_peers` that lands in a `targets` tensor
    transformed on the wire. receiver_segments(peer): that peer's receive segments (its own
    plan's `recv`, compiled here). num_dst_buffers: the destination layout's buffer count
    (the receive copies address destination tensors as num + buffer and scales as 2 num +
    buffer: see `transforms.RankTransforms.bases`)."""
    peers = set(wire_peers)
    out = WirePlan(plan)
    if not peers:
        return out
    # Sends: each message's segments in order, paired with the receiver's segments.
    keep_send = np.ones(len(plan.send), dtype=bool)
    send = plan.send.copy()
    send_messages = plan.send_messages.copy()
    send_staging = [0] * plan.num_buckets
    recv_of = {}
    for i in range(len(send_messages)):
        peer, bucket = int(send_messages[i, MSG["peer"]]), int(send_messages[i, MSG["bucket"]])
        mine = _rows_of(plan.send, peer, bucket)
        base = send_staging[bucket]
        at = base
        if peer in peers:
            if peer not in recv_of:
                recv_of[peer] = receiver_segments(peer)
            theirs = recv_of[peer]
            theirs = theirs[_rows_of(theirs, plan.rank, bucket)]
            shape = [SEG["rows"], SEG["row_bytes"]]
            if len(theirs) != len(mine) or not np.array_equal(theirs[:, shape],
                                                               plan.send[mine][:, shape]):
                raise RefitError(f"bucket {bucket}: rank {plan.rank}'s sends to rank {peer} do "
                                 f"not match rank {peer}'s receives", ranks=[plan.rank, peer])
        for k, row in enumerate(mine):
            seg = plan.send[row]
            at = _aligned(at)
            t = targets.get(int(theirs[k, SEG["dst_buffer"]])) if peer in peers else None
            if t is None:
                send[row, SEG["dst_offset"]] = at
                at += int(seg[SEG["rows"]]) * int(seg[SEG["row_bytes"]])
                continue
            pieces, end = _layout(theirs[k], int(seg[SEG["src_pitch"]]), t, at)
            out.pack.setdefault(bucket, []).extend(
                (peer, int(seg[SEG["src_buffer"]]), int(seg[SEG["src_offset"]]), p, t.fmt)
                for p in pieces)
            out.bytes_saved += int(seg[SEG["rows"]]) * int(seg[SEG["row_bytes"]]) - (end - at)
            keep_send[row] = False
            at = end
        send_messages[i, MSG["offset"]] = base
        send_messages[i, MSG["bytes"]] = at - base
        send_staging[bucket] = _aligned(at)
    # Receives: the same layout from this rank's own segments and targets.
    recv_rows, recv_messages = [], plan.recv_messages.copy()
    recv_staging = [0] * plan.num_buckets
    for i in range(len(recv_messages)):
        peer, bucket = int(recv_messages[i, MSG["peer"]]), int(recv_messages[i, MSG["bucket"]])
        base = recv_staging[bucket]
        at = base
        for row in _rows_of(plan.recv, peer, bucket):
            seg = plan.recv[row].copy()
            at = _aligned(at)
            t = targets.get(int(seg[SEG["dst_buffer"]])) if peer in peers else None
            if t is None:
                seg[SEG["src_offset"]] = at
                at += int(seg[SEG["rows"]]) * int(seg[SEG["row_bytes"]])
                recv_rows.append(seg)
                continue
            pieces, end = _layout(seg, 0, t, at)
            for p in pieces:
                recv_rows.append(_copy(seg, p.data, p.data_pitch, num_dst_buffers + t.buffer,
                                       p.dst_offset, p.dst_pitch, p.rows, p.data_pitch))
                if p.scale >= 0:
                    recv_rows.append(_copy(seg, p.scale, p.scale_pitch,
                                           2 * num_dst_buffers + t.buffer, p.scale_dst,
                                           p.scale_dst_pitch, p.scale_rows, p.scale_pitch))
            out.bytes_saved += int(seg[SEG["rows"]]) * int(seg[SEG["row_bytes"]]) - (end - at)
            at = end
        recv_messages[i, MSG["offset"]] = base
        recv_messages[i, MSG["bytes"]] = at - base
        recv_staging[bucket] = _aligned(at)
    recv = (np.array(recv_rows, dtype=np.int64).reshape(-1, plan.recv.shape[1])
            if recv_rows else plan.recv[:0].copy())
    out.plan = RankPlan(plan.rank, plan.local, np.ascontiguousarray(send[keep_send]), recv,
                        send_messages, recv_messages, send_staging, recv_staging,
                        plan.num_buckets)
    return out


def for_executor(transforms, plan: RankPlan, peers) -> WirePlan:
    """The WirePlan an executor runs: `plan` rewritten for `peers` (the peers its transport
    carries bytes to), or unchanged without transforms (`transforms` None)."""
    if transforms is None or transforms.plan_of is None:
        return WirePlan(plan)
    return rewrite(plan, peers, transforms.wire_targets, lambda p: transforms.plan_of(p).recv,
                   transforms.num_dst_buffers)


# Every piece starts on 16 bytes in its message: a transform reads its source elements where
# they lie (the kernels load whole elements, 16 bytes at a time where aligned), and the pieces
# before it may end anywhere (e4m3 rectangles, uint8 scales).
ALIGN = 16


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _copy(seg, src_offset, src_pitch, dst_buffer, dst_offset, dst_pitch, rows, row_bytes):
    out = seg.copy()
    out[SEG["src_buffer"]], out[SEG["src_offset"]], out[SEG["src_pitch"]] = -1, src_offset, src_pitch
    out[SEG["dst_buffer"]], out[SEG["dst_offset"]], out[SEG["dst_pitch"]] = (dst_buffer, dst_offset,
                                                                             dst_pitch)
    out[SEG["rows"]], out[SEG["row_bytes"]] = rows, row_bytes
    return out


def packed_peers(wire: WirePlan, bucket: int) -> set[int]:
    """Peers whose `bucket` message holds pieces the pack transforms (never zero-copy)."""
    return {row[0] for row in wire.pack.get(bucket, ())}


def pack_table(wire: WirePlan, bucket: int, src_addresses: np.ndarray,
               staging: int) -> dict | None:
    """The transform table (absolute addresses) packing `bucket`'s transformed pieces into
    send staging at `staging`, or None."""
    pieces = wire.pack.get(bucket)
    if not pieces:
        return None
    rows = TransformRows()
    for _, buffer, offset, p, fmt in pieces:
        rows.append(fmt, int(src_addresses[buffer]) + offset + p.src_offset, staging + p.data,
                    p.src_pitch, p.data_pitch, p.rows, p.cols,
                    staging + p.scale if p.scale >= 0 else 0, p.scale_pitch)
    return rows.table()
