"""CPU executor: pack/unpack in C++ threads, one message per peer per bucket over gloo.

Buckets are double-buffered: bucket k+1 is packed and posted while bucket k is in flight, and
local copies run while bucket 0 travels. Every wait has a timeout; a timeout or transport error
becomes a RefitError naming the peers still outstanding.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from refit_engine import _core, wire
from refit_engine.compiler import RankPlan, bucket_messages, segments_in_bucket
from refit_engine.errors import RefitError
from refit_engine.executors.base import Executor
from refit_engine.tables import SEG



def default_threads(ranks_on_machine: int) -> int:
    """Copy threads per rank: the machine's cores shared among its ranks, at most 4."""
    return max(1, min(4, (os.cpu_count() or 1) // max(1, ranks_on_machine)))


class GlooExecutor(Executor):
    """CPU tensors: packs and unpacks in C++ threads, messages over the plan's gloo group."""

    transport = "gloo"

    @classmethod
    def for_plan(cls, rank_plan, src_addresses, dst_addresses, channel, device, threads,
                 ranks_per_node, links=None, transforms=None) -> "GlooExecutor":
        if threads is None:
            threads = default_threads(ranks_per_node or len(channel.ranks))
        return cls(rank_plan, src_addresses, dst_addresses, channel, threads, transforms)

    def __init__(self, plan: RankPlan, src_addresses: np.ndarray, dst_addresses: np.ndarray,
                 channel, threads: int = 1, transforms=None):
        # Pieces into transformed destinations travel transformed (refit_engine.wire); the
        # receive copies of those land through the extended address table
        # (transforms.RankTransforms.bases), as assembled tensors' copies land in carriers.
        self.wire = wire.for_executor(transforms, plan, set(channel.ranks) - {plan.rank})
        plan = self.wire.plan
        self.plan = plan
        self.wire_bytes_saved = self.wire.bytes_saved
        self.src_addresses = src_addresses
        self.dst_addresses = transforms.bases(dst_addresses) if transforms else dst_addresses
        # The plan's own gloo group (refit_engine.channel): peers by their index in it.
        self.channel = channel
        self.threads = threads
        self.num_buckets = plan.num_buckets
        # Per bucket: the segments and (peer, offset, bytes) messages of each direction,
        # computed once.
        buckets = range(self.num_buckets)

        self._send_msgs = [bucket_messages(plan.send_messages, b) for b in buckets]
        self._recv_msgs = [bucket_messages(plan.recv_messages, b) for b in buckets]
        send_max = max(plan.send_staging_bytes, default=0)
        recv_max = max(plan.recv_staging_bytes, default=0)
        # Two staging buffers per direction: bucket k+1 fills one while bucket k uses the other.
        self._send_staging = [torch.empty(send_max, dtype=torch.uint8) for _ in range(2)]
        self._recv_staging = [torch.empty(recv_max, dtype=torch.uint8) for _ in range(2)]
        # (plain segments, transform table or None) of the local copies and of each unpack;
        # the transform rows carry absolute addresses (staging is fixed for the plan's life).
        self._local = self._split(plan.local, self.src_addresses[plan.local[:, SEG["src_buffer"]]]
                                  + plan.local[:, SEG["src_offset"]], transforms)
        self._send = [(segments_in_bucket(plan.send, b),
                       wire.pack_table(self.wire, b, self.src_addresses,
                                       self._send_staging[b % 2].data_ptr()))
                      for b in buckets]
        self._recv = []
        for b in buckets:
            recv = segments_in_bucket(plan.recv, b)
            staging = self._recv_staging[b % 2].data_ptr() if recv_max else 0
            self._recv.append(self._split(recv, staging + recv[:, SEG["src_offset"]], transforms))
        self._finish = transforms.finish_table() if transforms else None
        self._keep = transforms  # its carriers are where assembled tensors land

    @staticmethod
    def _split(segments, src, transforms):
        if transforms is None or not len(segments):
            return segments, None
        return transforms.split_table(src, segments)

    def _copy(self, part, src_staging=0, dst_staging=0):
        segments, transform = part
        if len(segments):
            _core.cpu_copy_segments(segments, self.src_addresses, src_staging,
                                    self.dst_addresses, dst_staging, self.threads)
        if transform is not None:
            _core.transform_cpu(transform)

    def _post(self, bucket: int):
        """Starts every send and receive of `bucket`; returns [(work, peer, direction)]."""
        send, recv = self._send_staging[bucket % 2], self._recv_staging[bucket % 2]
        works = []
        pg, index_of = self.channel.pg, self.channel.index_of
        for peer, offset, nbytes in self._recv_msgs[bucket]:
            works.append((pg.recv([recv[offset:offset + nbytes]], index_of[peer], bucket), peer,
                          "receive from"))
        for peer, offset, nbytes in self._send_msgs[bucket]:
            works.append((pg.send([send[offset:offset + nbytes]], index_of[peer], bucket), peer,
                          "send to"))
        return works

    def _wait(self, works, bucket: int):
        for i, (work, peer, direction) in enumerate(works):
            try:
                work.wait(self.channel.timeout)
            except Exception as exc:  # gloo raises RuntimeError subclasses on timeout or loss
                pending = sorted({p for _, p, _ in works[i:]})
                self.channel.broken = f"bucket {bucket} failed"
                raise RefitError(
                    f"bucket {bucket}: could not {direction} rank {peer} within "
                    f"{self.channel.timeout_s:g} s ({type(exc).__name__}: {exc}); "
                    f"peers still outstanding: {pending}",
                    ranks=[self.plan.rank, *pending]) from exc

    def run(self, graph: bool, stream, sync: bool, timeout_s: float) -> None:
        """One refit: always synchronous (stream and sync are moot), never a CUDA graph, and
        every wait bounded by the channel's timeout (the plan's timeout_s)."""
        if graph:
            raise RefitError("graph=True captures a CUDA graph; this plan moves CPU tensors",
                             ranks=[self.plan.rank])
        in_flight = None
        if self.num_buckets:
            self._copy(self._send[0], dst_staging=self._send_staging[0].data_ptr())
            in_flight = self._post(0)
        self._copy(self._local)  # overlaps bucket 0's transfer
        for bucket in range(self.num_buckets):
            following = None
            if bucket + 1 < self.num_buckets:
                nxt = bucket + 1
                self._copy(self._send[nxt], dst_staging=self._send_staging[nxt % 2].data_ptr())
                following = self._post(nxt)
            self._wait(in_flight, bucket)
            self._copy(self._recv[bucket], src_staging=self._recv_staging[bucket % 2].data_ptr())
            in_flight = following
        if self._finish is not None:  # assembled tensors: quantized once every copy landed
            _core.transform_cpu(self._finish)
