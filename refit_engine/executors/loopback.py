"""Loopback refit: every rank of a plan inside one process on one GPU.

The transport is a device copy, so plans and kernels run end to end at real per-rank sizes on a
single GPU: what the multi-GPU executor would move, moved here through the same pack, exchange
and unpack steps.

    refit = LoopbackRefit(src_layout, dst_layout, src_tensors, dst_tensors)
    refit.run()              # or refit.run(graph=True): capture once, replay after
"""

from __future__ import annotations

import numpy as np

from refit_engine.compiler import DEFAULT_BUCKET_BYTES, Planner
from refit_engine.errors import RefitError
from refit_engine.executors.base import Executor
from refit_engine.executors.cuda import (
    CudaRefitExecutor,
    build_direct_loopback_executor,
    build_loopback_executor,
    require_cuda,
)
from refit_engine.layouts import Layout
from refit_engine.local import checked_info
from refit_engine.refit import DEFAULT_TIMEOUT_S


def _bases(layout: Layout, tensors: dict, side: str, device: str) -> dict:
    out = {r: np.zeros(len(layout.buffers), dtype=np.int64) for r in layout.ranks}
    for index, meta in enumerate(layout.buffers):
        tensor = tensors.get((meta.rank, meta.key))
        if tensor is None:
            raise RefitError(f"no {side} tensor bound for local tensor '{meta.key}'",
                             tensor=meta.key, ranks=[meta.rank])
        out[meta.rank][index] = checked_info(meta, tensor, side, device).address
    return out


class LoopbackRefit(Executor):
    """Every rank's plan of a refit, run in this process on one GPU (no transport: not built
    by the factory, which builds one rank's executor)."""

    def __init__(self, src: Layout, dst: Layout, src_tensors: dict, dst_tensors: dict,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: int = 0, direct: bool = False):
        """src_tensors / dst_tensors: (rank, key) -> tensor on cuda:`device` for every buffer.

        direct=False runs the NCCL executor's data path (pack, exchange by device copy, unpack,
        bucket by bucket); direct=True copies every piece straight from source to destination.
        """
        require_cuda("the loopback executor")
        self.plans = Planner(src, dst, bucket_bytes).plan_all()
        where = f"cuda:{device}"
        src_bases = _bases(src, src_tensors, "source", where)
        dst_bases = _bases(dst, dst_tensors, "destination", where)
        empty_src = np.zeros(len(src.buffers), dtype=np.int64)
        empty_dst = np.zeros(len(dst.buffers), dtype=np.int64)
        build = build_direct_loopback_executor if direct else build_loopback_executor
        self.executor, self._staging = build(
            self.plans, {r: src_bases.get(r, empty_src) for r in self.plans},
            {r: dst_bases.get(r, empty_dst) for r in self.plans}, device)
        self.device = device
        self.keep = (src_tensors, dst_tensors)
        self._runner = CudaRefitExecutor(self.executor, self._staging, None, device)

    def bytes_moved(self) -> dict:
        return {"local": sum(p.bytes_local for p in self.plans.values()),
                "remote": sum(p.bytes_sent for p in self.plans.values())}

    def run(self, graph: bool = False, stream: int | None = None, sync: bool = True,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Enqueue one refit on `stream` (default: torch's current stream); wait if `sync`."""
        self._runner.run(graph, stream, sync, timeout_s)
