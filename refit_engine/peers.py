"""Which transport carries each pair of ranks of a CUDA plan: CUDA IPC or NCCL.

Every rank reports where its tensors are (`DeviceId`: host, GPU, index) at plan time; every
rank then derives the same choice from the same gathered list, so no further agreement is
needed. IPC needs the two ranks on one node (the same host); NCCL needs them on different
GPUs (it refuses two ranks of one communicator on one GPU, which is how a trainer and an
inference engine sharing GPUs run: only IPC can refit them).

    transport="auto":  IPC within a node, NCCL across nodes (the default)
    transport="ipc":   IPC for every pair (refused when two ranks are on different nodes)
    transport="nccl":  NCCL for every pair (refused when two ranks share a GPU)
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch

from refit_engine.errors import RefitError

TRANSPORTS = ("auto", "ipc", "nccl")
IPC_SYNCS = ("host", "device")


@dataclass(frozen=True)
class DeviceId:
    """Where one rank's tensors are: its host, its GPU's UUID ("" on CPU) and CUDA index."""

    host: str
    gpu: str
    index: int

    def __str__(self) -> str:
        return f"{self.host}:cuda:{self.index} ({self.gpu[:13]})" if self.gpu else self.host


def this_device(device: str) -> DeviceId:
    """This process's DeviceId for tensors on `device` ("cpu" or "cuda:N")."""
    # NOTE: REFIT_ENGINE_HOST names the node where hostnames repeat across nodes (containers);
    # the same value on two ranks means they can map each other's GPU memory.
    host = os.environ.get("REFIT_ENGINE_HOST") or socket.gethostname()
    if not device.startswith("cuda"):
        return DeviceId(host, "", -1)
    index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
    return DeviceId(host, str(torch.cuda.get_device_properties(index).uuid), index)


@dataclass
class PeerLinks:
    """How this rank reaches each peer of a CUDA plan, and what the IPC path needs."""

    transports: dict[int, str]  # every other rank of the plan -> "ipc" | "nccl"
    plan_of: Callable | None = None  # peer rank -> its RankPlan (IPC readers need the sender's)
    ipc_sync: str = "device"
    src_key: Callable | None = None  # source buffer index -> its key, for errors

    def peers(self, kind: str) -> set[int]:
        return {p for p, t in self.transports.items() if t == kind}


def _shared_gpus(devices: dict[int, DeviceId]) -> dict[tuple, list[int]]:
    by_gpu: dict[tuple, list[int]] = {}
    for rank, d in sorted(devices.items()):
        by_gpu.setdefault((d.host, d.gpu), []).append(rank)
    return {gpu: ranks for gpu, ranks in by_gpu.items() if len(ranks) > 1}


def choose_transports(rank: int, devices: dict[int, DeviceId], transport: str) -> dict[int, str]:
    """{peer: "ipc" | "nccl"} for every other rank in `devices` (rank -> DeviceId of every
    rank of the plan). Raises RefitError, the same on every rank, when `transport` cannot
    carry some pair; NCCL is all-or-nothing per plan (one communicator of every rank), so
    "auto" with ranks across nodes refuses ranks that share a GPU."""
    if transport not in TRANSPORTS:
        raise RefitError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
    shared = _shared_gpus(devices)
    hosts = {d.host for d in devices.values()}
    if transport == "nccl" and shared:
        (host, gpu), ranks = next(iter(shared.items()))
        raise RefitError(f"transport='nccl', but ranks {ranks} share one GPU ({host}, "
                         f"{devices[ranks[0]]}): NCCL refuses two ranks on one GPU; use "
                         "transport='ipc' or 'auto' (CUDA IPC within a node)", ranks=ranks)
    if transport == "ipc" and len(hosts) > 1:
        first = {}
        for r, d in sorted(devices.items()):
            first.setdefault(d.host, r)
        raise RefitError(f"transport='ipc', but the plan's ranks are on {len(hosts)} nodes "
                         f"({', '.join(f'rank {r} on {h}' for h, r in first.items())}): CUDA IPC "
                         "maps memory within a node only; use transport='auto'",
                         ranks=sorted(first.values()))
    if transport == "auto" and len(hosts) > 1 and shared:
        (host, _), ranks = next(iter(shared.items()))
        raise RefitError(f"ranks {ranks} share one GPU on {host}, and the plan spans "
                         f"{len(hosts)} nodes: the NCCL communicator its cross-node peers need "
                         "cannot hold two ranks of one GPU", ranks=ranks)
    mine = devices[rank]
    out = {}
    for peer, d in devices.items():
        if peer != rank:
            same_node = d.host == mine.host
            out[peer] = "nccl" if transport == "nccl" or not same_node else "ipc"
    return out
