"""The one place an executor is chosen: by where the plan's tensors are ("gloo" for CPU
tensors; "cuda" for CUDA tensors, whose executor picks NCCL or CUDA IPC per peer)."""

from __future__ import annotations

from refit_engine.executors.base import Executor
from refit_engine.executors.cpu import GlooExecutor
from refit_engine.executors.cuda import CudaPlanExecutor

EXECUTORS: dict[str, type[Executor]] = {cls.transport: cls for cls in (GlooExecutor, CudaPlanExecutor)}


def transport_of(device: str) -> str:
    """The transport of a plan whose tensors are on `device` ("cpu", "cuda" or "cuda:N")."""
    return "cuda" if device.split(":")[0] == "cuda" else "gloo"


def build_executor(transport: str, rank_plan, src_addresses, dst_addresses, channel, device: str,
                   threads: int | None, ranks_per_node: int, links=None,
                   transforms=None) -> Executor:
    """This rank's executor of `rank_plan` for `transport` (see `Executor.for_plan`)."""
    return EXECUTORS[transport].for_plan(rank_plan, src_addresses, dst_addresses, channel, device,
                                        threads, ranks_per_node, links=links,
                                        transforms=transforms or None)
