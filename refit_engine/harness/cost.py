"""Cost model: what a compiled plan moves per rank (`RankFigures`, split by link and by
transport), its floor and its predicted refit time on a topology.

Per rank, from what its plan moves (`RankFigures`):
- pack and unpack: every byte sent to or received from an NCCL (or gloo) peer is read and
  written once into staging, or once out of it; local copies read and write once: bytes x 2
  over the copy bandwidth;
- CUDA IPC peers (same node): the receiving rank's fused copy kernel reads the peer's source in
  place and writes its destination, in the same pass as its local copies: (local + IPC bytes)
  x 2 over the copy bandwidth, no pack, no unpack, no staging, no message latency; reads from
  another GPU cross NVLink, so they also count on the transfer stage's link (both ends: the
  peer's outgoing direction carries what this rank reads);
- transfer: the node's links (NVLink) and the network run side by side, each direction at full
  duplex, or both directions sharing one link's figure where `Topology.duplex` is False (CPU
  ranks: see `RankFigures.link_seconds`); one message latency per bucket (a bucket's messages
  go out together in one NCCL group);
- pipelining: pack, transfer and unpack (with local copies) overlap across buckets, so the
  slowest of the three sets the pace, plus one bucket's pack and unpack to fill and drain;
  where they share the same cores (CPU ranks: `Topology.overlap` False) they add up instead.
A refit ends with its slowest rank, after the collective check every refit starts with
(`Topology.check_us`). The floor (`floor`) drops the staging copies, the latency and the
check: it is what no executor can beat, whatever the transport (an all-IPC rank's prediction
is above it by at most its IPC bytes' copy pass, 2 x IPC bytes over the copy bandwidth).

Destination formats (issue 16: an FP8 inference model). What a box of a tensor takes in a format
is `box_bytes` (elements x `format_size`'s element bytes, plus one scale per block the box
touches). Where the destination's format differs from the source's, each pass reads the bytes of
one side and writes those of the other: a pack reads the source and writes what crosses the wire
(quantized on the sender where the piece holds whole blocks), an unpack reads that and writes the
destination's format, and local copies and IPC reads read the source (BF16 over NVLink) and
write the destination's format. `RankFigures`' written / read fields say so; left None, a pass
writes what it reads (no transform: every figure as before).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from refit_engine import quantize
from refit_engine.harness.topology import Topology


class FormatSize(NamedTuple):
    """What one tensor takes in a format: bytes per element, bytes per scale (0: no scales)
    and the scales' block of the GLOBAL 2-D tensor, (rows, cols) elements per scale."""

    element: int
    scale: int
    block: tuple[int, int]


_PLAIN_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def format_size(fmt: str, itemsize: int) -> FormatSize:
    """`fmt`'s sizes (refit_engine.quantize's formats) for a tensor whose source elements take
    `itemsize` bytes ("keep": the source's)."""
    fmt = quantize.format_name(fmt)
    if fmt == "fp8_block128":  # e4m3 elements, one float32 scale_inv per 128 x 128 block
        return FormatSize(1, 4, (quantize.BLOCK, quantize.BLOCK))
    if fmt == "mxfp8":  # e4m3 elements, one e8m0 scale per 32 consecutive elements of a row
        return FormatSize(1, 1, (1, quantize.MX_GROUP))
    return FormatSize(int(itemsize) if fmt == quantize.KEEP else _PLAIN_BYTES[fmt], 0, (1, 1))


def box_scales(start, extent, block: tuple[int, int]):
    """Scales of the blocks a box of a global 2-D tensor touches: per dimension the blocks from
    the one holding `start` to the one holding the last element. `start`, `extent`: (row, col)
    on the last axis, arrays of boxes too (then an array); an empty box has none."""
    start, extent = np.asarray(start, dtype=np.int64), np.asarray(extent, dtype=np.int64)
    b = np.asarray(block, dtype=np.int64)
    spans = (start + extent - 1) // b - start // b + 1
    return np.where((extent > 0).all(axis=-1), spans.prod(axis=-1), 0)


def box_bytes(shape: Sequence[int], start: Sequence[int], extent: Sequence[int], fmt: str,
              itemsize: int) -> int:
    """Bytes of the box (`start`, `extent`) of a global tensor of `shape` held in `fmt` (source
    elements of `itemsize` bytes): its elements, and the scales of the blocks it touches (a
    whole tensor: `quantize.scale_shape`'s)."""
    size = format_size(fmt, itemsize)
    n = math.prod(int(e) for e in extent)
    if not size.scale:
        return n * size.element
    quantize.scale_shape(shape, fmt)  # 2-D, or ValueError
    return n * size.element + size.scale * int(box_scales(start, extent, size.block))


def tensor_bytes(shape: Sequence[int], fmt: str, itemsize: int) -> int:
    """Bytes of a whole tensor of `shape` in `fmt`."""
    return box_bytes(shape, (0,) * len(shape), shape, fmt, itemsize)


@dataclass
class RankFigures:
    """One rank's memory (weights of each side, staging) and what a refit moves there, in
    bytes: local copies, sent and received over the node's links and over the network.
    `received_ipc` / `sent_ipc`: the part of `received_intra` / `sent_intra` that goes over
    CUDA IPC (read in place by the receiver: as execute()'s "bytes_ipc", a part of what it
    receives), so neither packed nor unpacked; the rest is staged (NCCL, gloo).
    `aliased_bytes`: destination bytes sharing the source's storage (plan(alias=True)),
    counted once in `total_bytes`; they are in no local copy.
    Link and local figures are what crosses the link and what local copies read. Where the
    destination's format differs (module doc): `local_written`, what local copies write;
    `ipc_written`, what the IPC copies write (they read `received_ipc`); `unpack_written`, what
    unpacks write (they read `received_staged`); `pack_read`, what packs read from the source
    (they write `sent_staged`). None: as many bytes as the pass reads or writes on its other
    side (no transform)."""

    rank: int
    src_bytes: int = 0
    dst_bytes: int = 0
    staging_bytes: int = 0
    local_bytes: int = 0
    sent_intra: int = 0
    sent_inter: int = 0
    received_intra: int = 0
    received_inter: int = 0
    messages: int = 0
    received_ipc: int = 0
    sent_ipc: int = 0
    aliased_bytes: int = 0
    local_written: int | None = None
    ipc_written: int | None = None
    unpack_written: int | None = None
    pack_read: int | None = None

    @property
    def local_write_bytes(self) -> int:
        return self.local_bytes if self.local_written is None else self.local_written

    @property
    def ipc_write_bytes(self) -> int:
        return self.received_ipc if self.ipc_written is None else self.ipc_written

    @property
    def unpack_write_bytes(self) -> int:
        return self.received_staged if self.unpack_written is None else self.unpack_written

    @property
    def pack_read_bytes(self) -> int:
        return self.sent_staged if self.pack_read is None else self.pack_read

    @property
    def total_bytes(self) -> int:
        return self.src_bytes + self.dst_bytes - self.aliased_bytes + self.staging_bytes

    @property
    def sent_staged(self) -> int:
        """Bytes packed into staging for NCCL / gloo peers (everything but IPC)."""
        return self.sent_intra + self.sent_inter - self.sent_ipc

    @property
    def received_staged(self) -> int:
        return self.received_intra + self.received_inter - self.received_ipc

    def link_seconds(self, topo: Topology) -> dict[str, float]:
        """Time on each kind of link at full bandwidth, keyed by the link's name (nvlink,
        network, loopback): on full-duplex links the busier direction; where both directions
        share the link (`Topology.duplex` False: CPU ranks) everything this rank sends and
        receives, at twice the per-direction figure measured with both directions busy. The
        two agree for a rank that sends as much as it receives (collocated); a rank that only
        sends or only receives (non-collocated) gets the whole link."""
        def seconds(sent: int, received: int, gbps: float) -> float:
            if topo.duplex:
                return max(sent, received) / (gbps * 1e9)
            return (sent + received) / (2 * gbps * 1e9)
        return {topo.intra_link.lower(): seconds(self.sent_intra, self.received_intra,
                                                 topo.intra_node_gbps),
                topo.inter_link.lower(): seconds(self.sent_inter, self.received_inter,
                                                 topo.inter_node_gbps)}


def rank_figures(rank: int, bytes_local: int, per_peer: dict, topo: Topology,
                 transports: dict | None = None, **fields) -> RankFigures:
    """A rank's bytes split by link: peers on its node over NVLink, the others over the
    network. per_peer: {peer: {"sent": bytes, "received": bytes}}, as RankPlan.bytes_per_peer()
    and execute()'s statistics give it. transports: {peer: "ipc" | "nccl" | ...}, as
    plan.peer_transports or `Topology.peer_transport` give it; peers it leaves out are staged
    (None: every peer, the figures before IPC)."""
    f = RankFigures(rank, local_bytes=bytes_local, **fields)
    transports = transports or {}
    for peer, b in per_peer.items():
        peer = int(peer)  # JSON'd statistics key peers by string
        where = "intra" if topo.node_of(peer) == topo.node_of(rank) else "inter"
        setattr(f, f"sent_{where}", getattr(f, f"sent_{where}") + b["sent"])
        setattr(f, f"received_{where}", getattr(f, f"received_{where}") + b["received"])
        if transports.get(peer) == "ipc":
            if where == "inter":  # the library refuses it too: IPC handles are node-local
                raise ValueError(f"rank {rank}: peer {peer} is on another node, out of CUDA "
                                 "IPC's reach")
            f.sent_ipc += b["sent"]
            f.received_ipc += b["received"]
    return f


def floor(ranks: list[RankFigures], topo: Topology) -> dict:
    """Lower bound of the refit time: per rank, the slowest of its traffic on each link
    (`RankFigures.link_seconds`: full duplex or shared) and its local copies; the largest over
    ranks. Seconds, and which rank and term (the link's name, or "local copy") set it."""
    best = {"seconds": 0.0, "rank": None, "term": None}
    for f in ranks:
        local = (f.local_bytes + f.local_write_bytes) / (topo.copy_gbps * 1e9)  # read + written
        terms = {**f.link_seconds(topo), "local copy": local}
        term, seconds = max(terms.items(), key=lambda kv: kv[1])
        if seconds > best["seconds"]:
            best = {"seconds": seconds, "rank": f.rank, "term": term}
    return best


def predict_rank(f: RankFigures, topo: Topology, buckets: int) -> dict:
    """Seconds of one rank's refit and what bounds it. buckets: how many buckets its staged
    (NCCL, gloo) messages take, 0 where every peer is IPC (IPC reads are one pass, unbucketed)."""
    copy = topo.copy_gbps * 1e9
    # Every pass: bytes read + bytes written over the copy bandwidth (the same where no format
    # changes: twice what it moves).
    pack = (f.pack_read_bytes + f.sent_staged) / copy
    unpack = (f.received_staged + f.unpack_write_bytes) / copy
    # Local copies and IPC reads are one fused kernel: an IPC byte is read once and written
    # once, like a local one. Its NVLink time is in the transfer, on the link it shares with
    # the node's NCCL bytes.
    local = (f.local_bytes + f.local_write_bytes + f.received_ipc + f.ipc_write_bytes) / copy
    transfer = max(f.link_seconds(topo).values()) + buckets * topo.latency_us * 1e-6
    copy_stage = "unpack + local + ipc" if f.received_ipc else "unpack + local"
    stages = {"pack": pack, "transfer": transfer, copy_stage: unpack + local}
    term, pace = max(stages.items(), key=lambda kv: kv[1])
    if not topo.overlap:
        return {"seconds": sum(stages.values()), "term": "pack + transfer + unpack", **stages}
    fill_drain = (pack + unpack) / max(buckets, 1)
    return {"seconds": pace + fill_drain, "term": term, **stages}


def predict(ranks: list[RankFigures], topo: Topology, buckets: dict[int, int]) -> dict:
    """Predicted seconds of the whole refit: the slowest rank, and what bounds it. buckets:
    per rank, as `predict_rank` takes them."""
    worst = {"seconds": 0.0, "rank": None, "term": None}
    for f in ranks:
        p = predict_rank(f, topo, buckets.get(f.rank, 1))
        if p["seconds"] > worst["seconds"]:
            worst = {"seconds": p["seconds"], "rank": f.rank, "term": p["term"]}
    worst["seconds"] += topo.check_us * 1e-6
    return worst


def predict_loopback(bytes_local: int, bytes_remote: int, copy_gbps: float, staged: bool) -> float:
    """One GPU playing every rank: everything goes through its memory, one pass for local
    copies, three (pack, exchange, unpack) for remote bytes when staged, one when direct (as
    CUDA IPC between processes on one GPU: the receiver's fused kernel reads the sender's
    tensor, no link in between). Every rank's bytes, as they share the GPU's memory."""
    passes = 3 if staged else 1
    return 2 * (bytes_local + passes * bytes_remote) / (copy_gbps * 1e9)

