"""The main job: refit a toy Kimi K2 between two parallel layouts and time it against
megatron-core's own refit, on CPU over gloo (no GPU needed) or on GPUs over NCCL.

    python -m refit_engine.bench                       # 4 ranks, TP2/ETP2 -> TP1
    python -m refit_engine.bench --src tp=2,pp=2 --dst tp=4 --iters 10
    python -m refit_engine.bench --non-collocated --world 4 --src tp=2 --dst tp=2

It spawns --world processes (or runs as one rank under torchrun/srun when RANK is set), builds
source and destination megatron-core models, plans once (warm-up, untimed), runs timed refits,
checks the result bit for bit, times megatron-core's refit on the same models, and prints the
seed's summary. The last line is one JSON object with the key figures.

Where (`--backend auto`, the default): NCCL with one GPU per rank (models on cuda:local_rank)
when this node has at least as many GPUs as ranks; otherwise gloo with every tensor on CPU
(NCCL cannot put several ranks on one GPU), spawned ranks then see no GPU at all. One line
says which and why. Layouts and sizes are checked before any process starts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import replace

from refit_engine.errors import RefitError
from refit_engine.harness.grid import parse_layout_spec, parse_overrides

DEFAULT_TOY = dict(num_layers=4, hidden=256, num_heads=8, q_lora_rank=64, kv_lora_rank=32,
                   qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, dense_ffn=512,
                   num_experts=16, moe_ffn=128, router_topk=2, shared_expert_ffn=128, vocab=4096)


def model_config(full_size: bool, overrides: dict):
    """Kimi K2 at published sizes (overrides may lower num_layers etc.), or the toy model."""
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    if full_size:
        return KimiK2Config(**overrides)
    return KimiK2Config.toy(**{**DEFAULT_TOY, **overrides})


def describe_layout(d: dict) -> str:
    return "/".join(f"{k.upper()}{v}" for k, v in d.items() if v > 1 or k == "tp")


def check_layouts(cfg, src: dict, dst: dict, world: int, non_collocated: bool) -> None:
    """Refuse (RefitError, one reason) a source / destination layout that cannot be built on
    `world` ranks (half of them each when non-collocated): sizes that do not divide the ranks
    or the model's dimensions. Cheap, without torch: called before any process starts."""
    from refit_engine.errors import RefitError
    if world < 1:
        raise RefitError(f"the world needs at least one rank, not {world}")
    if non_collocated and (world < 2 or world % 2):
        raise RefitError(f"non-collocated runs put the source on one half of the ranks and the "
                         f"destination on the other: the world must be even, not {world}")
    side = world // 2 if non_collocated else world
    where = f"{side} ranks" + (" (half of the world, non-collocated)" if non_collocated else "")
    for name, spec in (("source", src), ("destination", dst)):
        text = ",".join(f"{k}={v}" for k, v in spec.items())
        for key, value in spec.items():
            if value < 1:
                raise RefitError(f"{name} layout {text}: {key} must be >= 1, not {value}")
        tp, pp, ep, etp = spec["tp"], spec["pp"], spec["ep"], spec["etp"]
        if side % (tp * pp):
            raise RefitError(f"{name} layout {text}: TP {tp} x PP {pp} = {tp * pp} does not "
                             f"divide {where}")
        if side % (ep * etp * pp):
            raise RefitError(f"{name} layout {text}: EP {ep} x ETP {etp} x PP {pp} = "
                             f"{ep * etp * pp} does not divide {where}")
        dims = [("attention heads", cfg.num_heads, tp, "TP"), ("vocab", cfg.vocab, tp, "TP"),
                ("dense FFN size", cfg.dense_ffn, tp, "TP"),
                ("shared-expert FFN size", cfg.shared_expert_ffn, tp, "TP"),
                ("experts", cfg.num_experts, ep, "EP"), ("expert FFN size", cfg.moe_ffn, etp, "ETP")]
        for what, size, parts, label in dims:
            if size % parts:
                raise RefitError(f"{name} layout {text}: the model's {size} {what} do not "
                                 f"divide by {label} {parts}")
        if cfg.num_layers < pp:
            raise RefitError(f"{name} layout {text}: {cfg.num_layers} layers cannot fill "
                             f"{pp} pipeline stages")
        base, extra = divmod(cfg.num_layers, pp)
        if extra not in (0, 1, pp - 1):  # megatron_builder._uneven_pipeline's rule
            raise RefitError(f"{name} layout {text}: megatron cannot split {cfg.num_layers} "
                             f"layers over {pp} stages (only the first or last stage may differ)")


def choose_backend(requested: str, ranks: int, gpus: int) -> tuple[str, str]:
    """(backend, why) for `ranks` processes on a node with `gpus` GPUs: NCCL with one GPU per
    rank where there are enough GPUs, gloo on CPU otherwise (NCCL cannot put several ranks on
    one GPU). `requested`: auto, gloo or nccl; nccl without enough GPUs raises ValueError."""
    if requested == "gloo":
        return "gloo", "asked for (--backend gloo)"
    if gpus >= ranks:
        return "nccl", (f"{gpus} GPU{'s' if gpus != 1 else ''} for {ranks} "
                        f"rank{'s' if ranks != 1 else ''}: one GPU per rank")
    if requested == "nccl":
        raise ValueError(f"--backend nccl needs one GPU per rank: {ranks} ranks on this node "
                         f"but {gpus} GPU(s) visible (NCCL cannot put several ranks on one GPU)")
    if requested != "auto":
        raise ValueError(f"unknown backend {requested!r} (auto, gloo, nccl)")
    if gpus == 0:
        return "gloo", "no GPU visible"
    return "gloo", (f"{ranks} ranks but {gpus} GPU{'s' if gpus != 1 else ''}: NCCL cannot put "
                    "several ranks on one GPU")


def place_on(chunks, device: str) -> None:
    """Every parameter and buffer of `chunks` on `device`. Where CUDA is available
    megatron-core creates some tensors on the current GPU whatever the model's device (the
    router's expert_bias, rotary buffers) and the builder moves models to CPU only from CUDA;
    a refit needs one device per rank."""
    import itertools

    import torch
    from refit_engine.errors import RefitError
    want = torch.device(device)
    for chunk in chunks:
        chunk.to(want)
    strays = [f"{name} ({t.device})" for chunk in chunks for name, t in
              itertools.chain(chunk.named_parameters(), chunk.named_buffers())
              if t.device != want]
    if strays:
        raise RefitError(f"{len(strays)} tensors are not on {want} after moving the model: "
                         f"{strays[:3]}")


_LOG_FILES: list = []  # extra files rank 0's progress lines also go to (per-configuration logs)


def log(rank: int, message: str) -> None:
    if rank == 0:
        line = f"[refit-bench {time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        for f in _LOG_FILES:
            f.write(line + "\n")
            f.flush()


def _max_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _poison(chunks) -> None:
    import torch
    for chunk in chunks:
        for tensor in list(chunk.parameters()) + list(chunk.buffers()):
            tensor.data.view(torch.uint8).fill_(0xA5)


def _timed_refits(rank, fn, iters: int, label: str) -> list[float]:
    import torch.distributed as dist
    times = []
    for i in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        elapsed = _max_over_ranks(time.perf_counter() - t0)  # the slowest rank ends the refit
        times.append(elapsed * 1e3)
        log(rank, f"{label} iteration {i + 1}/{iters}: {times[-1]:.2f} ms")
    return times


def run_rank(rank: int, world: int, args, topo=None) -> dict | None:
    """One configuration on this rank (collective). `topo`: the measured topology for the
    floor and the prediction (measured here when not given). Rank 0 returns the figures."""
    import torch.distributed as dist

    import refit_engine
    from refit_engine.harness.models.megatron_builder import (ParallelLayout, build_kimi_k2,
                                                      build_process_groups)
    from refit_engine.harness.baselines.megatron_refit import megatron_refit
    from refit_engine.verify import check_exact

    cfg = model_config(args.full_size, args.model)
    device = rank_device()
    method = "nccl" if device != "cpu" else "gloo"
    src_spec, dst_spec = parse_layout_spec(args.src), parse_layout_spec(args.dst)
    check_layouts(cfg, src_spec, dst_spec, world, args.non_collocated)  # the same on every rank
    if topo is None:
        topo = measure_here(device, world)
    if args.non_collocated:
        half = world // 2
        src_ranks, dst_ranks = tuple(range(half)), tuple(range(half, world))
    else:
        src_ranks = dst_ranks = tuple(range(world))
    src_layout = ParallelLayout(**src_spec, ranks=src_ranks)
    dst_layout = ParallelLayout(**dst_spec, ranks=dst_ranks)
    mode = "non-collocated" if args.non_collocated else "collocated"
    log(rank, f"building process groups: source {describe_layout(src_spec)} on ranks "
              f"{src_ranks[0]}-{src_ranks[-1]}, destination {describe_layout(dst_spec)} on ranks "
              f"{dst_ranks[0]}-{dst_ranks[-1]} ({mode})")
    src_pgs = build_process_groups(src_layout)
    dst_pgs = build_process_groups(dst_layout)
    log(rank, f"building Kimi K2 models on {device} ({cfg.num_layers} layers, hidden "
              f"{cfg.hidden}, {cfg.num_experts} experts)")
    # Canonical init (every expert distinct, so misrouted experts show) draws every full tensor
    # on every holder: toy sizes only.
    init = "megatron" if args.full_size else "canonical"
    src = build_kimi_k2(cfg, src_layout, src_pgs, device=device, seed=1234, init=init) or None
    dst = build_kimi_k2(cfg, dst_layout, dst_pgs, device=device, seed=4321, init=init) or None
    for chunks in (src, dst):
        place_on(chunks or [], device)
    if dst:
        _poison(dst)

    log(rank, "warm-up: planning (gathers layouts once; excluded from timing)")
    t0 = time.perf_counter()
    plan = refit_engine.plan(src, dst, bucket_bytes=args.bucket_mib << 20)
    plan_s = _max_over_ranks(time.perf_counter() - t0)
    for _ in range(args.warmup):
        refit_engine.execute(plan)
    ours = _timed_refits(rank, lambda: refit_engine.execute(plan), args.iters, "refit_engine")
    ours_graph = None
    if device != "cpu":  # the same refit captured once as a CUDA graph, then replayed
        refit_engine.execute(plan, graph=True)
        ours_graph = _timed_refits(rank, lambda: refit_engine.execute(plan, graph=True),
                                   args.iters, "refit_engine (CUDA graph)")
    if args.full_size:
        # Full size: per-piece checksums of sent vs landed bytes (gathering the model is out).
        try:
            refit_engine.execute(plan, verify=True)
            wrong = []
        except refit_engine.RefitError as exc:
            wrong = [exc.tensor]
    else:
        wrong = check_exact(plan)
    exact = _max_over_ranks(float(bool(wrong))) == 0.0
    log(rank, f"bit-exact against the source weights: {exact}"
              + (f" (rank {rank} differs in {wrong[:3]})" if wrong else ""))

    megatron = None
    if not args.no_megatron:
        if dst:
            _poison(dst)
        log(rank, f"megatron-core refit ({method}): warm-up (builds its plan)")
        try:
            for _ in range(max(1, args.warmup)):
                megatron_refit(src, dst, src_pgs, dst_pgs, method=method)
            megatron = _timed_refits(rank, lambda: megatron_refit(src, dst, src_pgs, dst_pgs,
                                                                  method=method),
                                     args.iters, "megatron-core")
            # Ours was exact, so this compares megatron-core's result with ours. megatron-core
            # 0.16 moves parameters only: persistent buffers (router.expert_bias) stay behind.
            buffers = {name for chunk in dst or [] for name, _ in chunk.named_buffers()}
            differ = [] if args.full_size else \
                [k for k in check_exact(plan) if k not in buffers]
            megatron_exact = _max_over_ranks(float(bool(differ))) == 0.0
            log(rank, f"megatron-core result identical to ours on every parameter: "
                      f"{megatron_exact}" + (f" (rank 0 differs in {len(differ)} tensors, e.g. "
                                             f"{differ[:3]})" if differ else ""))
        except Exception as exc:  # report, keep our figures
            log(rank, f"megatron-core refit failed: {type(exc).__name__}: {exc}")
            megatron, megatron_exact = None, False

    per_rank = [None] * world
    dist.all_gather_object(per_rank, plan.traffic)  # what every refit of the plan moves
    if rank != 0:
        return None
    total = {k: sum(s[k] for s in per_rank) for k in ("bytes_local", "bytes_sent")}
    from refit_engine.harness.cost import predict
    from refit_engine.harness.dry_run import floor, rank_figures
    figs = [rank_figures(s["rank"], s["bytes_local"], s["per_peer"], topo) for s in per_rank]
    fl = floor(figs, topo)
    pred = predict(figs, topo, {s["rank"]: s["buckets"] for s in per_rank})
    med = statistics.median(ours)
    log(rank, f"median {med:.2f} ms; predicted {pred['seconds'] * 1e3:.2f} ms "
              f"({pred['term']}); floor {fl['seconds'] * 1e3:.2f} ms ({fl['term']})")
    return {"floor_ms": fl["seconds"] * 1e3, "floor_term": fl["term"],
            "predicted_ms": pred["seconds"] * 1e3, "predicted_term": pred["term"],
            "efficiency": fl["seconds"] * 1e3 / med if med else None,
            "topology": topo.__dict__,
            "config": {"src": src_spec, "dst": dst_spec, "mode": mode, "world": world,
                       "method": method, "model": cfg.__dict__}, "per_rank": per_rank,
            "plan_s": plan_s, "ours_ms": ours, "ours_graph_ms": ours_graph, "megatron_ms": megatron,
            "megatron_exact": megatron_exact if megatron else None,
            "exact": exact, "bytes": total, "buckets": plan.traffic["buckets"]}


def launched() -> bool:
    """Whether this process is one rank started by torchrun or srun."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def ranks_per_node(world: int) -> int:
    """Ranks on this node, from the launcher (all `world` ranks when it says nothing)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", world)))


def rank_device() -> str:
    """This rank's device: its GPU under NCCL (init_from_env set it), else cpu."""
    import torch.distributed as dist
    if "nccl" in dist.get_backend():
        import torch
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def device_topology(device: str):
    """The preset for `device`, named after it: cpu for CPU ranks; for a GPU the H100 or H200
    preset chosen by torch.cuda.get_device_name() (any other GPU starts from the H100's
    figures), named with the real device name and its memory."""
    from refit_engine.harness.topology import gpu_preset, preset
    if device == "cpu":
        return preset("cpu")
    import torch
    name = torch.cuda.get_device_name(device)
    memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return replace(preset(gpu_preset(name)), name=name, memory_gib=round(memory_gib, 1))


def measure_here(device: str, world: int):
    """The topology of `device` (device_topology) with this job's nodes, its bandwidths
    measured here (collective): named e.g. "NVIDIA H200, measured" or "CPU (gloo), measured"."""
    from refit_engine.harness.topology import measure
    per_node = ranks_per_node(world)
    base = device_topology(device)
    return measure(replace(base, gpus_per_node=per_node, nodes=max(1, world // per_node)))


def _map_slurm_env() -> None:
    """srun without torchrun: RANK / WORLD_SIZE / LOCAL_RANK from SLURM's variables."""
    if "RANK" not in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))


def init_from_env(backend: str, timeout: float, store=None) -> None:
    """init_process_group from torchrun's or srun's environment (RANK / SLURM_PROCID, ...);
    `store`: the rendezvous store already made (init_launched), else env:// makes one."""
    import torch
    import torch.distributed as dist
    _map_slurm_env()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))
        # NCCL for CUDA tensors (megatron-core's refit), gloo for the small CPU collectives
        # (layout gathering, timing reductions).
        backend = "cpu:gloo,cuda:nccl"
    td = datetime.timedelta(seconds=timeout)
    if store is None:
        dist.init_process_group(backend, timeout=td)
    else:  # as init_process_group does with the store env:// gives it
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store),
                                rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=td)


def agree_backend(decisions: list[dict]) -> tuple[str, str]:
    """(backend, why) that every rank of a launched job uses, from each rank's own decision
    ({"rank", "backend", "why"}, or {"rank", "error"} where choose_backend refused): NCCL only
    where every rank chose it; gloo everywhere as soon as one rank cannot have a GPU of its own
    (nodes with fewer GPUs than ranks), naming that rank; ValueError with the first refusal
    (--backend nccl on a node without enough GPUs) when any rank refused. Pure: every rank
    that sees the same decisions decides the same."""
    decisions = sorted(decisions, key=lambda d: d["rank"])
    refused = [d for d in decisions if d.get("error")]
    if refused:
        more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
        raise ValueError(f"{refused[0]['error']} (rank {refused[0]['rank']}{more})")
    gloo = [d for d in decisions if d["backend"] != "nccl"]
    if not gloo:
        return "nccl", decisions[0]["why"]
    if len(gloo) == len(decisions):
        return "gloo", decisions[0]["why"]
    return "gloo", (f"rank {gloo[0]['rank']}: {gloo[0]['why']} ({len(gloo)} of "
                    f"{len(decisions)} ranks), so every rank uses gloo")


def exchange_decisions(store, rank: int, world: int, decision: dict, prefix: str,
                       timeout: float = 300.0) -> tuple[str, str]:
    """agree_backend over `store` before any process group exists: every rank posts its
    decision, rank 0 reads them all and posts the agreed one, every rank reads that (2 x world
    store operations in all). Every rank returns the same (backend, why) or raises the same
    ValueError; rank 0 (the store's host under srun) waits until every rank has read it."""
    import time as _time
    store.set(f"{prefix}/{rank}", json.dumps({**decision, "rank": rank}))
    if rank == 0:
        decisions = [json.loads(store.get(f"{prefix}/{r}")) for r in range(world)]
        try:
            agreed = dict(zip(("backend", "why"), agree_backend(decisions)))
        except ValueError as exc:
            agreed = {"error": str(exc)}
        store.set(f"{prefix}/agreed", json.dumps(agreed))
    agreed = json.loads(store.get(f"{prefix}/agreed"))
    read = store.add(f"{prefix}/read", 1)
    if rank == 0:
        deadline = _time.monotonic() + timeout
        while read < world and _time.monotonic() < deadline:
            _time.sleep(0.02)
            read = store.add(f"{prefix}/read", 0)
    if "error" in agreed:
        raise ValueError(agreed["error"])
    return agreed["backend"], agreed["why"]


def agree_launched(requested: str, timeout: float):
    """One rank of a torchrun / srun job: decide the backend with every other rank. Each rank
    decides for its own node (decide_backend with the node's ranks and GPUs); the ranks agree
    over the rendezvous store before any process group or NCCL state exists, so nodes with
    different GPU counts never pick different backends (which hangs). Returns (backend, why,
    store); ValueError on every rank where one refused."""
    import torch.distributed as dist
    _map_slurm_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    td = datetime.timedelta(seconds=timeout)
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=td))
    store.set_timeout(td)
    try:
        backend, why = decide_backend(requested, ranks_per_node(world))
        decision = {"backend": backend, "why": why}
    except ValueError as exc:
        decision = {"error": str(exc)}
    # A torchrun restart keeps the agent's store: one set of keys per attempt.
    prefix = f"refit_engine/backend/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    backend, why = exchange_decisions(store, rank, world, decision, prefix, timeout)
    return backend, why, store


def init_launched(requested: str, timeout: float) -> tuple[str, str]:
    """agree_launched, then init_process_group with the agreed backend: (backend, why)."""
    backend, why, store = agree_launched(requested, timeout)
    init_from_env(backend, timeout, store=store)
    return backend, why


def spawn_ranks(target, world: int, *args, env: dict | None = None) -> list:
    """Starts `world` processes (spawn context) running target(rank, world, port, *args), with
    a free local port for their process group; `env`: variables set in their environment from
    the start (before they import anything)."""
    import multiprocessing as mp
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # spawned children copy this process's environment
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return procs


# Spawned gloo ranks see no GPU: megatron-core then builds every tensor on CPU (and four ranks
# do not each open a CUDA context on one GPU).
GLOO_ENV = {"CUDA_VISIBLE_DEVICES": ""}


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's config chatter
    import torch.distributed as dist
    try:
        init_from_env(args.backend, args.timeout)  # nccl: cuda:rank for this rank
        result = run_rank(rank, world, args)
        dist.destroy_process_group()
        queue.put((rank, result, None))
    except BaseException as exc:
        import traceback
        queue.put((rank, None, traceback.format_exc()))
        raise SystemExit(1) from exc


def exit_text(code: int | None) -> str:
    """A process's exit code in words: "exit code 1", "killed by signal 9 (SIGKILL)"."""
    import signal
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown"
        return f"killed by signal {-code} ({name})"
    return f"exit code {code}"


def wait_for_ranks(procs: list, queue, timeout: float, grace: float = 2.0,
                   poll: float = 0.2) -> tuple[dict, dict]:
    """Every spawned rank's report (rank, value, error) from `queue`, watching the processes
    meanwhile. A rank whose process ends without reporting (a crash, a signal, os._exit) is
    named with its exit code or signal `grace` seconds after it ended (time for a report
    already on its way to arrive); the ranks still running are then stopped, since they would
    wait on it until their own timeout. Nothing at all within `timeout`: the silent ranks are
    named and stopped. Returns ({rank: value}, {rank: error text})."""
    import queue as queue_mod
    values, failures, ended = {}, {}, {}
    deadline = time.monotonic() + timeout
    while len(values) + len(failures) < len(procs):
        try:
            rank, value, error = queue.get(timeout=poll)
            if error:
                failures[rank] = error
            else:
                values[rank] = value
            continue
        except queue_mod.Empty:
            pass
        now = time.monotonic()
        silent = [r for r in range(len(procs)) if r not in values and r not in failures]
        for r in silent:
            if procs[r].exitcode is not None:
                ended.setdefault(r, now)
        dead = [r for r in silent if r in ended and now - ended[r] >= grace]
        if dead:
            for r in dead:
                failures[r] = (f"process {procs[r].pid} died without reporting: "
                               f"{exit_text(procs[r].exitcode)}\n")
            others = ", ".join(map(str, dead))
            for r in silent:
                if r not in dead:
                    failures[r] = (f"stopped: rank{'s' if len(dead) > 1 else ''} {others} "
                                   f"died without reporting\n")
            break
        if now > deadline:
            for r in silent:
                failures[r] = f"did not report within {timeout:g} s: stopped\n"
            break
    for p in procs:  # the ones still running: stopped (they wait on a dead or silent rank)
        if p.is_alive() and p.pid is not None:
            p.terminate()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=10)
    return values, failures


def failure_report(failures: dict[int, str]) -> str:
    """Every failed rank's traceback, those ending in the same error printed once."""
    groups: dict[str, list[int]] = {}
    for rank in sorted(failures):
        groups.setdefault(failures[rank], []).append(rank)
    out = []
    for text, ranks in groups.items():
        out.append(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}:\n{text}")
    return "\n".join(out)


def summary_text(run_id: str, results: list[dict], nodes: str, ranks: int, backend: str) -> str:
    """The seed benchmark's summary of one or more configurations (the main job and the sweep),
    with our layouts, prediction, floor and megatron-core beside each."""
    gpus = f"{ranks}" if backend == "nccl" else f"0 ({ranks} CPU ranks, gloo)"
    lines = ["Kimi K2 Refit Benchmark Summary", "================================",
             f"Job ID: {run_id}", f"Nodes: {nodes}", f"Total GPUs: {gpus}", "", "Results:",
             "--------", ""]
    for r in results:
        c = r["config"]
        head = f"Config: TP {c['src']['tp']} -> TP {c['dst']['tp']} ({c['mode']}, {c['method']})"
        if r.get("error"):
            lines += [head, f"Failed: {r['error']}", ""]
            continue
        lines.append(f"{head}  [source {describe_layout(c['src'])}, destination "
                     f"{describe_layout(c['dst'])}]")
        t = r["ours_ms"]
        lines += [f"Mean refit time: {statistics.mean(t):.2f} ms",
                  f"Min refit time:  {min(t):.2f} ms",
                  f"Max refit time:  {max(t):.2f} ms"]
        if r.get("ours_graph_ms"):
            g = r["ours_graph_ms"]
            lines.append(f"CUDA graph replay: mean {statistics.mean(g):.2f} ms, min {min(g):.2f} "
                         f"ms, max {max(g):.2f} ms")
        if r.get("floor_ms") is not None:
            topo = r["topology"]
            lines.append(f"Predicted: {r['predicted_ms']:.2f} ms ({r['predicted_term']}); "
                         f"floor: {r['floor_ms']:.2f} ms ({r['floor_term']}); efficiency "
                         f"{r['efficiency']:.0%}; measured copy {topo['copy_gbps']:.0f} GB/s, "
                         f"link ({topo.get('intra_link', 'NVLink')}) "
                         f"{topo['intra_node_gbps']:.1f} GB/s")
        if r.get("megatron_ms"):
            m = r["megatron_ms"]
            lines.append(f"megatron-core refit: mean {statistics.mean(m):.2f} ms "
                         f"(speedup {statistics.median(m) / statistics.median(t):.2f}x)")
        lines.append(f"Bit-exact: {r['exact']}")
        lines.append("")
    return "\n".join(lines)


def _number(text: str, convert, ok, requirement: str):
    """An argparse value: `convert(text)`, refused with a reason unless `ok(value)`."""
    try:
        value = convert(text)
    except ValueError:
        kind = "an integer" if convert is int else "a number"
        raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {requirement}, not {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, lambda v: v >= 1, "at least 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, lambda v: v >= 0, "at least 0")


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    return _number(text, float, lambda v: v > 0, "positive")


def layout_arg(text: str) -> str:
    """argparse type: a layout such as tp=2,ep=4 (checked here, kept as text)."""
    try:
        parse_layout_spec(text)
    except (SystemExit, ValueError) as exc:  # unknown key / not an integer
        raise argparse.ArgumentTypeError(f"bad layout {text!r}: {exc} (e.g. tp=2,pp=1,ep=4,etp=1)"
                                         ) from None
    return text


def overrides_arg(text: str) -> dict:
    """argparse type: model size overrides such as hidden=512,num_layers=6."""
    try:
        return parse_overrides(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad overrides {text!r}: NAME=INTEGER[,NAME=INTEGER...]"
                                         ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refit_engine.bench",
                                     description="Refit a toy Kimi K2 between two layouts and time "
                                                 "it against megatron-core's refit (CPU/gloo, or "
                                                 "NCCL with one GPU per rank).")
    parser.add_argument("--world", type=positive_int, default=4,
                        help="processes to spawn without a launcher (default 4)")
    parser.add_argument("--src", type=layout_arg, default="tp=2,etp=2",
                        help="source layout (default tp=2,etp=2: the layouts megatron-core 0.16 can refit)")
    parser.add_argument("--dst", type=layout_arg, default="tp=1",
                        help="destination layout (default tp=1)")
    parser.add_argument("--non-collocated", action="store_true",
                        help="source on the first half of the ranks, destination on the rest")
    parser.add_argument("--iters", type=positive_int, default=5,
                        help="timed iterations (default 5)")
    parser.add_argument("--warmup", type=non_negative_int, default=2,
                        help="warm-up iterations (default 2)")
    parser.add_argument("--bucket-mib", type=positive_int, default=64,
                        help="largest message between two ranks in one bucket, MiB (default 64)")
    parser.add_argument("--timeout", type=positive_float, default=300.0,
                        help="seconds for any wait (default 300)")
    parser.add_argument("--no-megatron", action="store_true", help="skip megatron-core's refit")
    parser.add_argument("--model", type=overrides_arg, default={},
                        help="size overrides, e.g. hidden=512,num_layers=6")
    parser.add_argument("--json-out", help="also write the full results here")
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                        help="auto (default): nccl with one GPU per rank when this node has a GPU "
                             "for every rank, else gloo with every tensor on CPU")
    parser.add_argument("--full-size", action="store_true",
                        help="published Kimi K2 sizes (--model may still lower num_layers)")
    return parser


def _gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def decide_backend(requested: str, ranks_here: int) -> tuple[str, str]:
    """Where the main job and the sweep run `ranks_here` ranks on this node: choose_backend
    with this node's GPUs (none counted when gloo is asked for). ValueError as choose_backend."""
    return choose_backend(requested, ranks_here, 0 if requested == "gloo" else _gpu_count())


def where_text(backend: str) -> str:
    return "one GPU each" if backend == "nccl" else "every tensor on CPU"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", args.world))) \
        if launched() else args.world
    try:  # before any process starts: one clear error
        cfg = model_config(args.full_size, args.model)
        check_layouts(cfg, parse_layout_spec(args.src), parse_layout_spec(args.dst), world,
                      args.non_collocated)
    except TypeError:  # an unknown --model field
        from dataclasses import fields

        from refit_engine.harness.models.kimi_k2 import KimiK2Config
        known = [f.name for f in fields(KimiK2Config)]
        parser.error(f"--model: unknown field(s) {sorted(set(args.model) - set(known))} "
                     f"(known: {', '.join(known)})")
    except RefitError as exc:
        parser.error(exc.reason)
    if launched():  # by torchrun / srun: this process is one rank
        first = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
        try:  # agreed by every rank (a node with fewer GPUs makes every rank use gloo)
            args.backend, why = init_launched(args.backend, args.timeout)
        except ValueError as exc:  # the same refusal on every rank; rank 0 says it
            if first:
                parser.error(str(exc))
            return 2
        if first:
            print(f"[refit-bench] {world} {args.backend} ranks, {where_text(args.backend)}: "
                  f"{why}", flush=True)
        import torch.distributed as dist
        result = run_rank(dist.get_rank(), dist.get_world_size(), args)
        dist.destroy_process_group()
    else:
        try:
            args.backend, why = decide_backend(args.backend, world)
        except ValueError as exc:
            parser.error(str(exc))
        where = where_text(args.backend)
        import multiprocessing as mp
        queue = mp.get_context("spawn").Queue()
        print(f"[refit-bench] spawning {args.world} {args.backend} processes, {where}: {why}",
              flush=True)
        procs = spawn_ranks(_worker, args.world, args, queue,
                            env=GLOO_ENV if args.backend == "gloo" else None)
        values, failures = wait_for_ranks(procs, queue, args.timeout + 600)
        result = values.get(0)
        if failures:
            print(failure_report(failures), file=sys.stderr)
            return 1
    if result is None:
        return 0
    print()
    print(summary_text(os.environ.get("SLURM_JOB_ID", "local"), [result],
                       os.environ.get("SLURM_JOB_NUM_NODES", "1"), result["config"]["world"],
                       result["config"]["method"]))
    ours_med = statistics.median(result["ours_ms"])
    meg_med = statistics.median(result["megatron_ms"]) if result["megatron_ms"] else None
    line = {"exact": result["exact"], "ours_ms": ours_med, "megatron_ms": meg_med,
            "speedup": (meg_med / ours_med) if meg_med else None,
            "megatron_identical": result["megatron_exact"], "plan_s": result["plan_s"],
            "config": f"{describe_layout(result['config']['src'])} -> "
                      f"{describe_layout(result['config']['dst'])} ({result['config']['mode']})",
            "bytes_local": result["bytes"]["bytes_local"], "bytes_sent": result["bytes"]["bytes_sent"],
            "predicted_ms": result["predicted_ms"], "floor_ms": result["floor_ms"]}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(line))
    return 0 if result["exact"] else 2


if __name__ == "__main__":
    sys.exit(main())
