"""CUDA executors: NCCL or CUDA IPC between ranks, and loopback (every rank of a plan on one GPU).

Both build the same C++ `CudaExecutor` from compiled plans: segment tables with absolute device
addresses (uploaded once; rebuilt only when tensors move), per bucket one fused pack kernel,
one exchange, one fused unpack kernel, double-buffered staging, optional CUDA graph. This
module imports in a build without CUDA; what needs CUDA raises `require_cuda`'s error.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from refit_engine import _core, wire
from refit_engine.channel import Channel
from refit_engine.compiler import RankPlan, bucket_messages, segment_bytes, segments_in_bucket
from refit_engine.errors import RefitError, raise_first, status_of
from refit_engine.executors import ipc
from refit_engine.executors.base import Executor
from refit_engine.peers import PeerLinks
from refit_engine.tables import MSG, SEG

_COLUMNS = ("src_pitch", "dst_pitch", "rows", "row_bytes")


def require_cuda(what: str) -> None:
    if not _core.HAS_CUDA:
        raise RefitError(f"{what} needs the CUDA executor, but this build of refit_engine has no "
                         "CUDA (built without nvcc, or with REFIT_ENGINE_CUDA=OFF): reinstall "
                         "with the CUDA toolkit present")


def _table(src_addr: np.ndarray, dst_addr: np.ndarray, segments: np.ndarray):
    if len(segments) == 0:
        return None
    return _core.SegmentTable(src_addr, dst_addr, *(segments[:, SEG[c]] for c in _COLUMNS))


def _addresses(segments, column_buffer, column_offset, bases, staging=None):
    """Absolute addresses of one side of `segments`: buffer base + offset, or staging base."""
    buffers = segments[:, SEG[column_buffer]]
    offsets = segments[:, SEG[column_offset]]
    known = bases[np.maximum(buffers, 0)] if bases is not None and len(bases) else 0
    out = np.where(buffers >= 0, known, 0) + offsets
    if staging is not None:
        out = np.where(buffers < 0, staging + offsets, out)
    return out.astype(np.int64)


def _part(segments, src_bases=None, dst_bases=None, src_staging=None, dst_staging=None):
    """(source addresses, destination addresses, segments): one part of a segment table."""
    return (_addresses(segments, "src_buffer", "src_offset", src_bases, src_staging),
            _addresses(segments, "dst_buffer", "dst_offset", dst_bases, dst_staging), segments)


def _transformed(parts, transforms):
    """(the plain copies of `parts`, one TransformTable or None): the segments of each part that
    land in transformed destinations become transform rows (transforms.RankTransforms.split;
    `transforms` may be one for every part, or a list with one per part, as loopback has)."""
    if not transforms:
        return list(parts), None
    each = transforms if isinstance(transforms, list) else [transforms] * len(parts)
    plain, rows = [], None
    for (src, dst, segments), t in zip(parts, each):
        if t is None or not len(segments):
            plain.append((src, dst, segments))
            continue
        keep, mine = t.split(src, segments)
        plain.append((src[keep], dst[keep], segments[keep]))
        if rows is None:
            rows = mine
        else:
            rows.extend(mine)
    return plain, (_core.TransformTable(rows.table()) if rows is not None and len(rows) else None)


def _finish(executor, transforms) -> None:
    """The rows that quantize assembled destinations, after every copy of the refit."""
    tables = [t.finish_table() for t in (transforms if isinstance(transforms, list)
                                         else [transforms]) if t]
    tables = [t for t in tables if t is not None]
    if tables:
        executor.set_finish(_core.TransformTable(
            {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}))


def _set_local(executor, parts, transforms) -> None:
    plain, table = _transformed(parts, transforms)
    executor.set_local(_concat_table(plain))
    if table is not None:
        executor.set_local_transform(table)


def _contiguous(seg, side: str) -> bool:
    return seg[SEG["rows"]] == 1 or seg[SEG[f"{side}_pitch"]] == seg[SEG["row_bytes"]]


class StagingAllocator:
    """Device staging through torch: torch allocates, C++ copies."""

    def __init__(self, device: int):
        self.device = device
        self.keep = []

    def __call__(self, nbytes: int) -> int:
        if nbytes == 0:
            return 0
        buf = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{self.device}")
        self.keep.append(buf)
        return buf.data_ptr()


class CudaRefitExecutor(Executor):
    """A built C++ CudaExecutor run on the caller's stream, optionally as a captured graph: a
    CUDA plan's executor, and the loopback refit's. `ordering` (host-barrier IPC ordering)
    brackets each refit on the host; device-side ordering is inside the C++ executor."""

    def __init__(self, executor, staging, comm, device: int, ordering=None, keep=()):
        self.executor, self.staging, self.comm, self.device = executor, staging, comm, device
        self.ordering = ordering
        self.keep = list(keep)  # what the tables point into: peers' mapped memory

    def run(self, graph: bool, stream, sync: bool, timeout_s: float) -> None:
        if stream is None:
            stream = torch.cuda.current_stream(self.device).cuda_stream
        try:
            if self.ordering is not None:
                self.ordering.before(stream)
            if graph and self.executor.captured:
                self.executor.replay(stream)
            elif graph:
                self.executor.capture(stream)
            else:
                self.executor.run(stream)
            if self.ordering is not None:
                self.ordering.after(stream)
            if sync:
                self.executor.wait(stream, timeout_s)
        except RuntimeError as exc:
            raise RefitError(f"CUDA refit failed: {exc}") from exc

    def close(self) -> None:
        if self.keep:
            # Peers' memory is unmapped once nothing of this plan can still read it.
            torch.cuda.synchronize(self.device)
            self.keep.clear()


class CudaPlanExecutor(CudaRefitExecutor):
    """CUDA tensors: per peer, CUDA IPC (same node: direct reads of the peer's tensors in the
    fused local-copy kernel) or NCCL (fused pack, send/recv, fused unpack)."""

    transport = "cuda"

    @classmethod
    def for_plan(cls, rank_plan, src_addresses, dst_addresses, channel, device, threads,
                 ranks_per_node, links: PeerLinks | None = None,
                 transforms=None) -> "CudaPlanExecutor":
        require_cuda("a refit of CUDA tensors")
        index = int(device.split(":")[1]) if ":" in device else 0
        if transforms:  # assembled destinations: their copies land in carriers
            dst_addresses = transforms.bases(dst_addresses)
        if links is None:
            links = PeerLinks({r: "nccl" for r in channel.ranks if r != channel.rank})
        ipc_peers = links.peers("ipc")
        # NCCL peers' pieces into transformed destinations travel transformed (refit_engine.wire).
        wire_plan = wire.for_executor(transforms, ipc.without_peers(rank_plan, ipc_peers),
                                      set(channel.ranks) - ipc_peers - {channel.rank})
        nccl_plan = wire_plan.plan
        needs_nccl = len(nccl_plan.send_messages) + len(nccl_plan.recv_messages) > 0
        # One exchange tells every rank everyone's IPC exports and ordering handles, and any
        # rank's failure (a tensor IPC cannot share), so all raise together or none does.
        side, ordering, status = None, None, None
        try:
            side = ipc.ipc_side(rank_plan, links, src_addresses, links.src_key)
            if side.owners or side.readers:
                ordering = (_core.IpcFlags(index, channel.timeout_s) if links.ipc_sync == "device"
                            else _core.IpcEvents(index))
        except Exception as exc:  # reported on every rank below
            status = status_of(exc)
        handles = None
        if isinstance(ordering, _core.IpcFlags):
            handles = (ordering.handle, ordering.nonce)
        elif ordering is not None:
            handles = (ordering.ready_handle, ordering.done_handle)
        gathered = channel.gather((channel.rank, status, side, handles, needs_nccl),
                                  "IPC exports")
        raise_first([(g[0], g[1]) for g in gathered], "setting up CUDA IPC")
        sides = {g[0]: g[2] for g in gathered}
        peer_handles = {g[0]: g[3] for g in gathered}
        comm, group_rank_of = None, dict(channel.index_of)
        if any(g[4] for g in gathered):
            comm, group_rank_of = nccl_communicator(channel, index)
        owner_addresses, mappings = ipc.open_owners(channel.rank, side, sides,
                                                    len(src_addresses), index)
        direct = []
        for owner in side.owners:
            theirs = links.plan_of(owner).send
            direct.append(ipc.direct_part(
                theirs[theirs[:, SEG["peer"]] == channel.rank],
                rank_plan.recv[rank_plan.recv[:, SEG["peer"]] == owner],
                owner_addresses[owner], dst_addresses, owner, channel.rank))
        executor, staging = build_nccl_executor(nccl_plan, src_addresses, dst_addresses, comm,
                                                group_rank_of, index, direct=direct,
                                                transforms=transforms, wire_plan=wire_plan)
        host_ordering = None
        if isinstance(ordering, _core.IpcFlags):
            ordering.connect(side.owners, [peer_handles[o][0] for o in side.owners],
                             [peer_handles[o][1] for o in side.owners], side.readers,
                             [peer_handles[r][0] for r in side.readers],
                             [peer_handles[r][1] for r in side.readers])
            executor.set_ordering(ordering)
        elif ordering is not None:
            ordering.connect([peer_handles[o][0] for o in side.owners],
                             [peer_handles[r][1] for r in side.readers])
            host_ordering = ipc.IpcOrdering(ordering, channel)
        elif any(g[3] is not None for g in gathered):
            # Host ordering barriers are collective: a rank with no IPC peer of its own still
            # takes part in them, or the others would wait for it.
            host_ordering = ipc.IpcOrdering(None, channel) if links.ipc_sync == "host" else None
        out = cls(executor, staging, comm, index, host_ordering, [*mappings, ordering, transforms])
        out.peer_transports = {p: links.transports[p] for p in rank_plan.bytes_per_peer()}
        out.bytes_ipc = sum(segment_bytes(d[2]) for d in direct)
        out.wire_bytes_saved = wire_plan.bytes_saved
        out.staging_bytes = 2 * (max(nccl_plan.send_staging_bytes, default=0)
                                 + max(nccl_plan.recv_staging_bytes, default=0))
        return out


def nccl_communicator(channel: Channel, device: int):
    """An NCCL communicator over the channel's ranks, its id sent over the channel; and the
    map of global ranks to communicator ranks. Every rank raises the same RefitError, naming
    the ranks that failed, if any rank could not create it."""
    uid, problem = None, None
    if channel.index == 0:
        try:
            uid = _core.NcclCommunicator.unique_id()
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
    uid, problem = channel.gather((uid, problem), "NCCL unique id")[0]
    if problem:
        raise RefitError(f"rank {channel.ranks[0]} could not create an NCCL unique id: {problem}",
                         ranks=channel.ranks)
    # NOTE: NCCL gets half the timeout to create the communicator (it waits for every rank to
    # join, non-blocking, then aborts): a rank that failed at once waits in the gather below
    # for those still inside NCCL, and must hear from them before its own deadline.
    comm, problem, nccl_timeout_s = None, None, channel.timeout_s / 2
    started = time.monotonic()
    try:
        comm = _core.NcclCommunicator(uid, len(channel.ranks), channel.index, device,
                                      nccl_timeout_s)
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    try:
        reports = channel.gather((problem, time.monotonic() - started), "NCCL communicator")
    except BaseException:
        if comm is not None:  # a peer is gone: destroying the communicator could wait on it
            comm.abort()
        raise
    failed = {r: (p, t) for r, (p, t) in zip(channel.ranks, reports) if p}
    if failed:
        if comm is not None:
            comm.abort()
        # The causes: ranks that failed before NCCL's deadline (the others then waited for
        # them until it passed).
        causes = {r: p for r, (p, t) in failed.items() if t < 0.9 * nccl_timeout_s}
        causes = causes or {r: p for r, (p, _) in failed.items()}
        detail = "; ".join(f"rank {r}: {p}" for r, p in causes.items())
        raise RefitError(f"creating the NCCL communicator of ranks {channel.ranks} failed on "
                         f"ranks {sorted(failed)}: {detail}", ranks=sorted(causes))
    return comm, dict(channel.index_of)


def build_nccl_executor(plan: RankPlan, src_bases: np.ndarray, dst_bases: np.ndarray,
                        comm, group_rank_of: dict, device: int, zero_copy: bool = True,
                        direct=(), transforms=None, wire_plan=None):
    """One rank's executor over NCCL. `group_rank_of` maps global ranks to communicator ranks.
    direct: (source addresses, destination addresses, segments) parts copied in the local
    kernel (IPC reads of peers' tensors). transforms: this rank's RankTransforms (dst_bases
    already its extended table); wire_plan: the refit_engine.wire.WirePlan `plan` came from
    (its pack transform rows)."""
    alloc = StagingAllocator(device)
    send_size = max(plan.send_staging_bytes, default=0)
    recv_size = max(plan.recv_staging_bytes, default=0)
    send_staging = [alloc(send_size), alloc(send_size)]
    recv_staging = [alloc(recv_size), alloc(recv_size)]
    executor = _core.CudaExecutor(device, comm)
    _set_local(executor, [_part(plan.local, src_bases, dst_bases), *direct], transforms)
    added = 0
    for bucket in range(plan.num_buckets):
        if not (np.any(plan.send[:, SEG["bucket"]] == bucket)
                or np.any(plan.recv[:, SEG["bucket"]] == bucket)):
            continue  # every message of the bucket goes over IPC
        # NOTE: by the executor's bucket count, not the plan's: the executor guards staging
        # buffer k % 2 against its own bucket k - 2.
        parity, added = added % 2, added + 1
        src, dst, send = _part(segments_in_bucket(plan.send, bucket), src_bases, dst_bases,
                               dst_staging=send_staging[parity])
        pack_transform = None
        if wire_plan is not None:
            table = wire.pack_table(wire_plan, bucket, src_bases, send_staging[parity])
            pack_transform = _core.TransformTable(table) if table is not None else None
        packed = wire.packed_peers(wire_plan, bucket) if wire_plan is not None else set()
        sends, keep_send = _messages(plan.send_messages, bucket, send, src, "src",
                                     send_staging[parity], group_rank_of, zero_copy,
                                     staged_peers=packed)
        r_src, r_dst, recv = _part(segments_in_bucket(plan.recv, bucket), src_bases, dst_bases,
                                   src_staging=recv_staging[parity])
        # Segments into transformed destinations are unpacked by the transform table, never
        # received in place (the wire carries the source's format).
        plain, unpack_transform = np.ones(len(recv), dtype=bool), None
        if transforms:
            plain, rows = transforms.split(r_src, recv)
            unpack_transform = _core.TransformTable(rows.table()) if len(rows) else None
        recvs, keep_recv = _messages(plan.recv_messages, bucket, recv, r_dst, "dst",
                                     recv_staging[parity], group_rank_of, zero_copy,
                                     eligible=plain)
        keep_recv &= plain
        executor.add_bucket(_table(src[keep_send], dst[keep_send], send[keep_send]), sends, recvs,
                            None, _table(r_src[keep_recv], r_dst[keep_recv], recv[keep_recv]),
                            pack_transform, unpack_transform)
    _finish(executor, transforms)
    return executor, alloc


def _messages(messages, bucket, segments, tensor_addr, tensor_side, staging_base, group_rank_of,
              zero_copy, eligible=None, staged_peers=frozenset()):
    """(peer, address, bytes) rows of one bucket, and which segments still go through staging.

    A message that is one contiguous piece of one tensor goes zero-copy: sent from (or received
    into) the tensor itself, with no pack (or unpack). Each side decides alone: the bytes on the
    wire are the same either way. eligible: the segments that may go zero-copy (default all;
    not those into transformed destinations); staged_peers: peers whose message also holds
    pieces the pack transforms (refit_engine.wire), never zero-copy.
    """
    keep = np.ones(len(segments), dtype=bool)
    rows = []
    for peer, offset, nbytes in bucket_messages(messages, bucket):
        address = staging_base + offset
        mine = np.flatnonzero(segments[:, SEG["peer"]] == peer)
        if (zero_copy and len(mine) == 1 and _contiguous(segments[mine[0]], tensor_side)
                and (eligible is None or eligible[mine[0]]) and peer not in staged_peers):
            address = int(tensor_addr[mine[0]])
            keep[mine[0]] = False
        rows.append((group_rank_of[peer], address, nbytes))
    return np.array(rows, dtype=np.int64).reshape(-1, 3), keep


def build_loopback_executor(plans: dict[int, RankPlan], src_bases: dict, dst_bases: dict,
                            device: int, transforms: dict | None = None):
    """Every rank of a plan in one process on one GPU: the exchange is a device copy.

    src_bases / dst_bases: rank -> address array over that side's buffers (0 where absent).
    transforms: rank -> its RankTransforms (dst_bases already their extended tables); plans
    are then rewritten for the wire (refit_engine.wire), every peer a wire peer.
    """
    transforms = transforms or {}
    wires = {r: wire.for_executor(transforms.get(r), p, set(plans) - {r})
             for r, p in plans.items()}
    plans = {r: w.plan for r, w in wires.items()}
    alloc = StagingAllocator(device)
    ranks = sorted(plans)
    # Each rank's staging lives at an offset inside two shared buffers per direction.
    send_off, recv_off, send_total, recv_total = {}, {}, 0, 0
    for r in ranks:
        send_off[r], recv_off[r] = send_total, recv_total
        send_total += max(plans[r].send_staging_bytes, default=0)
        recv_total += max(plans[r].recv_staging_bytes, default=0)
    send_staging = [alloc(send_total), alloc(send_total)]
    recv_staging = [alloc(recv_total), alloc(recv_total)]
    executor = _core.CudaExecutor(device, None)
    _set_local(executor, [_part(plans[r].local, src_bases[r], dst_bases[r]) for r in ranks],
               [transforms.get(r) for r in ranks])
    num_buckets = max((plans[r].num_buckets for r in ranks), default=0)
    for bucket in range(num_buckets):
        p = bucket % 2
        packs, unpacks, moves_from, moves_to, moves_bytes, pack_rows = [], [], [], [], [], []
        for r in ranks:
            plan = plans[r]
            packs.append(_part(segments_in_bucket(plan.send, bucket), src_bases[r],
                               dst_staging=send_staging[p] + send_off[r]))
            table = wire.pack_table(wires[r], bucket, src_bases[r], send_staging[p] + send_off[r])
            if table is not None:
                pack_rows.append(table)
            unpacks.append(_part(segments_in_bucket(plan.recv, bucket), dst_bases=dst_bases[r],
                                 src_staging=recv_staging[p] + recv_off[r]))
            for peer, offset, nbytes in bucket_messages(plan.recv_messages, bucket):
                sender = plans[peer].send_messages
                match = sender[(sender[:, MSG["peer"]] == r) & (sender[:, MSG["bucket"]] == bucket)]
                if len(match) != 1 or match[0, MSG["bytes"]] != nbytes:
                    raise RefitError(f"bucket {bucket}: rank {r} expects {nbytes} bytes from rank "
                                     f"{peer}, which does not send them", ranks=[r, peer])
                moves_from.append(send_staging[p] + send_off[peer] + int(match[0, MSG["offset"]]))
                moves_to.append(recv_staging[p] + recv_off[r] + offset)
                moves_bytes.append(nbytes)
        exchange = None
        if moves_bytes:  # one contiguous row per message: pitch = row bytes = message bytes
            nbytes = np.array(moves_bytes, dtype=np.int64)
            exchange = _core.SegmentTable(
                src=np.array(moves_from, dtype=np.int64), dst=np.array(moves_to, dtype=np.int64),
                src_pitch=nbytes, dst_pitch=nbytes, rows=np.ones(len(nbytes), dtype=np.int64),
                row_bytes=nbytes)
        empty = np.zeros((0, 3), dtype=np.int64)
        unpacks, unpack_transform = _transformed(unpacks, [transforms.get(r) for r in ranks])
        pack_transform = (_core.TransformTable({k: np.concatenate([t[k] for t in pack_rows])
                                                for k in pack_rows[0]}) if pack_rows else None)
        executor.add_bucket(_concat_table(packs), empty, empty, exchange, _concat_table(unpacks),
                            pack_transform, unpack_transform)
    _finish(executor, [transforms.get(r) for r in ranks])
    return executor, alloc


def build_direct_loopback_executor(plans: dict[int, RankPlan], src_bases: dict, dst_bases: dict,
                                   device: int, transforms: dict | None = None):
    """Loopback with no staging: each sender's piece is copied straight into its receiver's
    tensor (both live in this process), all in one fused kernel. This is the floor-approaching
    path a single-address-space transport allows; the staged builder exercises the NCCL path."""
    transforms = transforms or {}
    parts = [_part(p.local, src_bases[r], dst_bases[r]) for r, p in plans.items()]
    owners = list(plans)  # whose transforms each part's destinations are
    for r, plan in plans.items():
        for s in np.unique(plan.recv[:, SEG["peer"]]).tolist():
            sender = plans[s].send
            parts.append(ipc.direct_part(sender[sender[:, SEG["peer"]] == r],
                                         plan.recv[plan.recv[:, SEG["peer"]] == s],
                                         src_bases[s], dst_bases[r], s, r))
            owners.append(r)
    executor = _core.CudaExecutor(device, None)
    _set_local(executor, parts, [transforms.get(r) for r in owners])
    _finish(executor, [transforms.get(r) for r in plans])
    return executor, StagingAllocator(device)


def _concat_table(parts):
    parts = [p for p in parts if len(p[2])]
    if not parts:
        return None
    return _table(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                  np.concatenate([p[2] for p in parts]))
