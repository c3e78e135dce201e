"""The Python API: `plan` (the one collective step) and `execute` (every refit).

    plan = refit_engine.plan(src_model, dst_model)   # gathers layouts once, compiles, binds
    stats = refit_engine.execute(plan)                # moves the weights; reuse plan every step

Models are megatron-core model chunks (a module or a list of them), `ShardedTensors`, or None
on ranks that do not hold that model (non-collocated). Every rank of `group` calls both.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from refit_engine.errors import RefitError
from refit_engine.layouts import Layout
from refit_engine.binding import bind, device_of, stale_reason
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
        local = model
    else:
        from refit_engine import megatron  # imports torch and megatron-core only when needed
        local = megatron.describe(model)
    if local.errors:  # kept by ShardedTensors.add, whoever filled it
        raise local.errors[0]
    return local


def _gather(obj, group):
    import torch.distributed as dist
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _raise_first(statuses, what: str):
    """Raise on every rank the first rank's error (statuses gathered from all ranks)."""
    for rank, status in statuses:
        if isinstance(status, RefitError):
            if not status.ranks:  # found in one rank's own tensors: that rank is the culprit
                raise RefitError(status.reason, tensor=status.tensor, ranks=[rank])
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
    # (side, buffer index) -> (owner, address, shape, dtype) as bound: see binding.stale_reason.
    current: dict = field(repr=False, default_factory=dict)
    check_device: str = "cpu"  # see _check_device

    @functools.cached_property
    def traffic(self) -> dict:
        """What every refit of this plan moves on this rank: the same each time, so counted
        once rather than on execute's path."""
        rp = self.rank_plan
        return {"rank": self.rank, "bytes_local": rp.bytes_local, "bytes_sent": rp.bytes_sent,
                "bytes_received": rp.bytes_received, "per_peer": rp.bytes_per_peer(),
                "buckets": rp.num_buckets}


def _nccl_communicator(group, device: int):
    """An NCCL communicator over `group`'s ranks, its id broadcast over `group`."""
    import torch.distributed as dist

    from refit_engine import _core
    ranks = _group_ranks(group)
    uid = [_core.NcclCommunicator.unique_id() if dist.get_rank() == ranks[0] else None]
    dist.broadcast_object_list(uid, src=ranks[0], group=group)
    comm = _core.NcclCommunicator(uid[0], len(ranks), ranks.index(dist.get_rank()), device)
    return comm, {r: i for i, r in enumerate(ranks)}


def _check_device(group) -> str:
    """Where the per-refit check's flag lives: pure NCCL groups reduce CUDA tensors."""
    import torch
    import torch.distributed as dist
    if "gloo" in dist.get_backend(group):
        return "cpu"
    return f"cuda:{torch.cuda.current_device()}"


def _group_ranks(group) -> list[int]:
    import torch.distributed as dist
    if group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))


def _check_ranks(gathered, group, mode: str) -> None:
    """Models on ranks the group has, and the collocated / non-collocated promise kept."""
    members = set(_group_ranks(group))
    for rank, _, _, _, claimed in gathered:
        outside = sorted(set(claimed) - members)
        if outside:
            raise RefitError(f"rank {rank}'s model has process groups spanning ranks {outside} "
                             f"outside the refit group of {len(members)} ranks (world-size or "
                             "rank-offset mismatch)", ranks=[rank, *outside])
    src_ranks = {r for r, _, s, _, _ in gathered if s}
    dst_ranks = {r for r, _, _, d, _ in gathered if d}
    both = sorted(src_ranks & dst_ranks)
    if mode == "non-collocated" and both:
        raise RefitError("non-collocated refit, but these ranks hold both models", ranks=both)
    if mode == "collocated" and src_ranks != dst_ranks:
        raise RefitError("collocated refit, but the models are on different ranks",
                         ranks=sorted(src_ranks ^ dst_ranks))


def plan(src_model, dst_model, group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
         timeout_s: float = DEFAULT_TIMEOUT_S, threads: int | None = None,
         mode: str = "auto", ranks_per_node: int | None = None) -> Plan:
    """Gather every rank's layouts over `group`, validate, compile this rank's plan and bind it.

    mode: "collocated" (both models on the same ranks), "non-collocated" (disjoint ranks) or
    "auto" (whatever the models say). ranks_per_node: consecutive ranks sharing a node, for the
    link-aware choice among source replicas (default: $LOCAL_WORLD_SIZE as torchrun sets it,
    else 0: no node preference). Raises RefitError on every rank, before any byte moves,
    if any rank's input is bad, and when ranks disagree on the plan.
    """
    if mode not in ("auto", "collocated", "non-collocated"):
        raise RefitError(f"mode must be auto, collocated or non-collocated, not {mode!r}")
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
    gathered = _gather((rank, status, src_local.entries, dst_local.entries,
                        sorted(src_local.claimed_ranks | dst_local.claimed_ranks)), group)
    _raise_first([(r, s) for r, s, *_ in gathered], "describing the models")
    _check_ranks(gathered, group, mode)
    src_layout = build_layout([(r, s) for r, _, s, _, _ in gathered])
    dst_layout = build_layout([(r, d) for r, _, _, d, _ in gathered])
    if ranks_per_node is None:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0))
    rank_plan = Planner(src_layout, dst_layout, bucket_bytes, ranks_per_node).plan_rank(rank)

    # Bind tensors and check them; then check that every rank compiled the same plan: a cheap
    # fingerprint of the inputs and options every plan is derived from.
    digest = hashlib.blake2b(digest_size=8)
    for layout in (src_layout, dst_layout):
        names, *tables = layout.tables()
        digest.update("\0".join(names).encode())
        for table in tables:  # every byte: a repr would elide the middle of large arrays
            digest.update(np.ascontiguousarray(table).tobytes())
    digest.update(f"{int(bucket_bytes)}/{int(ranks_per_node)}".encode())
    layouts_digest = digest.hexdigest()
    try:
        src_tensors, src_addr, src_devices, src_current = bind(src_layout, src_local, rank,
                                                                "source")
        dst_tensors, dst_addr, dst_devices, dst_current = bind(dst_layout, dst_local, rank,
                                                                "destination")
        device = device_of(src_devices | dst_devices, rank)
        status = None
    except RefitError as exc:
        status, device = exc, "cpu"
    checks = _gather((rank, status, layouts_digest, device.split(":")[0]), group)
    _raise_first([(r, s) for r, s, _, _ in checks], "binding tensors")
    digests = {}
    for r, _, d, _ in checks:
        digests.setdefault(d, []).append(r)
    if len(digests) != 1:
        groups = sorted(digests.values())
        raise RefitError(f"ranks disagree on the plan (plan fingerprints differ between rank "
                         f"groups {groups}: different layouts or options such as bucket_bytes)",
                         ranks=[r for r, *_ in checks])
    kinds = {k for *_, k in checks}
    if len(kinds) != 1:
        raise RefitError(f"some ranks hold CPU tensors and others CUDA tensors ({sorted(kinds)})",
                         ranks=[r for r, *_ in checks])

    if kinds == {"cuda"}:
        from refit_engine.executors.cuda import build_nccl_executor, require_cuda
        require_cuda("a refit of CUDA tensors")
        index = int(device.split(":")[1]) if ":" in device else 0
        comm, group_rank_of = _nccl_communicator(group, index)
        executor = CudaRefitRunner(*build_nccl_executor(rank_plan, src_addr, dst_addr, comm,
                                                        group_rank_of, index), comm, index)
    else:
        from refit_engine.executors.cpu import GlooExecutor, default_threads
        if threads is None:
            threads = default_threads(ranks_per_node or dist.get_world_size(group))
        executor = GlooExecutor(rank_plan, src_addr, dst_addr, group, timeout_s, threads)
    return Plan(rank, rank_plan, src_layout, dst_layout, group, timeout_s, executor,
                src_tensors, dst_tensors, current={**src_current, **dst_current},
                check_device=_check_device(group))


def _check_still_valid(plan: Plan) -> None:
    """Collective: every rank raises if any rank's tensors were replaced since planning. One
    small all-reduce when all is well; the reasons are gathered only when something is stale."""
    import torch
    import torch.distributed as dist
    stale = stale_reason(plan) if plan.current else None
    flag = torch.tensor([1 if stale else 0], dtype=torch.int32, device=plan.check_device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=plan.group)
    if int(flag.item()) == 0:
        return
    for rank, found in _gather((plan.rank, stale), plan.group):
        if found:
            raise RefitError(found[1], tensor=found[0], ranks=[rank])


class CudaRefitRunner:
    """Runs a CUDA executor on the caller's stream, optionally as a captured graph."""

    def __init__(self, executor, staging, comm, device: int):
        self.executor, self.staging, self.comm, self.device = executor, staging, comm, device

    def run(self, graph: bool, stream, sync: bool, timeout_s: float) -> None:
        if stream is None:
            import torch
            stream = torch.cuda.current_stream(self.device).cuda_stream
        try:
            if graph and self.executor.captured:
                self.executor.replay(stream)
            elif graph:
                self.executor.capture(stream)
            else:
                self.executor.run(stream)
            if sync:
                self.executor.wait(stream, timeout_s)
        except RuntimeError as exc:
            raise RefitError(f"CUDA refit failed: {exc}") from exc


def _verify(plan: Plan) -> None:
    """Checksums of every piece as sent and as landed, compared on every rank."""
    from refit_engine.verify import checksums, compare_checksums
    sent, landed = checksums(plan.rank_plan, plan.src_tensors, plan.dst_tensors)
    bad = compare_checksums(_gather((plan.rank, sent, landed), plan.group),
                            [t.name for t in plan.dst_layout.tensors])
    if bad:
        names = sorted({name for name, _, _ in bad})
        pairs = ", ".join(f"{s}->{r}" for _, s, r in bad[:8])
        raise RefitError(f"verification failed: bytes that landed differ from bytes sent for "
                         f"{len(names)} tensor(s) (sender->receiver: {pairs})",
                         tensor=", ".join(names[:8]), ranks={r for _, s, r in bad} | {s for _, s, _ in bad})


def execute(plan: Plan, graph: bool = False, stream=None, sync: bool = True,
            verify: bool = False, check: bool = True) -> dict:
    """Run one refit. Returns statistics: bytes local / sent / received, per peer, elapsed.

    CUDA tensors: the refit is ordered after the work already queued on `stream` (an integer
    handle; default torch's current stream) and before work queued on it later. `graph=True`
    captures the whole refit as one CUDA graph on the first call and replays it afterwards
    (new source values are picked up; tensors must stay where they are). With `sync=False`
    the call returns once the work is queued (elapsed_s is then the enqueue time).
    `check=True` first confirms on every rank that no model tensor was replaced since planning
    (one small collective); `verify=True` then compares per-piece checksums of what every rank sent with what landed
    (a collective over the plan's group) and raises RefitError naming the tensors that differ.
    """
    if plan.broken:
        raise RefitError(f"plan is unusable after an earlier failure ({plan.broken}); build a "
                         "new plan", ranks=[plan.rank])
    if verify and not sync:  # before anything moves: the checksums need the refit finished
        raise RefitError("verify=True needs sync=True", ranks=[plan.rank])
    if check:
        _check_still_valid(plan)
    t0 = time.perf_counter()
    try:
        if isinstance(plan.executor, CudaRefitRunner):
            plan.executor.run(graph, stream, sync, plan.timeout_s)
        else:
            plan.executor.run()
    except RefitError as exc:
        plan.broken = str(exc)
        raise
    elapsed = time.perf_counter() - t0
    plan.refits += 1
    if verify:
        _verify(plan)
    return {**plan.traffic, "elapsed_s": elapsed}
