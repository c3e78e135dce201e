"""Loopback refit: every rank of a plan inside one process on one GPU.

The transport is a device copy, so plans and kernels run end to end at real per-rank sizes on a
single GPU: what the multi-GPU executor would move, moved here through the same pack, exchange
and unpack steps.

    refit = LoopbackRefit(src_layout, dst_layout, src_tensors, dst_tensors)
    refit.run()              # or refit.run(graph=True): capture once, replay after
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

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
from refit_engine.transforms import RankTransforms, buffer_formats, dtype_of
from refit_engine.wire import wire_targets


def _bases(layout: Layout, tensors: dict, side: str, device: str, real=None) -> dict:
    """rank -> address of each buffer; real: buffer index -> its dtype where the tensor's
    differs from the layout's (transformed destinations, planned as their carrier)."""
    out = {r: np.zeros(len(layout.buffers), dtype=np.int64) for r in layout.ranks}
    for index, meta in enumerate(layout.buffers):
        tensor = tensors.get((meta.rank, meta.key))
        if tensor is None:
            raise RefitError(f"no {side} tensor bound for local tensor '{meta.key}'",
                             tensor=meta.key, ranks=[meta.rank])
        if real and index in real:
            meta = dataclasses.replace(meta, dtype=real[index])
        out[meta.rank][index] = checked_info(meta, tensor, side, device).address
    return out


class LoopbackRefit(Executor):
    """Every rank's plan of a refit, run in this process on one GPU (no transport: not built
    by the factory, which builds one rank's executor)."""

    def __init__(self, src: Layout, dst: Layout, src_tensors: dict, dst_tensors: dict,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, device: int = 0, direct: bool = False,
                 formats: dict | None = None, scales: dict | None = None):
        """src_tensors / dst_tensors: (rank, key) -> tensor on cuda:`device` for every buffer.

        direct=False runs the NCCL executor's data path (pack, exchange by device copy, unpack,
        bucket by bucket); direct=True copies every piece straight from source to destination.
        formats: {tensor name: transforms.TensorFormat} of destinations in another format
        (`dst` then describes them in their source's dtype, as the plan compiler plans them;
        their tensors are in the format's dtype), scales: (rank, key) -> scale tensor of each
        quantized destination.
        """
        require_cuda("the loopback executor")
        self.plans = Planner(src, dst, bucket_bytes).plan_all()
        where = f"cuda:{device}"
        formats, scales = formats or {}, scales or {}
        chosen = buffer_formats(dst, formats)
        real = {b: "uint8" if f.quantized else dtype_of(f.dst) for b, f in chosen.items()}
        src_bases = _bases(src, src_tensors, "source", where)
        dst_bases = _bases(dst, dst_tensors, "destination", where, real)
        self.transforms = {}
        if formats:
            for r, plan in self.plans.items():
                mine = {b: t for (rank, key), t in dst_tensors.items() if rank == r
                        for b in [dst.buffer_index(r, key)]}
                keyed = {key: t for (rank, key), t in scales.items() if rank == r}
                rt = RankTransforms(plan, dst, formats, mine, keyed,
                                    lambda n: torch.empty(n, dtype=torch.uint8, device=where))
                self.transforms[r] = rt
                dst_bases[r] = rt.bases(dst_bases.get(r, np.zeros(len(dst.buffers), np.int64)))
            targets = wire_targets(dst, formats, {r: t.fused for r, t in self.transforms.items()})
            for rt in self.transforms.values():
                rt.connect(targets, self.plans.__getitem__)
        empty_src = np.zeros(len(src.buffers), dtype=np.int64)
        empty_dst = np.zeros(len(dst.buffers), dtype=np.int64)
        build = build_direct_loopback_executor if direct else build_loopback_executor
        self.executor, self._staging = build(
            self.plans, {r: src_bases.get(r, empty_src) for r in self.plans},
            {r: dst_bases.get(r, empty_dst) for r in self.plans}, device, self.transforms)
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
