"""Compiling layouts into per-rank plans, and reading the result.

`Planner` hands both sides' layouts to the plan compiler (the C++ core, `_core.Planner`),
which validates and indexes them once and compiles rank plans on demand. A `RankPlan` is what
one rank executes: local copies, then per bucket one message per peer, packed from source
buffers into staging, sent, received, and unpacked into destination buffers. Segments are
pitched 2-D copies (columns: `tables.SEGMENT_FIELDS`); messages have `tables.MESSAGE_FIELDS`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from refit_engine import _core
from refit_engine.layouts import Layout
from refit_engine.tables import MESSAGE_FIELDS, MSG, SEG, SEGMENT_FIELDS, LayoutTables

__all__ = ["DEFAULT_BUCKET_BYTES", "MESSAGE_FIELDS", "MSG", "SEG", "SEGMENT_FIELDS", "Planner",
           "RankPlan", "bucket_messages", "compile_plans", "messages_in_bucket",
           "segment_bytes", "segments_in_bucket"]

# Largest message between two ranks in one bucket. 64 MiB messages reach NCCL's link bandwidth,
# and staging stays at 4 x 64 MiB x peers (double-buffered send and receive): about 5 GiB for a
# full-size Kimi K2 rank with ~20 peers.
DEFAULT_BUCKET_BYTES = 64 << 20


def segments_in_bucket(segments: np.ndarray, bucket: int) -> np.ndarray:
    return np.ascontiguousarray(segments[segments[:, SEG["bucket"]] == bucket])


def messages_in_bucket(messages: np.ndarray, bucket: int) -> np.ndarray:
    return np.ascontiguousarray(messages[messages[:, MSG["bucket"]] == bucket])


def bucket_messages(messages: np.ndarray, bucket: int) -> list[tuple[int, int, int]]:
    """(peer, offset, bytes) of every message of `bucket`, as Python ints, in plan order."""
    rows = messages_in_bucket(messages, bucket)
    return list(zip(*(rows[:, MSG[name]].tolist() for name in ("peer", "offset", "bytes"))))


def segment_bytes(segments: np.ndarray) -> int:
    if len(segments) == 0:
        return 0
    return int(np.dot(segments[:, SEG["rows"]], segments[:, SEG["row_bytes"]]))


@dataclass
class RankPlan:
    """One rank's compiled plan (int64 arrays; see SEGMENT_FIELDS and MESSAGE_FIELDS)."""

    rank: int
    local: np.ndarray
    send: np.ndarray
    recv: np.ndarray
    send_messages: np.ndarray
    recv_messages: np.ndarray
    send_staging_bytes: list[int]
    recv_staging_bytes: list[int]
    num_buckets: int
    _fingerprint: str | None = field(default=None, repr=False)

    @classmethod
    def from_core(cls, d: dict) -> "RankPlan":
        return cls(d["rank"], d["local"], d["send"], d["recv"], d["send_messages"],
                   d["recv_messages"], list(d["send_staging_bytes"]),
                   list(d["recv_staging_bytes"]), d["num_buckets"])

    @property
    def bytes_local(self) -> int:
        return segment_bytes(self.local)

    @property
    def bytes_sent(self) -> int:
        return segment_bytes(self.send)

    @property
    def bytes_received(self) -> int:
        return segment_bytes(self.recv)

    def bytes_per_peer(self) -> dict[int, dict[str, int]]:
        """{peer: {"sent": bytes, "received": bytes}}."""
        out: dict[int, dict[str, int]] = {}
        for kind, msgs in (("sent", self.send_messages), ("received", self.recv_messages)):
            for peer, nbytes in zip(msgs[:, MSG["peer"]].tolist(), msgs[:, MSG["bytes"]].tolist()):
                entry = out.setdefault(peer, {"sent": 0, "received": 0})
                entry[kind] += nbytes
        return out

    @property
    def nbytes(self) -> int:
        """Memory the plan's tables take."""
        arrays = (self.local, self.send, self.recv, self.send_messages, self.recv_messages)
        return sum(a.nbytes for a in arrays) + 8 * (len(self.send_staging_bytes)
                                                    + len(self.recv_staging_bytes))

    def fingerprint(self) -> str:
        """Hash of everything the plan does: equal on two runs iff the plans are equal."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            for a in (self.local, self.send, self.recv, self.send_messages, self.recv_messages):
                h.update(np.ascontiguousarray(a).tobytes())
                h.update(b"|")
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def _tables(side) -> LayoutTables:
    return side.tables() if isinstance(side, Layout) else LayoutTables(*side)


class Planner:
    """Compiles plans: both sides' layouts, validated and indexed once by the plan compiler,
    which compiles rank plans on demand.

    Raises RefitError (naming tensor, ranks, reason) when the layouts cannot be refit.
    """

    def __init__(self, src, dst, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 ranks_per_node: int = 0):
        """src, dst: Layouts, or the tables one would give (`Layout.tables()`; e.g.
        `kimi_k2_tables` for cluster-scale synthetic layouts, built without Layout objects).
        ranks_per_node > 0 makes the source choice link-aware: among remote replicas, one on
        the destination's node (NVLink) before one across the network."""
        self.src, self.dst, self.bucket_bytes = src, dst, int(bucket_bytes)
        self._core = _core.Planner(*_tables(src), *_tables(dst), self.bucket_bytes,
                                   int(ranks_per_node))

    @property
    def ranks(self) -> list[int]:
        return list(self._core.ranks)

    def plan_rank(self, rank: int) -> RankPlan:
        return RankPlan.from_core(self._core.plan_rank(int(rank)))

    def plan_all(self) -> dict[int, RankPlan]:
        return {p["rank"]: RankPlan.from_core(p) for p in self._core.plan_all()}


def compile_plans(src: Layout, dst: Layout, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                  ranks=None, ranks_per_node: int = 0) -> dict[int, RankPlan]:
    """Plans of `ranks` (default: every rank of either side), keyed by rank."""
    planner = Planner(src, dst, bucket_bytes, ranks_per_node)
    if ranks is None:
        return planner.plan_all()
    return {int(r): planner.plan_rank(r) for r in ranks}
