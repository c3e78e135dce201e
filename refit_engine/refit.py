"""The Python API: `plan` (the one collective step) and `execute` (every refit).

    plan = refit_engine.plan(src_model, dst_model)   # gathers layouts once, compiles, binds
    stats = refit_engine.execute(plan)                # moves the weights; reuse plan every step

Models are megatron-core model chunks (a module or a list of them), `ShardedTensors`, or None
on ranks that do not hold that model (non-collocated). Every rank of `group` calls both.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from refit_engine import megatron_layout
from refit_engine.aliasing import (aliasable_buffers, apply_aliases, choose_aliases,
                                   without_buffers)
from refit_engine.binding import (bind, bind_scales, check_overlaps, device_of, record,
                                  stale_reason)
from refit_engine.channel import Channel, group_ranks
from refit_engine.compiler import DEFAULT_BUCKET_BYTES, Planner, RankPlan
from refit_engine.errors import RefitError, raise_first, status_of
from refit_engine.executors.base import Executor
from refit_engine.executors.factory import build_executor, transport_of
from refit_engine.layouts import Layout
from refit_engine.local import ShardedTensors, build_layout, check_empty_tensors
from refit_engine.peers import IPC_SYNCS, TRANSPORTS, PeerLinks, choose_transports, this_device
from refit_engine.transforms import (RankTransforms, carrier_entries, check_quantized_pieces,
                                     with_fp8_dtype)
from refit_engine.verify import verify_checksums
from refit_engine.wire import wire_targets

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
        local = megatron_layout.describe(model)
    if local.errors:  # kept by ShardedTensors.add, whoever filled it
        raise local.errors[0]
    return local


@dataclass
class Plan:
    """A compiled refit, bound to this rank's tensors. Reuse it for every refit."""

    rank: int
    rank_plan: RankPlan
    src_layout: Layout
    dst_layout: Layout
    group: object  # the caller's group: never used for a wait (see `channel`)
    timeout_s: float
    channel: Channel = field(repr=False, default=None)  # every wait of this plan goes here
    executor: Executor = field(repr=False, default=None)
    src_tensors: dict = field(repr=False, default_factory=dict)  # buffer index -> tensor
    dst_tensors: dict = field(repr=False, default_factory=dict)
    broken: str | None = None
    refits: int = 0
    # Destination tensors rebound to the source's storage (plan(alias=True)): moved by nothing.
    aliases: list = field(repr=False, default_factory=list)
    not_aliased: dict = field(repr=False, default_factory=dict)  # key -> why it is copied
    # What every bound tensor looked like when bound: see binding.bind / stale_reason.
    current: dict = field(repr=False, default_factory=dict)
    # Destination tensors in another format than their source: {tensor name: TensorFormat}
    # (every rank's), and this rank's transformed local tensors (see refit_engine.transforms).
    formats: dict = field(repr=False, default_factory=dict)
    transforms: RankTransforms | None = field(repr=False, default=None)
    carrier_layout: Layout | None = field(repr=False, default=None)  # what the compiler planned
    dst_scales: dict = field(repr=False, default_factory=dict)  # key -> scale tensor
    # One refit at a time: two threads running one plan would interleave its messages.
    lock: threading.Lock = field(repr=False, default_factory=threading.Lock)

    # Set by close() while a refit runs: that refit's execute closes the plan as it ends.
    close_pending: bool = field(repr=False, default=False)

    def close(self) -> None:
        """Releases the plan's channel and communicators (also done when it is dropped). The
        plan is unusable from now on; if a refit is running on it (another thread, or this
        one from a signal handler), the release happens when that refit ends. Never waits."""
        # NOTE: releasing unmaps peers' memory and frees staging: never under a running
        # refit, whose copies would then read freed memory.
        self.broken = self.broken or "closed"
        self.close_pending = True
        if not self.lock.acquire(blocking=False):
            return  # execute() sees close_pending once it has released the lock
        try:
            if self.close_pending:
                self.close_pending = False
                try:
                    if self.executor is not None:
                        self.executor.close()
                finally:  # the group is released even when the executor's release failed
                    if self.channel is not None:
                        self.channel.close()
        finally:
            self.lock.release()

    @functools.cached_property
    def traffic(self) -> dict:
        """What every refit of this plan moves on this rank: the same each time, so counted
        once rather than on execute's path."""
        rp = self.rank_plan
        return {"rank": self.rank, "bytes_local": rp.bytes_local, "bytes_sent": rp.bytes_sent,
                "bytes_received": rp.bytes_received, "per_peer": rp.bytes_per_peer(),
                "buckets": rp.num_buckets, "bytes_ipc": self.executor.bytes_ipc,
                "staging_bytes": self.executor.staging_bytes,
                "bytes_aliased": sum(a.nbytes for a in self.aliases),
                "transformed": len(self.transforms.targets) if self.transforms else 0,
                "assembled": len(self.transforms.assembled) if self.transforms else 0,
                "carrier_bytes": self.transforms.carrier_bytes if self.transforms else 0,
                "wire_bytes_saved": self.executor.wire_bytes_saved}

    @property
    def peer_transports(self) -> dict[int, str]:
        """{peer: "ipc" | "nccl" | "gloo"} for every peer this rank exchanges bytes with."""
        chosen = self.executor.peer_transports
        return {p: chosen.get(p, self.executor.transport)
                for p in self.rank_plan.bytes_per_peer()}


def _check_same_options(options_of: dict) -> None:
    """Every rank passed the same mode, timeout_s, threads, transport, ipc_sync, alias and cast
    (bucket_bytes and ranks_per_node are in the plan fingerprint)."""
    groups: dict = {}
    for rank, options in sorted(options_of.items()):
        groups.setdefault(options, []).append(rank)
    if len(groups) > 1:
        seen = "; ".join(f"ranks {ranks}: mode={o[0]!r}, timeout_s={o[1]}, threads={o[2]}, "
                         f"transport={o[3]!r}, ipc_sync={o[4]!r}, alias={o[5]!r}, "
                         f"cast={o[6]!r}"
                         for o, ranks in groups.items())
        raise RefitError(f"ranks disagree on plan()'s options ({seen})",
                         ranks=list(options_of))


def _check_ranks(gathered, group, mode: str) -> None:
    """Models on ranks the group has, and the collocated / non-collocated promise kept."""
    members = set(group_ranks(group))
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
         mode: str = "auto", ranks_per_node: int | None = None, name: str = "plan",
         transport: str = "auto", ipc_sync: str = "device", alias: bool = False,
         cast: bool = False) -> Plan:
    """Gather every rank's layouts over `group`, validate, compile this rank's plan and bind it.

    mode: "collocated" (both models on the same ranks), "non-collocated" (disjoint ranks) or
    "auto" (whatever the models say). ranks_per_node: consecutive ranks sharing a node, for the
    link-aware choice among source replicas (default: $LOCAL_WORLD_SIZE as torchrun sets it,
    else 0: no node preference). name: plans are matched across ranks by (group, name, how
    many plans of that name the group built before); give each refit its own name when ranks
    may build plans in different orders (say "policy->rollout" and "policy->reference" over
    models of the same shapes, which nothing else could tell apart). transport (CUDA tensors):
    "auto" reads peers on the same node straight from their memory over CUDA IPC and uses
    NCCL across nodes; "ipc" or "nccl" forces one for every peer (see `peers`). ipc_sync: how
    IPC peers keep order, "device" (flags in shared GPU memory, each wait with a deadline: a
    graph=True refit then has no host step; the faster, measured) or "host" (interprocess
    events and two host barriers per refit). alias=True: destination tensors that would be
    filled byte for byte from one source tensor of the same rank (same box, dtype and layout:
    collocated, EP and expert TP unchanged) are rebound to the source's storage now, their own
    storage released, and no refit moves them (`plan.aliases`; `bytes_aliased` in the
    statistics); the inference model then sees every training update at once. cast=True: a
    destination whose float dtype (float32, bfloat16, float16) differs from its source's is
    cast while it is copied (IEEE round to nearest even; without it such a pair is refused as
    a likely mistake). Destinations quantized to FP8 are declared where they are described
    (`ShardedTensors.add(..., format="fp8_block128" | "mxfp8")`; see refit_engine.transforms):
    their scale tensors are filled by every refit too. Raises RefitError on every
    rank, before any byte moves, if any rank's input is bad, and when ranks disagree on the plan.
    """
    if not dist.is_initialized():
        raise RefitError("torch.distributed is not initialized: call init_process_group first")
    rank = dist.get_rank()
    if not isinstance(name, str) or not name:
        raise RefitError(f"name must be a non-empty string, not {name!r}", ranks=[rank])
    problem = _option_problem(bucket_bytes=bucket_bytes, timeout_s=timeout_s, threads=threads,
                              mode=mode, ranks_per_node=ranks_per_node, transport=transport,
                              ipc_sync=ipc_sync, alias=alias, cast=cast)
    # Every later wait of this plan, this first arrival included, is bounded by timeout_s
    # (the default when timeout_s itself is the problem: reported on every rank below).
    channel = Channel(group, DEFAULT_TIMEOUT_S if problem else timeout_s, what=name)
    try:
        return _plan(channel, rank, problem, src_model, dst_model, group, bucket_bytes,
                     timeout_s, threads, mode, ranks_per_node, transport, ipc_sync, alias, cast)
    except BaseException:
        channel.close()
        raise


def _option_problem(**options) -> RefitError | None:
    """The first out-of-range option, as the error every rank raises."""
    def integer(value):
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    bucket, timeout = options["bucket_bytes"], options["timeout_s"]
    threads, mode, per_node = options["threads"], options["mode"], options["ranks_per_node"]
    if not integer(bucket) or not 0 < int(bucket) <= 1 << 40:
        reason = f"bucket_bytes must be an integer in [1, 2**40], not {bucket!r}"
    elif (not isinstance(timeout, (int, float, np.integer, np.floating)) or isinstance(timeout, bool)
          or not math.isfinite(float(timeout)) or not 0 < float(timeout) <= 7 * 86400):
        reason = f"timeout_s must be a finite number of seconds in (0, 604800], not {timeout!r}"
    elif threads is not None and (not integer(threads) or not 1 <= int(threads) <= 256):
        reason = f"threads must be None or an integer in [1, 256], not {threads!r}"
    elif mode not in ("auto", "collocated", "non-collocated"):
        reason = f"mode must be auto, collocated or non-collocated, not {mode!r}"
    elif per_node is not None and (not integer(per_node) or not 0 <= int(per_node) <= 1 << 20):
        reason = f"ranks_per_node must be None or an integer >= 0, not {per_node!r}"
    elif options["transport"] not in TRANSPORTS:
        reason = f"transport must be one of {TRANSPORTS}, not {options['transport']!r}"
    elif options["ipc_sync"] not in IPC_SYNCS:
        reason = f"ipc_sync must be one of {IPC_SYNCS}, not {options['ipc_sync']!r}"
    elif not isinstance(options["alias"], (bool, np.bool_)):
        reason = f"alias must be True or False, not {options['alias']!r}"
    elif not isinstance(options["cast"], (bool, np.bool_)):
        reason = f"cast must be True or False, not {options['cast']!r}"
    else:
        return None
    return RefitError(reason)


def _plan(channel, rank, problem, src_model, dst_model, group, bucket_bytes, timeout_s, threads,
          mode, ranks_per_node, transport, ipc_sync, alias, cast) -> Plan:
    status = problem
    try:
        if status is None:
            src_local, dst_local = describe(src_model), describe(dst_model)
        else:
            src_local = dst_local = ShardedTensors()
    except Exception as exc:  # reported on every rank below
        src_local = dst_local = ShardedTensors()
        status = status_of(exc)
    options = (mode, float(timeout_s) if problem is None else None, threads,
               transport if problem is None else None, ipc_sync if problem is None else None,
               bool(alias) if problem is None else None, bool(cast) if problem is None else None)
    gathered = channel.gather((rank, status, src_local.entries, dst_local.entries,
                               sorted(src_local.claimed_ranks | dst_local.claimed_ranks),
                               options), "layout exchange")
    raise_first([(r, s) for r, s, *_ in gathered], "describing the models")
    _check_same_options({g[0]: g[5] for g in gathered})
    gathered = [g[:5] for g in gathered]
    _check_ranks(gathered, group, mode)
    src_per_rank = [(r, s) for r, _, s, _, _ in gathered]
    dst_per_rank = with_fp8_dtype([(r, d) for r, _, _, d, _ in gathered])
    src_layout = build_layout(src_per_rank)
    # A destination in another format is planned as its carrier: the source's dtype.
    carrier_per_rank, formats = carrier_entries(src_per_rank, dst_per_rank, bool(cast))
    carrier_layout = build_layout(carrier_per_rank)
    dst_layout = build_layout(dst_per_rank) if formats else carrier_layout
    check_quantized_pieces(carrier_layout, formats)
    if ranks_per_node is None:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0))
    planner = Planner(src_layout, carrier_layout, bucket_bytes, ranks_per_node)
    rank_plan = planner.plan_rank(rank)
    # Pairs alias=True may share (plan-level; the tensors are checked once bound).
    candidates = aliasable_buffers(rank_plan, src_layout, dst_layout) if alias else {}

    # Bind tensors and check them; then check that every rank compiled the same plan: a cheap
    # fingerprint of the inputs and options every plan is derived from.
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr(sorted((n, str(f)) for n, f in formats.items())).encode())
    for layout in (src_layout, carrier_layout):
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
        # A destination that already shares its aliasable source's memory (an earlier aliased
        # plan over the same models) is no conflict: alias=True copies nothing into it.
        scale_current = bind_scales(dst_layout, dst_local, formats, rank)
        check_overlaps(rank, src_current, dst_current, scale_current,
                       same_ok={(src_layout.buffers[s].key, dst_layout.buffers[d].key)
                                for d, s in candidates.items()})
        dst_current.update(scale_current)
        aliases, not_aliased = (choose_aliases(rank_plan, src_layout, dst_layout, src_tensors,
                                               dst_tensors) if alias else ([], {}))
        check_empty_tensors(src_layout, dst_layout)
        device = device_of(src_devices | dst_devices, rank)
        where = this_device(device)
        transforms = None
        if formats:
            transforms = RankTransforms(rank_plan, dst_layout, formats, dst_tensors,
                                        dst_local.scales, _carrier_maker(device))
        status = None
    except Exception as exc:  # reported on every rank below
        status = status_of(exc)
        device, where, transforms = "cpu", None, None
        aliases, not_aliased = [], {}
    fused = sorted(transforms.fused) if transforms is not None else []
    checks = channel.gather((rank, status, layouts_digest, device.split(":")[0], where, fused),
                            "binding check")
    raise_first([(r, s) for r, s, *_ in checks], "binding tensors")
    devices = {c[0]: c[4] for c in checks}
    fused_by_rank = {c[0]: set(c[5]) for c in checks}
    checks = [c[:4] for c in checks]
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
    # Every rank derives the same per-peer choice (and the same refusal) from the same list.
    links = None
    if kinds == {"cuda"}:
        links = PeerLinks(choose_transports(rank, devices, transport), planner.plan_rank,
                          ipc_sync, src_key=lambda b: src_layout.buffers[b].key)
    elif transport != "auto":
        raise RefitError(f"transport={transport!r} is for CUDA tensors; these are on the CPU "
                         "(gloo moves them)", ranks=[r for r, *_ in checks])

    if transforms is not None:  # which pieces its senders transform, and how (refit_engine.wire)
        transforms.connect(wire_targets(dst_layout, formats, fused_by_rank),
                           functools.lru_cache(maxsize=None)(planner.plan_rank))

    # Building the executors can fail on one rank (no CUDA build, out of memory): every rank
    # learns it in one more small step, so no rank returns a plan its peers do not have.
    executor, failure = None, None
    try:
        rank_plan = without_buffers(rank_plan, {a.dst_buffer for a in aliases})
        executor = build_executor(transport_of(next(iter(kinds))), rank_plan, src_addr, dst_addr,
                                  channel, device, threads, ranks_per_node, links=links,
                                  transforms=transforms)
    except Exception as exc:
        failure = status_of(exc)
    if channel.union(int(failure is not None), "executors ready"):
        raise_first(channel.gather((rank, failure), "executor failures"),
                     "building the executor")
    # Every rank has its executor: only now are destination tensors rebound (a plan that
    # fails leaves the models as they were).
    current = {**src_current, **dst_current}
    if aliases:
        apply_aliases(aliases, src_tensors, dst_tensors, dst_local)
        for a in aliases:
            current[("destination", a.dst_buffer)] = record(dst_layout.buffers[a.dst_buffer],
                                                            dst_local, "destination")
    return Plan(rank, rank_plan, src_layout, dst_layout, group, float(timeout_s), channel,
                executor, src_tensors, dst_tensors, current=current, aliases=aliases,
                not_aliased=not_aliased, formats=formats, transforms=transforms,
                carrier_layout=carrier_layout, dst_scales=dst_local.scales)


def _carrier_maker(device: str):
    """Where assembled tensors' carriers are allocated: bytes on the destination's device."""
    return lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, device=device)


class _RefusedCall(RefitError):
    """execute() refused for its arguments before any byte moved; the plan stays usable."""


def _option_problem_of(options: dict) -> str | None:
    for name, value in options.items():
        if not isinstance(value, (bool, np.bool_)):
            return f"{name} must be True or False, not {value!r}"
    if options["verify"] and not options["sync"]:
        return "verify=True needs sync=True (the checksums need the refit finished)"
    return None


def _check_still_valid(plan: Plan, options: dict) -> None:
    """Collective, before any byte moves: every rank raises if any rank's tensors changed since
    planning, if a rank's options are invalid, or if ranks disagree on them. One all-reduce of
    one int64 when all is well; the reasons are gathered only when something is wrong."""
    problem = _option_problem_of(options)
    stale = None if problem else stale_reason(plan)
    # Bit 0: something is wrong here. Then each option twice, set and clear: after the OR over
    # ranks both bits of an option are set iff the ranks disagree on it.
    bits = int(problem is not None or stale is not None)
    for i, value in enumerate(options.values()):
        bits |= 1 << (1 + 2 * i + (0 if value else 1))
    union = plan.channel.union(bits, f"refit {plan.refits + 1} check")
    if union & 1:
        for rank, bad_option, bad_tensor in plan.channel.gather((plan.rank, problem, stale),
                                                                "refit problems"):
            if bad_option:
                raise _RefusedCall(bad_option, ranks=[rank])
            if bad_tensor:
                raise RefitError(bad_tensor[1], tensor=bad_tensor[0], ranks=[rank])
    split = [name for i, name in enumerate(options) if (union >> (1 + 2 * i)) & 3 == 3]
    if split:
        raise _RefusedCall(f"ranks disagree on execute's options {split}: every rank of the "
                           "plan must pass the same", ranks=plan.channel.ranks)


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
    if not isinstance(plan, Plan):
        raise RefitError(f"execute() takes the Plan that refit_engine.plan() returned, not "
                         f"{type(plan).__name__}")
    if not isinstance(check, (bool, np.bool_)):
        raise RefitError(f"check must be True or False, not {check!r}", ranks=[plan.rank])
    # NOTE: a second thread is refused, not queued: its refit would be a second collective
    # that the other ranks do not expect.
    if not plan.lock.acquire(blocking=False):
        raise RefitError("this plan is being executed by another thread; a plan runs one refit "
                         "at a time (give each thread its own plan, or serialize the calls)",
                         ranks=[plan.rank])
    try:
        return _execute_locked(plan, graph, stream, sync, verify, check)
    finally:
        plan.lock.release()
        if plan.close_pending:  # close() was called during the refit: release now
            try:
                plan.close()
            except Exception as exc:  # noqa: BLE001 - the refit's own outcome is the answer
                warnings.warn(f"refit_engine: releasing a plan closed during its refit failed: "
                              f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)


def _end(plan: Plan, why: str) -> None:
    plan.broken = why
    plan.channel.close()


def _execute_locked(plan: Plan, graph, stream, sync, verify, check) -> dict:
    if plan.broken:
        raise RefitError(f"plan is unusable after an earlier failure ({plan.broken}); build a "
                         "new plan", ranks=[plan.rank])
    options = {"graph": graph, "sync": sync, "verify": verify}
    try:
        if check:
            _check_still_valid(plan, options)
        elif (problem := _option_problem_of(options)) is not None:
            raise _RefusedCall(problem, ranks=[plan.rank])  # unchecked: this rank alone knows
        t0 = time.perf_counter()
        plan.executor.run(graph, stream, sync, plan.timeout_s)
        elapsed = time.perf_counter() - t0
        plan.refits += 1
        if verify:
            verify_checksums(plan)
    except _RefusedCall:
        raise  # the call was wrong, not the plan: every rank refused it at the same step
    except RefitError as exc:
        # Every other failure ends the plan: after a timeout the peers' state is unknown, and
        # a replaced tensor stays replaced. Callers build a new plan (the drop-in
        # swap_model_weights does so by itself). Closing its group makes peers still waiting
        # on this rank fail at once rather than at their timeout.
        _end(plan, str(exc))
        if not exc.ranks:  # found by this rank's executor: this rank reports it
            raise RefitError(exc.reason, tensor=exc.tensor, ranks=[plan.rank]) from exc
        raise
    except Exception as exc:
        _end(plan, f"{type(exc).__name__}: {exc}")
        raise RefitError(f"refit failed: {plan.broken}", ranks=[plan.rank]) from exc
    except BaseException as exc:  # KeyboardInterrupt, SystemExit: propagate, plan unusable
        _end(plan, f"interrupted ({type(exc).__name__})")
        raise
    return {**plan.traffic, "elapsed_s": elapsed}
