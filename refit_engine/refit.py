"""The Python API: `plan` (the one collective step) and `execute` (every refit).

    plan = refit_engine.plan(src_model, dst_model)   # gathers layouts once, compiles, binds
    stats = refit_engine.execute(plan)                # moves the weights; reuse plan every step

Models are megatron-core model chunks (a module or a list of them), `ShardedTensors`, or None
on ranks that do not hold that model (non-collocated). Every rank of `group` calls both.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from refit_engine import arrays
from refit_engine.errors import RefitError
from refit_engine.layouts import Layout
from refit_engine.local import ShardedTensors, build_layout
from refit_engine.planner import DEFAULT_BUCKET_BYTES, Planner, RankPlan

# Seconds any wait of a refit may take before it raises (override per plan or with
# REFIT_ENGINE_TIMEOUT_S): long enough for a multi-GiB bucket, short enough to not hang a job.
DEFAULT_TIMEOUT_S = float(os.environ.get("REFIT_ENGINE_TIMEOUT_S", "300"))


def describe(model) -> ShardedTensors:
    """This rank's tensors of `model`, whatever kind of model it is."""
    if model is None:
        return ShardedTensors()
    if isinstance(model, ShardedTensors):
        return model
    from refit_engine import megatron  # imports torch and megatron-core only when needed
    return megatron.describe(model)


def _gather(obj, group):
    import torch.distributed as dist
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _raise_first(statuses, what: str):
    """Raise on every rank the first rank's error (statuses gathered from all ranks)."""
    for rank, status in statuses:
        if isinstance(status, RefitError):
            raise status
        if status is not None:
            raise RefitError(f"{what} failed on rank {rank}: {status}", ranks=[rank])


@dataclass
class Plan:
    """A compiled refit, bound to this rank's tensors. Reuse it for every refit."""

    rank: int
    rank_plan: RankPlan
    src_layout: Layout
    dst_layout: Layout
    group: object
    timeout_s: float
    executor: object = field(repr=False, default=None)
    src_tensors: dict = field(repr=False, default_factory=dict)  # buffer index -> tensor
    dst_tensors: dict = field(repr=False, default_factory=dict)
    broken: str | None = None
    refits: int = 0

    @property
    def fingerprint(self) -> str:
        return self.rank_plan.fingerprint()


def _bind(layout: Layout, local: ShardedTensors, rank: int, side: str) -> tuple[dict, np.ndarray]:
    """Buffer index -> tensor for this rank's buffers, checked; plus the address table."""
    addresses = np.zeros(len(layout.buffers), dtype=np.int64)
    bound = {}
    for index in layout.buffers_of(rank):
        meta = layout.buffers[index]
        tensor = local.tensors[meta.key]
        info = arrays.info(tensor)
        problem = None
        if info.device == "meta":
            problem = "is a meta tensor (no storage)"
        elif info.device != "cpu":
            problem = f"is on {info.device}; the CPU executor needs CPU tensors"
        elif not info.contiguous:
            problem = "is not contiguous"
        if problem:
            raise RefitError(f"{side} local tensor '{meta.key}' {problem}", tensor=meta.key,
                             ranks=[rank])
        bound[index] = tensor
        addresses[index] = info.address
    return bound, addresses


def plan(src_model, dst_model, group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
         timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None) -> Plan:
    """Gather every rank's layouts over `group`, validate, compile this rank's plan and bind it.

    Raises RefitError on every rank, before any byte moves, if any rank's input is bad.
    """
    import torch.distributed as dist
    if not dist.is_initialized():
        raise RefitError("torch.distributed is not initialized: call init_process_group first")
    rank = dist.get_rank()
    try:
        src_local, dst_local = describe(src_model), describe(dst_model)
        status = None
    except Exception as exc:  # reported on every rank below
        src_local = dst_local = ShardedTensors()
        status = exc if isinstance(exc, RefitError) else f"{type(exc).__name__}: {exc}"
    gathered = _gather((rank, status, src_local.entries, dst_local.entries), group)
    _raise_first([(r, s) for r, s, _, _ in gathered], "describing the models")
    src_layout = build_layout([(r, s) for r, _, s, _ in gathered])
    dst_layout = build_layout([(r, d) for r, _, _, d in gathered])
    rank_plan = Planner(src_layout, dst_layout, bucket_bytes).plan_rank(rank)

    # Bind tensors and check them; then check that every rank compiled from the same layouts.
    layouts_digest = hashlib.blake2b(repr((src_layout.tables()[1:], dst_layout.tables()[1:]))
                                     .encode(), digest_size=8).hexdigest()
    try:
        src_tensors, src_addr = _bind(src_layout, src_local, rank, "source")
        dst_tensors, dst_addr = _bind(dst_layout, dst_local, rank, "destination")
        status = None
    except RefitError as exc:
        status = exc
    checks = _gather((rank, status, layouts_digest), group)
    _raise_first([(r, s) for r, s, _ in checks], "binding tensors")
    digests = {d for _, _, d in checks}
    if len(digests) != 1:
        raise RefitError("ranks disagree on the gathered layouts", ranks=[r for r, _, _ in checks])

    from refit_engine.executors.cpu import GlooExecutor
    if threads is None:
        threads = max(1, min(4, (os.cpu_count() or 1) // max(1, dist.get_world_size(group))))
    executor = GlooExecutor(rank_plan, src_addr, dst_addr, group, timeout_s, threads)
    return Plan(rank, rank_plan, src_layout, dst_layout, group, timeout_s, executor,
                src_tensors, dst_tensors)


def execute(plan: Plan) -> dict:
    """Run one refit. Returns statistics: bytes local / sent / received, per peer, elapsed."""
    if plan.broken:
        raise RefitError(f"plan is unusable after an earlier failure ({plan.broken}); build a "
                         "new plan", ranks=[plan.rank])
    t0 = time.perf_counter()
    try:
        plan.executor.run()
    except RefitError as exc:
        plan.broken = str(exc)
        raise
    elapsed = time.perf_counter() - t0
    plan.refits += 1
    rp = plan.rank_plan
    return {"rank": plan.rank, "elapsed_s": elapsed, "bytes_local": rp.bytes_local,
            "bytes_sent": rp.bytes_sent, "bytes_received": rp.bytes_received,
            "per_peer": rp.bytes_per_peer(), "buckets": rp.num_buckets}
