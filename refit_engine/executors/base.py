"""The executor interface: what `refit.execute` runs, whatever moves the bytes.

An executor is one rank's compiled plan bound to that rank's tensors (addresses fixed at
binding). `refit.plan` builds one through `executors.factory.build_executor`, keyed by the
plan's tensors ("gloo" for CPU tensors, "cuda" for CUDA tensors: NCCL or CUDA IPC per peer);
every refit is one `run`.
A new transport is a new `Executor` subclass in its own module and one line in the factory.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

from refit_engine.channel import Channel
from refit_engine.compiler import RankPlan


class Executor(abc.ABC):
    """Runs one refit per `run`, as often as asked, on the same tensors."""

    # The factory's key: how bytes travel between ranks.
    transport: str = ""
    # What `plan.traffic` reports beyond the plan's own figures: bytes this rank reads from
    # peers' memory (CUDA IPC), device staging it allocated, and each peer's transport.
    bytes_ipc: int = 0
    staging_bytes: int = 0
    # Bytes its messages no longer carry because their pieces travel transformed (sent plus
    # received: refit_engine.wire).
    wire_bytes_saved: int = 0
    peer_transports: Mapping = MappingProxyType({})  # read-only: instances set their own

    @classmethod
    def for_plan(cls, rank_plan: RankPlan, src_addresses: np.ndarray, dst_addresses: np.ndarray,
                 channel: Channel, device: str, threads: int | None,
                 ranks_per_node: int, links=None, transforms=None) -> "Executor":
        """This rank's executor of `rank_plan`, over the plan's `channel` (its gloo group: the
        peers, their order, the timeout). src_addresses / dst_addresses: address of each
        buffer of that side (0 where not this rank's); device: "cpu" or "cuda:N", where this
        rank's tensors are; threads: copy threads (None: the executor's default, which may
        depend on ranks_per_node). Collective over the channel when the transport needs setup
        (an NCCL communicator). links: a `peers.PeerLinks`, how a CUDA plan reaches each peer
        (None: NCCL to every peer). transforms: a `transforms.RankTransforms` (None: every
        destination holds its source's format), whose table rows replace the plain copies
        into transformed tensors."""
        raise NotImplementedError(f"{cls.__name__} is not built from one rank's plan")

    @abc.abstractmethod
    def run(self, graph: bool, stream: int | None, sync: bool, timeout_s: float) -> None:
        """One refit. graph: capture it as a CUDA graph on the first call, replay after (CUDA
        only); stream: the CUDA stream handle to order it on (None: torch's current stream;
        ignored on CPU); sync: wait for it to finish; timeout_s: how long any wait may take.
        Raises RefitError."""

    def close(self) -> None:
        """Releases what the executor holds beyond memory (nothing, unless overridden); the
        plan calls it when it is closed. Resources go with the executor when it is dropped."""
