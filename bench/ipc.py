"""CUDA IPC refit: 8 rank processes on one GPU, against the in-process loopback and the floor.

Kimi K2 at full width and expert size, scaled like bench/loopback.py (--layers, default 4: one
dense + three MoE; --experts, default 32). Source TP8/EP8 -> destination TP4/EP4, collocated,
on --world (default 8) processes spawned here, every one on cuda:0 with a gloo process group:
transport="auto" takes CUDA IPC for every peer (they share a host), so each destination
rank's fused kernel reads its peers' source tensors straight into its own (no staging).

For ipc_sync "host" (IPC events and host barriers) and "device" (flags in IPC memory), plain
and as a CUDA graph:
- refit time: median over --iters of the slowest rank's wall time around execute(sync=True),
  and of the slowest rank's CUDA-event time around it on its stream;
- host cost per refit: median (slowest rank) CPU time of the process, and wall time, of
  execute(sync=False)'s enqueue; with execute's per-refit host check (the default) and
  without it (check=False: the transport's own cost);
- staging bytes (stats["staging_bytes"]: 0 when every peer is IPC) and bytes read over IPC;
- bit-exact: after the timed runs, fresh source values, poisoned destinations, one plain and
  one graph refit, every destination element checked on its own rank.
In the same run (one process, before the ranks start): the copy ceiling of this GPU and
LoopbackRefit (every virtual rank in one process) staged and direct on the same layouts.
Floor: every destination byte of all ranks (they share this one GPU) read once and written
once over the measured copy bandwidth, as bench/loopback.py counts it.

--mps (default) runs everything under a CUDA MPS control daemon of its own (pipe and log
folders in a fresh temporary folder), so the rank processes' kernels may run concurrently
instead of time-sliced; it is stopped at the end, also on failure. The JSON says whether MPS
was on. The last line is one JSON object with the key figures; the whole record goes to
bench/results/ipc_<date>_<commit>.json (and $OUT when set).

Source values are a hash of (seed, tensor name, global element index), computed on the GPU,
so every rank fills and checks its own tensors without gathering the model.

--alias-compare (issue 17) measures plan(alias=True) instead, and only that (no copy ceiling,
no loopback, no host/device or graph figures): source TP=EP=world -> destination
TP=world/2 with EP=world unchanged (same model and processes), so every routed expert and
every tensor whole on every rank is aliased and only the TP-split ones move. For alias=False,
then alias=True, each with models built fresh (the previous ones deleted, gc, empty_cache):
torch.cuda.memory_allocated() of each rank process after planning and after the first refit
(minus what it held before its models were allocated), the plan's bytes_aliased, the plain
refit's time (slowest rank per iteration, median; --ipc-sync, default "device") and, after the
timed runs, fresh source values, every destination that is not aliased poisoned, one refit and
every destination element checked. Per rank, memory must drop by at least bytes_aliased (less
1 MiB of slack): both figures and their difference are printed and kept. Results go to
bench/results/ipc_alias_<date>_<commit>.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

import torch
import torch.distributed as dist

import refit_engine
from refit_engine import LoopbackRefit, dtypes
from refit_engine.harness.grid import ParallelGrid
from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout
from refit_engine.harness.results import device_name, environment, results_dir, save_json
from refit_engine.harness.spawn import failure_report, run_ranks
from refit_engine.harness.timing import copy_ceiling, time_cuda
from refit_engine.layouts import placement_box, row_major_strides
from refit_engine.local import from_layout
from refit_engine.tables import PLACEMENT

POISON = 0xA5
BLOCK = 1 << 24  # elements generated at a time: bounded temporaries in each of the processes
SYNCS = ("host", "device")
KINDS = ("plain", "graph")
TRAFFIC = ("bytes_local", "bytes_sent", "bytes_received", "bytes_ipc", "staging_bytes")
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="Kimi K2 layers (default 4)")
    parser.add_argument("--experts", type=int, default=32, help="routed experts (default 32)")
    parser.add_argument("--world", type=int, default=8,
                        help="rank processes on the one GPU: source TP=EP=world, destination "
                        "TP=EP=world/2 (default 8)")
    parser.add_argument("--iters", type=int, default=10, help="timed refits per figure")
    parser.add_argument("--warmup", type=int, default=3, help="untimed refits first (>= 1)")
    parser.add_argument("--bucket-mib", type=int, default=256,
                        help="bucket_bytes of the plans and of the staged loopback (MiB)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="the plans' timeout_s")
    parser.add_argument("--deadline-s", type=float, default=480.0,
                        help="the spawned processes' deadline (each phase)")
    parser.add_argument("--mps", action=argparse.BooleanOptionalAction, default=True,
                        help="run under a CUDA MPS control daemon of its own (default on)")
    parser.add_argument("--loopback", action=argparse.BooleanOptionalAction, default=True,
                        help="also time LoopbackRefit staged and direct (default on)")
    parser.add_argument("--alias-compare", action="store_true",
                        help="only plan(alias=False) against plan(alias=True) with EP unchanged "
                        "(TP=EP=world -> TP=world/2, EP=world): refit time, memory after "
                        "planning and after a refit, bytes_aliased, bit-exactness")
    parser.add_argument("--ipc-sync", choices=SYNCS, default="device",
                        help="ipc_sync of the --alias-compare plans (default device, the "
                        "library's)")
    args = parser.parse_args(argv)
    if args.world < 2 or args.world % 2:
        parser.error(f"--world must be even and at least 2, not {args.world}")
    if args.experts < 1 or args.experts % args.world:
        parser.error(f"--experts {args.experts} must be a positive multiple of --world "
                     f"{args.world} (EP = world)")
    if args.layers < 1 or args.iters < 1 or args.warmup < 1 or args.bucket_mib < 1:
        parser.error("--layers, --iters, --warmup and --bucket-mib must be at least 1")
    return args


def layouts(args):
    """(source, destination) layouts: TP=EP=world -> TP=EP=world/2 on the same ranks."""
    cfg = KimiK2Config(num_layers=args.layers, num_experts=args.experts)
    w = args.world
    return (kimi_k2_layout(cfg, ParallelGrid(w, tp=w, ep=w)),
            kimi_k2_layout(cfg, ParallelGrid(w, tp=w // 2, ep=w // 2)))


def alias_layouts(args):
    """--alias-compare's (source, destination) layouts: TP=EP=world -> TP=world/2 with
    EP=world kept (expert TP 1 on both sides), so every routed expert stays on its rank."""
    cfg = KimiK2Config(num_layers=args.layers, num_experts=args.experts)
    w = args.world
    return (kimi_k2_layout(cfg, ParallelGrid(w, tp=w, ep=w)),
            kimi_k2_layout(cfg, ParallelGrid(w, tp=w // 2, ep=w)))


def layout_bytes(layout) -> int:
    return sum(b.numel * dtypes.itemsize(b.dtype) for b in layout.buffers)


# -- values: a hash of (seed, tensor, global index), filled and checked piece by piece ---------

def _values(index: torch.Tensor, salt: int, itemsize: int) -> torch.Tensor:
    """Pseudo-random bits for global element indices `index` (int64), as signed integers of
    `itemsize` bytes. NOTE: int64 products wrap; the same ops on the same device give the
    same bits in every process, which is all the check needs."""
    x = (index + salt) * 0x2545F4914F6CDD1D
    x = x ^ (x >> 29)
    x = x * 0x1CE4E5B9
    x = x ^ (x >> 32)
    if itemsize == 8:
        return x
    bits = 8 * itemsize
    return (((x >> 7) & ((1 << bits) - 1)) - (1 << (bits - 1))).to(_SIGNED[itemsize])


def _blocks(tensor: torch.Tensor, meta, start, extent, strides, offset: int, seed: int):
    """(view of the local tensor, expected values) for one piece, in blocks along its first
    dimension of at most BLOCK elements."""
    itemsize = tensor.element_size()
    flat = tensor.view(-1).view(_SIGNED[itemsize])
    gstrides = row_major_strides(meta.shape)
    salt = (zlib.crc32(f"{seed}/{meta.name}".encode()) & 0xFFFFFFFF) << 24
    device = tensor.device
    inner = torch.zeros((), dtype=torch.int64, device=device)
    for d in range(1, len(extent)):
        along = (torch.arange(extent[d], dtype=torch.int64, device=device) + start[d]) * gstrides[d]
        inner = inner.unsqueeze(-1) + along
    rows = max(1, BLOCK // max(1, math.prod(extent[1:])))
    for r0 in range(0, extent[0], rows):
        r1 = min(extent[0], r0 + rows)
        first = (torch.arange(r0, r1, dtype=torch.int64, device=device) + start[0]) * gstrides[0]
        index = first.view(-1, *([1] * (len(extent) - 1))) + inner
        view = flat.as_strided((r1 - r0, *extent[1:]), strides,
                               flat.storage_offset() + offset + r0 * strides[0])
        yield view, _values(index, salt, itemsize)


def _pieces(layout, tensors: dict):
    """(key, tensor, meta, start, extent, strides, local offset) of every piece held in
    `tensors` ({(rank, key): tensor})."""
    for row in layout.placements():
        buf = layout.buffers[int(row[PLACEMENT["buffer"]])]
        tensor = tensors.get((buf.rank, buf.key))
        if tensor is None:
            continue
        meta = layout.tensors[int(row[PLACEMENT["tensor"]])]
        start, extent, strides = placement_box(row, len(meta.shape))
        yield (buf.rank, buf.key), tensor, meta, start, extent, strides, \
            int(row[PLACEMENT["local_offset"]])


def fill(layout, tensors: dict, seed: int) -> None:
    """Every piece of `tensors` set to its values for `seed` (on the current stream)."""
    for _, tensor, meta, start, extent, strides, offset in _pieces(layout, tensors):
        for view, values in _blocks(tensor, meta, start, extent, strides, offset, seed):
            view.copy_(values)


def check(layout, tensors: dict, seed: int) -> list[str]:
    """"rank:key" of every local tensor in `tensors` with a piece that differs from `seed`'s
    values (empty: bit-exact)."""
    wrong = []
    for where, tensor, meta, start, extent, strides, offset in _pieces(layout, tensors):
        label = f"{where[0]}:{where[1]}"
        if label in wrong:
            continue
        if not all(torch.equal(view, values) for view, values in
                   _blocks(tensor, meta, start, extent, strides, offset, seed)):
            wrong.append(label)
    return wrong


def alloc(layout, ranks) -> dict:
    """{(rank, key): tensor on cuda:0} of the local tensors of `ranks`, in their dtypes."""
    return {(b.rank, b.key): torch.empty(b.shape, dtype=getattr(torch, b.dtype), device="cuda:0")
            for b in layout.buffers if b.rank in ranks}


def poison(tensors: dict) -> None:
    for t in tensors.values():
        t.view(torch.uint8).fill_(POISON)


# -- one process: the copy ceiling, and LoopbackRefit staged and direct ------------------------

def single_process_figures(rank, world, args) -> dict:
    """The GPU's copy ceiling, and LoopbackRefit on the same layouts (every virtual rank in
    this one process), as bench/loopback.py times them."""
    torch.cuda.set_device(0)
    out = {"device": device_name(), "ceiling": copy_ceiling(iters=args.iters)}
    if not args.loopback:
        return out
    src, dst = layouts(args)
    ranks = set(range(args.world))
    src_t, dst_t = alloc(src, ranks), alloc(dst, ranks)
    fill(src, src_t, seed=1)
    for mode in ("staged", "direct"):
        refit = LoopbackRefit(src, dst, src_t, dst_t, bucket_bytes=args.bucket_mib << 20,
                              direct=mode == "direct")
        poison(dst_t)
        refit.run()
        wrong = check(dst, dst_t, seed=1)
        plain = time_cuda(lambda r=refit: r.run(sync=False), args.iters)
        refit.run(graph=True)  # captured
        poison(dst_t)
        refit.run(graph=True)  # replayed
        wrong += check(dst, dst_t, seed=1)
        graph = time_cuda(lambda r=refit: r.run(graph=True, sync=False), args.iters)
        out[mode] = {"plain": plain, "graph": graph, "wrong": sorted(set(wrong)),
                     "bytes": refit.bytes_moved(), "buckets": refit.executor.num_buckets}
        print(f"[ipc] loopback {mode}: plain {plain['median_ms']:.2f} ms, graph "
              f"{graph['median_ms']:.2f} ms, exact {not wrong}", flush=True)
        refit = None  # its staging freed before the next one allocates its own
        torch.cuda.empty_cache()
    return out


# -- the rank processes: IPC refits -------------------------------------------------------------

def _timed(plan, graph: bool, iters: int) -> dict:
    """This rank's wall and CUDA-event milliseconds of each execute(sync=True), every rank
    starting each run together."""
    walls, events = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        refit_engine.execute(plan, graph=graph, sync=True)
        walls.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        events.append(start.elapsed_time(end))
    return {"wall_ms": walls, "event_ms": events}


def _enqueue(plan, graph: bool, iters: int, check_: bool) -> dict:
    """This rank's microseconds (process CPU time and wall time) of each execute(sync=False)."""
    cpus, walls = [], []
    for _ in range(iters):
        torch.cuda.synchronize()
        dist.barrier()
        c0, t0 = time.process_time(), time.perf_counter()
        refit_engine.execute(plan, graph=graph, sync=False, check=check_)
        walls.append((time.perf_counter() - t0) * 1e6)
        cpus.append((time.process_time() - c0) * 1e6)
        torch.cuda.synchronize()
    return {"cpu_us": cpus, "wall_us": walls}


def _measure(args, src, dst, src_t, dst_t, src_local, dst_local, ipc_sync: str) -> dict:
    t0 = time.perf_counter()
    plan = refit_engine.plan(src_local, dst_local, bucket_bytes=args.bucket_mib << 20,
                             timeout_s=args.timeout_s, transport="auto", ipc_sync=ipc_sync,
                             name=f"ipc-bench-{ipc_sync}")
    out = {"plan_s": time.perf_counter() - t0,
           "transports": sorted(set(plan.peer_transports.values())),
           "traffic": {k: plan.traffic.get(k) for k in TRAFFIC}}
    try:
        for kind in KINDS:
            graph = kind == "graph"
            for _ in range(args.warmup):  # the first graph=True run captures
                stats = refit_engine.execute(plan, graph=graph)
            out[kind] = {**_timed(plan, graph, args.iters),
                         "enqueue": _enqueue(plan, graph, args.iters, True),
                         "enqueue_unchecked": _enqueue(plan, graph, args.iters, False),
                         "stats": {k: stats.get(k) for k in TRAFFIC}}
        out["wrong"] = {}
        for kind, seed in zip(KINDS, (11, 12)):
            # NOTE: no barrier between the new values and the refit, as in training: the
            # transport orders each rank's refit after the work already on its stream.
            fill(src, src_t, seed)
            poison(dst_t)
            refit_engine.execute(plan, graph=kind == "graph")
            out["wrong"][kind] = check(dst, dst_t, seed)
    finally:
        plan.close()
    return out


def ipc_rank(rank, world, args):
    """One rank process: its tensors on cuda:0, a gloo group, both ipc_sync modes measured.
    Rank 0 returns every rank's figures; the others None."""
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.deadline_s))
    try:
        src, dst = layouts(args)
        src_t, dst_t = alloc(src, {rank}), alloc(dst, {rank})
        fill(src, src_t, seed=1)
        poison(dst_t)
        src_local = from_layout(src, rank, {k: t for (_, k), t in src_t.items()}) \
            if src_t else None
        dst_local = from_layout(dst, rank, {k: t for (_, k), t in dst_t.items()}) \
            if dst_t else None
        modes = {}
        for ipc_sync in SYNCS:
            try:
                modes[ipc_sync] = _measure(args, src, dst, src_t, dst_t, src_local, dst_local,
                                           ipc_sync)
            except Exception as exc:  # noqa: BLE001 - reported; a RefitError is on every rank
                modes[ipc_sync] = {"error": f"{type(exc).__name__}: {exc}"}
            torch.cuda.synchronize()
            dist.barrier()
            if rank == 0:
                print(f"[ipc] ipc_sync={ipc_sync}: "
                      + ("failed: " + modes[ipc_sync]["error"] if "error" in modes[ipc_sync]
                         else "done"), flush=True)
        gathered = [None] * world
        dist.all_gather_object(gathered, modes)
        return gathered if rank == 0 else None
    finally:
        dist.destroy_process_group()


def merge(per_rank: list[dict]) -> dict:
    """Every rank's figures as one: per iteration the slowest rank, then medians."""
    out = {}
    for ipc_sync in SYNCS:
        errors = {r: m[ipc_sync]["error"] for r, m in enumerate(per_rank) if "error" in m[ipc_sync]}
        if errors:
            out[ipc_sync] = {"error": errors[min(errors)], "ranks_failed": sorted(errors)}
            continue
        modes = [m[ipc_sync] for m in per_rank]
        entry = {"plan_s": max(m["plan_s"] for m in modes),
                 "transports": sorted({t for m in modes for t in m["transports"]}),
                 "traffic": {k: _total(m["traffic"][k] for m in modes) for k in TRAFFIC},
                 "traffic_per_rank": [m["traffic"] for m in modes],
                 "wrong": {kind: [w for m in modes for w in m["wrong"][kind]] for kind in KINDS}}
        for kind in KINDS:
            runs = [m[kind] for m in modes]
            wall, event = _slowest(runs, "wall_ms"), _slowest(runs, "event_ms")
            entry[kind] = {
                "median_ms": statistics.median(wall), "min_ms": min(wall), "max_ms": max(wall),
                "event_median_ms": statistics.median(event),
                "enqueue_cpu_us": statistics.median(_slowest(runs, "cpu_us", "enqueue")),
                "enqueue_wall_us": statistics.median(_slowest(runs, "wall_us", "enqueue")),
                "unchecked_cpu_us": statistics.median(
                    _slowest(runs, "cpu_us", "enqueue_unchecked")),
                "unchecked_wall_us": statistics.median(
                    _slowest(runs, "wall_us", "enqueue_unchecked")),
                "staging_bytes": _total(r["stats"]["staging_bytes"] for r in runs),
                "wall_ms": wall, "event_ms": event}
        out[ipc_sync] = entry
    return out


def _total(values):
    """The sum over ranks; None when any rank has no such figure (the API left it out)."""
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _slowest(runs: list[dict], field: str, sub: str | None = None) -> list[float]:
    """Per iteration, the largest of every rank's `field` (of `sub` when given)."""
    series = [(run[sub] if sub else run)[field] for run in runs]
    return [max(values) for values in zip(*series)]


# -- --alias-compare: plan(alias=False) against plan(alias=True), EP unchanged -----------------

ALIAS_SETTINGS = (("off", False), ("on", True))
ALIAS_SLACK_BYTES = 1 << 20  # per rank: what the memory drop may fall short of bytes_aliased
ALIAS_STATS = (*TRAFFIC, "bytes_aliased")


def _clean_memory() -> int:
    """Everything dropped is returned to the driver; this process's allocated bytes after."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def _alias_setting(args, rank: int, alias: bool, src, dst, src_t: dict, dst_t: dict) -> dict:
    """One plan over this rank's fresh models (sources filled, destinations poisoned), with
    `alias`: memory after planning and after its first refit, its statistics, the plain refit
    timed, then bit-exactness with new source values. Closes the plan (every rank's mappings of
    the peers' tensors released before the caller drops the tensors)."""
    src_local = from_layout(src, rank, {k: t for (_, k), t in src_t.items()}) if src_t else None
    dst_local = from_layout(dst, rank, {k: t for (_, k), t in dst_t.items()}) if dst_t else None
    t0 = time.perf_counter()
    plan = refit_engine.plan(src_local, dst_local, bucket_bytes=args.bucket_mib << 20,
                             timeout_s=args.timeout_s, transport="auto", ipc_sync=args.ipc_sync,
                             alias=alias, name=f"ipc-alias-{'on' if alias else 'off'}")
    try:
        torch.cuda.synchronize()
        out = {"plan_s": time.perf_counter() - t0, "after_plan": torch.cuda.memory_allocated(),
               "transports": sorted(set(plan.peer_transports.values())),
               "traffic": {k: plan.traffic.get(k) for k in ALIAS_STATS},
               "aliases": len(plan.aliases), "aliased_keys": sorted(a.key for a in plan.aliases),
               "not_aliased": dict(plan.not_aliased),
               # The caller's tensor objects themselves now hold the source's storage.
               "shared": sum(dst_t[(rank, a.key)].data_ptr()
                             == src_t[(rank, a.source_key)].data_ptr() for a in plan.aliases)}
        stats = refit_engine.execute(plan)
        torch.cuda.synchronize()
        out["after_refit"] = torch.cuda.memory_allocated()
        out["stats"] = {k: stats.get(k) for k in ALIAS_STATS}
        for _ in range(args.warmup - 1):
            refit_engine.execute(plan)
        out.update(_timed(plan, False, args.iters))
        # NOTE: an aliased destination IS its source's storage: poisoning it would overwrite
        # the new source values (and nothing copies it back). Only the copied ones are poisoned;
        # the check then reads the aliased ones through the shared storage.
        aliased = set(out["aliased_keys"])
        fill(src, src_t, seed=21)
        poison({k: t for k, t in dst_t.items() if k[1] not in aliased})
        refit_engine.execute(plan)
        out["wrong"] = check(dst, dst_t, seed=21)
    finally:
        plan.close()
    return out


def alias_rank(rank, world, args):
    """One rank process: alias off, then on, each over models built fresh on cuda:0 (the
    previous ones deleted first). Rank 0 returns every rank's figures; the others None."""
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.deadline_s))
    try:
        src, dst = alias_layouts(args)
        settings = {"device": device_name()}
        for label, alias in ALIAS_SETTINGS:
            base = _clean_memory()
            src_t, dst_t = alloc(src, {rank}), alloc(dst, {rank})
            fill(src, src_t, seed=1)
            poison(dst_t)
            torch.cuda.synchronize()
            models = torch.cuda.memory_allocated()
            try:
                entry = _alias_setting(args, rank, alias, src, dst, src_t, dst_t)
                entry.update(base=base, models=models)
            except Exception as exc:  # noqa: BLE001 - reported; a RefitError is on every rank
                entry = {"error": f"{type(exc).__name__}: {exc}"}
            settings[label] = entry
            torch.cuda.synchronize()
            dist.barrier()  # every plan closed before any rank frees what peers mapped
            del src_t, dst_t
            _clean_memory()
            if rank == 0:
                print(f"[ipc] alias={alias}: "
                      + ("failed: " + entry["error"] if "error" in entry else "done"), flush=True)
        gathered = [None] * world
        dist.all_gather_object(gathered, settings)
        return gathered if rank == 0 else None
    finally:
        dist.destroy_process_group()


def merge_alias(per_rank: list[dict]) -> dict:
    """Every rank's figures of each setting (times: slowest rank per iteration, then the
    median), and per rank how far memory dropped with aliasing against bytes_aliased."""
    out = {"device": per_rank[0].get("device")}
    for label, _ in ALIAS_SETTINGS:
        errors = {r: m[label]["error"] for r, m in enumerate(per_rank) if "error" in m[label]}
        if errors:
            out[label] = {"error": errors[min(errors)], "ranks_failed": sorted(errors)}
            continue
        runs = [m[label] for m in per_rank]
        wall, event = _slowest(runs, "wall_ms"), _slowest(runs, "event_ms")
        out[label] = {
            "median_ms": statistics.median(wall), "min_ms": min(wall), "max_ms": max(wall),
            "event_median_ms": statistics.median(event), "wall_ms": wall, "event_ms": event,
            "plan_s": max(r["plan_s"] for r in runs),
            "transports": sorted({t for r in runs for t in r["transports"]}),
            "traffic": {k: _total(r["traffic"][k] for r in runs) for k in ALIAS_STATS},
            "stats": {k: _total(r["stats"][k] for r in runs) for k in ALIAS_STATS},
            "aliases": sum(r["aliases"] for r in runs), "shared": sum(r["shared"] for r in runs),
            "not_aliased": sum(len(r["not_aliased"]) for r in runs),
            "wrong": [w for r in runs for w in r["wrong"]],
            # Per rank: memory_allocated() before its models, with them, after planning, after
            # the first refit (absolute bytes), and its own statistics.
            "per_rank": [{k: r[k] for k in ("base", "models", "after_plan", "after_refit")}
                         | {"bytes_aliased": r["stats"]["bytes_aliased"],
                            "bytes_local": r["stats"]["bytes_local"]} for r in runs]}
    if "error" in out["off"] or "error" in out["on"]:
        return out
    rows = []
    for rank, (off, on) in enumerate(zip(out["off"]["per_rank"], out["on"]["per_rank"])):
        # Each setting against what the process held before its own models were allocated.
        plan_off, plan_on = off["after_plan"] - off["base"], on["after_plan"] - on["base"]
        refit_off, refit_on = off["after_refit"] - off["base"], on["after_refit"] - on["base"]
        aliased = on["bytes_aliased"] or 0
        rows.append({"rank": rank, "bytes_aliased": aliased,
                     "mem_off": plan_off, "mem_on": plan_on, "drop": plan_off - plan_on,
                     "drop_minus_aliased": plan_off - plan_on - aliased,
                     "refit_mem_off": refit_off, "refit_mem_on": refit_on,
                     "refit_drop": refit_off - refit_on,
                     "local_saved": (off["bytes_local"] or 0) - (on["bytes_local"] or 0)})
    out["per_rank"] = rows
    return out


def _alias_row(label, e) -> str:
    gib = 2**30
    t = e["stats"]
    return (f"{label:<8}{e['median_ms']:>10.2f}{e['event_median_ms']:>10.2f}{e['plan_s']:>8.1f}"
            f"{sum(r['after_plan'] - r['base'] for r in e['per_rank']) / gib:>10.2f}"
            f"{sum(r['after_refit'] - r['base'] for r in e['per_rank']) / gib:>10.2f}"
            f"{(t['bytes_local'] or 0) / gib:>10.2f}{(t['bytes_ipc'] or 0) / gib:>9.2f}"
            f"{(t['bytes_aliased'] or 0) / gib:>12.2f}{e['aliases']:>9d}")


def report_alias(args, alias: dict, mps: dict, src_bytes: int, dst_bytes: int) -> dict:
    w, gib, mib = args.world, 2**30, 2**20
    print()
    print(f"{alias.get('device') or '?'}: plan(alias=False) against plan(alias=True), EP "
          f"unchanged; MPS {'on' if mps['on'] else 'off'}; ipc_sync={args.ipc_sync}")
    print(f"Kimi K2 {args.layers} layers, {args.experts} experts: TP{w}/EP{w} "
          f"({src_bytes / gib:.1f} GiB) -> TP{w // 2}/EP{w} ({dst_bytes / gib:.1f} GiB), "
          f"{w} processes on cuda:0; each setting's models built fresh")
    print(f"{'alias':<8}{'median ms':>10}{'events ms':>10}{'plan s':>8}{'mem GiB':>10}"
          f"{'refit GiB':>10}{'local GiB':>10}{'IPC GiB':>9}{'aliased GiB':>12}{'aliases':>9}")
    key = {"device": alias.get("device"), "world": w, "mps": mps["on"],
           "ipc_sync": args.ipc_sync, "config": f"TP{w}/EP{w} -> TP{w // 2}/EP{w}"}
    ok = [label for label, _ in ALIAS_SETTINGS if "error" not in alias[label]]
    for label, _ in ALIAS_SETTINGS:
        e = alias[label]
        if "error" in e:
            print(f"{label:<8}failed (ranks {e['ranks_failed']}): {e['error'][:200]}")
            continue
        print(_alias_row(label, e))
        key[f"alias_{label}_ms"] = e["median_ms"]
        key[f"alias_{label}_event_ms"] = e["event_median_ms"]
        key[f"alias_{label}_mem_gib"] = sum(r["after_plan"] - r["base"]
                                            for r in e["per_rank"]) / gib
        key[f"alias_{label}_refit_mem_gib"] = sum(r["after_refit"] - r["base"]
                                                  for r in e["per_rank"]) / gib
        key[f"alias_{label}_exact"] = not e["wrong"]
    print("(median ms: slowest rank's wall time around execute(sync=True), events: its CUDA "
          "events; mem / refit GiB: torch.cuda.memory_allocated() after planning / after the "
          "first refit, less what each process held before its models, summed over ranks; "
          "local / IPC / aliased GiB: the refit's statistics summed over ranks)")
    rows = alias.get("per_rank", [])
    for r in rows:
        print(f"rank {r['rank']}: memory after planning off {r['mem_off'] / mib:.1f} MiB, on "
              f"{r['mem_on'] / mib:.1f} MiB, drop {r['drop'] / mib:.1f} MiB; bytes_aliased "
              f"{r['bytes_aliased'] / mib:.1f} MiB; drop - aliased "
              f"{r['drop_minus_aliased'] / mib:+.3f} MiB (after a refit: drop "
              f"{r['refit_drop'] / mib:.1f} MiB)")
    exact = len(ok) == len(ALIAS_SETTINGS) and not any(alias[s]["wrong"] for s in ok)
    mem_ok = bool(rows) and all(
        min(r["drop"], r["refit_drop"]) >= r["bytes_aliased"] - ALIAS_SLACK_BYTES for r in rows)
    on = alias["on"] if "on" in ok else {}
    shared = bool(on) and on["aliases"] > 0 and on["shared"] == on["aliases"]
    local_ok = bool(rows) and all(r["local_saved"] == r["bytes_aliased"] for r in rows)
    transports = sorted({t for s in ok for t in alias[s]["transports"]})
    staging = _total([alias[s]["stats"]["staging_bytes"] for s in ok]
                     + [alias[s]["traffic"]["staging_bytes"] for s in ok])
    wrong = "".join(f"; {s} wrong in {alias[s]['wrong'][:3]}" for s in ok if alias[s]["wrong"])
    print(f"bit-exact after the timed runs: {exact}{wrong}; memory dropped by bytes_aliased on "
          f"every rank (less {ALIAS_SLACK_BYTES // mib} MiB): {mem_ok}; aliased destinations "
          f"share the source's storage: {shared}; bytes_local dropped by bytes_aliased: "
          f"{local_ok}; transports {transports}; staging bytes {staging}")
    if "alias_off_ms" in key and "alias_on_ms" in key:
        key["alias_speedup"] = key["alias_off_ms"] / key["alias_on_ms"]
    key.update(
        bytes_aliased_gib=sum(r["bytes_aliased"] for r in rows) / gib if rows else None,
        alias_mem_drop_gib=sum(r["drop"] for r in rows) / gib if rows else None,
        alias_refit_mem_drop_gib=sum(r["refit_drop"] for r in rows) / gib if rows else None,
        alias_mem_drop_minus_aliased_mib=(sum(r["drop_minus_aliased"] for r in rows) / mib
                                          if rows else None),
        alias_mem_drop_minus_aliased_min_mib=(min(r["drop_minus_aliased"] for r in rows) / mib
                                              if rows else None),
        alias_mem_ok=mem_ok, alias_shared=shared, alias_local_ok=local_ok,
        transports=transports, staging_bytes=staging, alias_exact=exact)
    return key


def alias_main(args) -> int:
    src, dst = alias_layouts(args)  # no CUDA in this process: the layouts only
    src_bytes, dst_bytes = layout_bytes(src), layout_bytes(dst)
    del src, dst
    w = args.world
    print(f"[ipc] --alias-compare: scaled Kimi K2, {args.layers} layers, {args.experts} experts; "
          f"TP{w}/EP{w} ({src_bytes / 2**30:.1f} GiB) -> TP{w // 2}/EP{w} "
          f"({dst_bytes / 2**30:.1f} GiB) over {w} processes on one GPU, alias off then on",
          flush=True)
    with Mps(args.mps) as mps:
        values, failures = run_ranks(alias_rank, w, args, env=mps.env, timeout=args.deadline_s)
        if failures:
            print("[ipc] rank processes failed"
                  + (" (MPS was on: --no-mps runs without it)" if mps.on else "")
                  + ":\n" + failure_report(failures), flush=True)
            return 1
    alias = merge_alias(values[0])
    key = report_alias(args, alias, mps.record(), src_bytes, dst_bytes)
    payload = {"bench": "ipc_alias",
               "env": {**environment(__file__), "device": alias.get("device")},
               "args": vars(args), "mps": mps.record(), "src_bytes": src_bytes,
               "dst_bytes": dst_bytes, "alias": alias, "key": key}
    path = save_json(results_dir(__file__), "ipc_alias", payload)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], path.name), "w") as f:
            json.dump(payload, f, indent=1)
    print(json.dumps(key))
    good = (key["alias_exact"] and key["alias_mem_ok"] and key["alias_shared"]
            and key["alias_local_ok"] and key["staging_bytes"] == 0
            and set(key["transports"]) <= {"ipc"})
    return 0 if good else 1


# -- MPS -----------------------------------------------------------------------------------------

class Mps:
    """A CUDA MPS control daemon of this run's own (pipe and log folders in a fresh temporary
    folder), for the processes started with `env`; stopped on exit, also on failure."""

    def __init__(self, wanted: bool):
        self.wanted, self.on, self.why_off, self.env = wanted, False, None, {}
        self.folder, self.exe, self.servers = None, None, None

    def __enter__(self):
        if not self.wanted:
            self.why_off = "--no-mps"
            return self
        self.exe = shutil.which("nvidia-cuda-mps-control")
        if self.exe is None:
            self.why_off = "nvidia-cuda-mps-control not found"
            print(f"[ipc] warning: {self.why_off}; running without MPS", flush=True)
            return self
        self.folder = tempfile.mkdtemp(prefix="refit-ipc-mps-")
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(self.folder, "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": os.path.join(self.folder, "log")}
        for path in self.env.values():
            os.makedirs(path)
        started = subprocess.run([self.exe, "-d"], env={**os.environ, **self.env},
                                 capture_output=True, text=True, timeout=60, check=False)
        if started.returncode != 0:
            self.why_off = (f"nvidia-cuda-mps-control -d failed ({started.returncode}): "
                            f"{(started.stderr or started.stdout).strip()}")
            print(f"[ipc] warning: {self.why_off}; running without MPS", flush=True)
            self.env = {}
            return self
        self.on = True
        print(f"[ipc] MPS control daemon started (pipes in {self.env['CUDA_MPS_PIPE_DIRECTORY']})",
              flush=True)
        return self

    def control(self, command: str) -> str:
        done = subprocess.run([self.exe], input=command + "\n", env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=60, check=False)
        return (done.stdout + done.stderr).strip()

    def __exit__(self, *exc_info):
        if self.on:
            try:
                self.servers = self.control("get_server_list")
                self.control("quit")
                pipe = os.path.join(self.env["CUDA_MPS_PIPE_DIRECTORY"], "control")
                deadline = time.monotonic() + 15
                while os.path.exists(pipe) and time.monotonic() < deadline:
                    time.sleep(0.2)
                print("[ipc] MPS control daemon stopped", flush=True)
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"[ipc] warning: stopping MPS: {exc}", flush=True)
            out = os.environ.get("OUT")
            log = self.env.get("CUDA_MPS_LOG_DIRECTORY")
            if out and log and os.path.isdir(log):
                for name in os.listdir(log):
                    shutil.copy(os.path.join(log, name), os.path.join(out, f"ipc_mps_{name}"))
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
        return False

    def record(self) -> dict:
        return {"requested": self.wanted, "on": self.on, "why_off": self.why_off,
                "server_list": self.servers}


# -- report --------------------------------------------------------------------------------------

def _row(label, ms, event_ms, floor_ms, cpu_us, wall_us, staging) -> str:
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"
    return (f"{label:<22}{num(ms, '.2f'):>10}{num(event_ms, '.2f'):>10}"
            f"{num(floor_ms / ms if ms and floor_ms else None, '.1%'):>9}"
            f"{num(cpu_us, '.0f'):>9}{num(wall_us, '.0f'):>11}{num(staging, 'd'):>9}")


def report(args, single: dict, ipc: dict, mps: dict, dst_bytes: int, src_bytes: int) -> dict:
    ceiling = single.get("ceiling") or {}
    gbps = ceiling.get("gbps_rw")
    floor_ms = 2 * dst_bytes / (gbps * 1e6) if gbps else None
    w = args.world
    print()
    print(f"{single.get('device', '?')}: copy ceiling {gbps or float('nan'):.0f} GB/s; floor "
          f"{floor_ms or float('nan'):.2f} ms ({dst_bytes / 2**30:.2f} GiB of destination read "
          f"+ written once: all {w} ranks share this GPU); MPS {'on' if mps['on'] else 'off'}")
    print(f"Kimi K2 {args.layers} layers, {args.experts} experts: TP{w}/EP{w} "
          f"({src_bytes / 2**30:.1f} GiB) -> TP{w // 2}/EP{w // 2} "
          f"({dst_bytes / 2**30:.1f} GiB), {w} processes on cuda:0")
    print(f"{'refit':<22}{'median ms':>10}{'events ms':>10}{'of floor':>9}{'cpu us':>9}"
          f"{'enqueue us':>11}{'staging':>9}")
    flat = {}
    for ipc_sync in SYNCS:
        entry = ipc.get(ipc_sync, {"error": "not run"})
        if "error" in entry:
            print(f"{'ipc ' + ipc_sync:<22}failed: {entry['error'][:200]}")
            continue
        for kind in KINDS:
            e = entry[kind]
            print(_row(f"ipc {ipc_sync} {kind}", e["median_ms"], e["event_median_ms"],
                       floor_ms, e["enqueue_cpu_us"], e["enqueue_wall_us"],
                       e["staging_bytes"]))
            flat[f"ipc_{ipc_sync}_{kind}_ms"] = e["median_ms"]
            flat[f"ipc_{ipc_sync}_{kind}_cpu_us"] = e["enqueue_cpu_us"]
    for mode in ("staged", "direct"):
        if mode not in single:
            continue
        for kind in KINDS:
            ms = single[mode][kind]["median_ms"]
            print(_row(f"loopback {mode} {kind}", ms, ms, floor_ms, None, None, None))
            flat[f"loopback_{mode}_{kind}_ms"] = ms
    print("(median ms: slowest rank's wall time around execute(sync=True); events: its CUDA "
          "events; cpu / enqueue us: execute(sync=False)'s process CPU / wall time, slowest "
          "rank; loopback: one process, CUDA events)")
    ok = [s for s in SYNCS if "error" not in ipc.get(s, {"error": 1})]
    wrong = {s: ipc[s]["wrong"] for s in ok}
    exact = len(ok) == len(SYNCS) and not any(w for s in ok for w in wrong[s].values())
    # The plans' and the refits' own figures (None: a rank's stats lack staging_bytes).
    staging = _total([ipc[s]["traffic"]["staging_bytes"] for s in ok]
                     + [ipc[s][k]["staging_bytes"] for s in ok for k in KINDS])
    transports = sorted({t for s in ok for t in ipc[s]["transports"]})
    print(f"bit-exact after the timed runs: {exact}"
          + "".join(f"; {s} {k} wrong in {v[:3]}" for s in ok for k, v in wrong[s].items() if v)
          + f"; transports {transports}; staging bytes {staging}; bytes over IPC "
          + ", ".join(f"{s} {(ipc[s]['traffic']['bytes_ipc'] or 0) / 2**30:.2f} GiB"
                      for s in ok))
    loopback_exact = all(not single[m]["wrong"] for m in ("staged", "direct") if m in single)
    best = min((v for k, v in flat.items() if k.startswith("ipc_") and k.endswith("_ms")),
               default=None)
    key = {"device": single.get("device"), "world": w, "mps": mps["on"], "floor_ms": floor_ms,
           **flat, "ipc_best_of_floor": floor_ms / best if best and floor_ms else None,
           "staging_bytes": staging, "transports": transports, "exact": exact,
           "loopback_exact": loopback_exact}
    return key


def _stop(signum, frame):
    """SIGTERM (e.g. `timeout`): stop the rank processes this run started, then unwind, so the
    MPS daemon is stopped too."""
    for child in multiprocessing.active_children():
        child.terminate()
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    if args.alias_compare:
        return alias_main(args)
    src, dst = layouts(args)  # no CUDA in this process: the layouts only
    src_bytes, dst_bytes = layout_bytes(src), layout_bytes(dst)
    del src, dst
    print(f"[ipc] scaled Kimi K2: {args.layers} layers, {args.experts} experts; source "
          f"{src_bytes / 2**30:.1f} GiB, destination {dst_bytes / 2**30:.1f} GiB over "
          f"{args.world} processes on one GPU", flush=True)
    with Mps(args.mps) as mps:
        values, failures = run_ranks(single_process_figures, 1, args, env=mps.env,
                                     timeout=args.deadline_s)
        if failures:
            print("[ipc] the single-process figures failed:\n" + failure_report(failures),
                  flush=True)
        single = values.get(0) or {}
        values, failures = run_ranks(ipc_rank, args.world, args, env=mps.env,
                                     timeout=args.deadline_s)
        if failures:
            print("[ipc] rank processes failed"
                  + (" (MPS was on: --no-mps runs without it)" if mps.on else "")
                  + ":\n" + failure_report(failures), flush=True)
            return 1
    ipc = merge(values[0])
    key = report(args, single, ipc, mps.record(), dst_bytes, src_bytes)
    payload = {"bench": "ipc", "env": {**environment(__file__), "device": single.get("device")},
               "args": vars(args), "mps": mps.record(), "src_bytes": src_bytes,
               "dst_bytes": dst_bytes, "single_process": single, "ipc": ipc, "key": key}
    path = save_json(results_dir(__file__), "ipc", payload)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], path.name), "w") as f:
            json.dump(payload, f, indent=1)
    print(json.dumps(key))
    good = key["exact"] and key["loopback_exact"] and key["staging_bytes"] == 0 and \
        set(key["transports"]) <= {"ipc"}
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
