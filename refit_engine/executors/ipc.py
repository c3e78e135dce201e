"""The CUDA IPC path of a CUDA plan: peers on this node read each other's source tensors.

At plan time each rank exports the allocations holding the source tensors its IPC readers
read (`_core.ipc_export`: handle + offset), the exports are exchanged once over the plan's
channel, and each reader maps its owners' allocations (`_core.IpcMapping`, shared per
process, unmapped when the plan is dropped). A reader's direct reads then join its local
copies in one fused kernel: one pass from the owner's source into the reader's destination,
no staging, no pack or unpack. Ordering across processes is `IpcOrdering` (host barriers and
interprocess events) or `_core.IpcFlags` (device flags, inside the refit's CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refit_engine import _core
from refit_engine.compiler import RankPlan
from refit_engine.errors import RefitError
from refit_engine.peers import PeerLinks
from refit_engine.tables import MSG, SEG


def without_peers(plan: RankPlan, peers: set[int]) -> RankPlan:
    """`plan` with every segment and message to or from `peers` removed (they go over IPC),
    and the messages left packed end to end in each bucket's staging, so staging holds only
    what NCCL carries (every staged segment moves with its message)."""
    if not peers:
        return plan
    ids = np.array(sorted(peers), dtype=np.int64)

    def packed(segments, messages, staged_offset: str):
        segments = segments[~np.isin(segments[:, SEG["peer"]], ids)].copy()
        messages = messages[~np.isin(messages[:, MSG["peer"]], ids)].copy()
        staging = [0] * plan.num_buckets
        for i in range(len(messages)):
            peer, bucket = messages[i, MSG["peer"]], messages[i, MSG["bucket"]]
            shift = staging[bucket] - messages[i, MSG["offset"]]
            mine = (segments[:, SEG["peer"]] == peer) & (segments[:, SEG["bucket"]] == bucket)
            segments[mine, SEG[staged_offset]] += shift
            messages[i, MSG["offset"]] = staging[bucket]
            staging[bucket] += int(messages[i, MSG["bytes"]])
        return np.ascontiguousarray(segments), np.ascontiguousarray(messages), staging

    send, send_messages, send_staging = packed(plan.send, plan.send_messages, "dst_offset")
    recv, recv_messages, recv_staging = packed(plan.recv, plan.recv_messages, "src_offset")
    return RankPlan(plan.rank, plan.local, send, recv, send_messages, recv_messages,
                    send_staging, recv_staging, plan.num_buckets)


def direct_part(send: np.ndarray, recv: np.ndarray, src_addresses: np.ndarray,
                dst_addresses: np.ndarray, sender: int, receiver: int):
    """(source addresses, destination addresses, segments) copying what `sender` sends to
    `receiver` straight from the sender's tensors into the receiver's: the sender's send
    segments to the receiver and the receiver's receive segments from the sender list the
    same pieces in the same order (the planner emits both from one message), so row i of one
    is row i of the other. src_addresses / dst_addresses: per buffer, in this process."""
    shape = [SEG["rows"], SEG["row_bytes"]]
    if len(send) != len(recv) or not np.array_equal(send[:, shape], recv[:, shape]):
        raise RefitError(f"rank {sender}'s sends to rank {receiver} do not match rank "
                         f"{receiver}'s receives (plans compiled from different layouts?)",
                         ranks=[sender, receiver])
    # The receiver's destination side (buffer, offset, pitch), so the row says where it
    # lands: transformed destinations are recognized by it (transforms.RankTransforms.split).
    direct = send.copy()
    for column in ("dst_buffer", "dst_offset", "dst_pitch"):
        direct[:, SEG[column]] = recv[:, SEG[column]]
    src = src_addresses[send[:, SEG["src_buffer"]]] + send[:, SEG["src_offset"]]
    dst = dst_addresses[recv[:, SEG["dst_buffer"]]] + recv[:, SEG["dst_offset"]]
    return src.astype(np.int64), dst.astype(np.int64), direct


@dataclass
class IpcSide:
    """This rank's part of the IPC path: whom it reads, who reads it, and what it exports."""

    owners: list[int]  # peers whose source tensors this rank reads
    readers: list[int]  # peers that read this rank's source tensors
    exports: dict = field(default_factory=dict)  # buffer -> (handle index, offset)
    handles: list = field(default_factory=list)  # distinct allocation handles


def ipc_side(plan: RankPlan, links: PeerLinks, src_addresses: np.ndarray, src_keys) -> IpcSide:
    """What this rank exports and whom it talks to over IPC. Raises RefitError naming the
    tensor whose memory CUDA IPC cannot share."""
    ipc = links.peers("ipc")
    owners = sorted(p for p in set(plan.recv[:, SEG["peer"]].tolist()) if p in ipc)
    readers = sorted(p for p in set(plan.send[:, SEG["peer"]].tolist()) if p in ipc)
    side = IpcSide(owners, readers)
    read = plan.send[np.isin(plan.send[:, SEG["peer"]], np.array(readers, dtype=np.int64))]
    index_of: dict[bytes, int] = {}
    for buffer in sorted(set(read[:, SEG["src_buffer"]].tolist())):
        try:
            handle, offset, _ = _core.ipc_export(int(src_addresses[buffer]))
        except (ValueError, RuntimeError) as exc:
            raise RefitError(f"source tensor cannot be read by its IPC peers {readers}: {exc}",
                             tensor=src_keys(buffer), ranks=[plan.rank]) from exc
        if handle not in index_of:
            index_of[handle] = len(side.handles)
            side.handles.append(handle)
        side.exports[buffer] = (index_of[handle], int(offset))
    return side


def open_owners(rank: int, side: IpcSide, gathered: dict, num_buffers: int, device: int):
    """Per owner, the address in this process of each of its exported source buffers, and the
    mappings that keep them valid. gathered: rank -> that rank's IpcSide."""
    addresses, mappings = {}, []
    for owner in side.owners:
        theirs = gathered[owner]
        try:
            opened = [_core.IpcMapping(h, device) for h in theirs.handles]
        except (ValueError, RuntimeError) as exc:
            raise RefitError(f"cannot map rank {owner}'s source memory over CUDA IPC: {exc}",
                             ranks=[rank, owner]) from exc
        mappings.extend(opened)
        table = np.zeros(num_buffers, dtype=np.int64)
        for buffer, (h, offset) in theirs.exports.items():
            table[buffer] = opened[h].base + offset
        addresses[owner] = table
    return addresses, mappings


class IpcOrdering:
    """The host-barrier ordering: interprocess events recorded on each rank's stream, and one
    barrier over the plan's channel between the records and the waits, twice per refit.
    events=None: a rank with no IPC peer of its own, which still joins the barriers (they
    are collectives of the whole plan)."""

    def __init__(self, events, channel):
        self.events, self.channel = events, channel

    def before(self, stream: int) -> None:
        if self.events is not None:
            self.events.signal_ready(stream)
        self.channel.union(0, "IPC sources ready")
        if self.events is not None:
            self.events.wait_owners(stream)

    def after(self, stream: int) -> None:
        if self.events is not None:
            self.events.signal_done(stream)
        self.channel.union(0, "IPC reads done")
        if self.events is not None:
            self.events.wait_readers(stream)
