"""The main job: refit a toy Kimi K2 between two parallel layouts and time it against
megatron-core's own refit, on CPU over gloo (no GPU needed).

    python -m refit_engine.bench                       # 4 ranks, TP2/ETP2 -> TP1
    python -m refit_engine.bench --src tp=2,pp=2 --dst tp=4 --iters 10
    python -m refit_engine.bench --non-collocated --world 4 --src tp=2 --dst tp=2

It spawns --world gloo processes (or runs as one rank under torchrun/srun when RANK is set),
builds source and destination megatron-core models, plans once (warm-up, untimed), runs timed
refits, checks the result bit for bit, times megatron-core's refit on the same models, and
prints the seed's summary. The last line is one JSON object with the key figures.
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

from refit_engine.grid import parse_layout_spec, parse_overrides

DEFAULT_TOY = dict(num_layers=4, hidden=256, num_heads=8, q_lora_rank=64, kv_lora_rank=32,
                   qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, dense_ffn=512,
                   num_experts=16, moe_ffn=128, router_topk=2, shared_expert_ffn=128, vocab=4096)


def model_config(full_size: bool, overrides: dict):
    """Kimi K2 at published sizes (overrides may lower num_layers etc.), or the toy model."""
    from refit_engine.models.kimi_k2 import KimiK2Config
    if full_size:
        return KimiK2Config(**overrides)
    return KimiK2Config.toy(**{**DEFAULT_TOY, **overrides})


def describe_layout(d: dict) -> str:
    return "/".join(f"{k.upper()}{v}" for k, v in d.items() if v > 1 or k == "tp")


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
    from refit_engine.models.megatron_builder import (ParallelLayout, build_kimi_k2,
                                                      build_process_groups)
    from refit_engine.models.megatron_refit import megatron_refit
    from refit_engine.verify import check_exact

    cfg = model_config(args.full_size, args.model)
    device = "cpu"
    if "nccl" in dist.get_backend():
        import torch
        device = f"cuda:{torch.cuda.current_device()}"
    method = "nccl" if device != "cpu" else "gloo"
    src_spec, dst_spec = parse_layout_spec(args.src), parse_layout_spec(args.dst)
    if topo is None:
        topo = measure_here("h100" if device != "cpu" else "cpu", world)
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
    init = "canonical" if device == "cpu" else "megatron"  # canonical init is for toy sizes
    src = build_kimi_k2(cfg, src_layout, src_pgs, device=device, seed=1234, init=init) or None
    dst = build_kimi_k2(cfg, dst_layout, dst_pgs, device=device, seed=4321, init=init) or None
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
    from refit_engine.cost import predict
    from refit_engine.memory import floor, rank_figures
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


def measure_here(preset_name: str, world: int):
    """The topology preset with this job's nodes, its bandwidths measured here (collective)."""
    from refit_engine.topology import measure, preset
    per_node = ranks_per_node(world)
    base = preset(preset_name, world)
    return measure(replace(base, gpus_per_node=per_node, nodes=max(1, world // per_node)))


def init_from_env(backend: str, timeout: float) -> None:
    """init_process_group from torchrun's or srun's environment (RANK / SLURM_PROCID, ...)."""
    import torch
    import torch.distributed as dist
    if "RANK" not in os.environ:  # srun without torchrun: map SLURM's variables
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))
        # NCCL for CUDA tensors (megatron-core's refit), gloo for the small CPU collectives
        # (layout gathering, timing reductions).
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))


def spawn_ranks(target, world: int, *args) -> list:
    """Starts `world` processes (spawn context) running target(rank, world, port, *args), with
    a free local port for their process group."""
    import multiprocessing as mp
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's config chatter
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=args.timeout))
        result = run_rank(rank, world, args)
        dist.destroy_process_group()
        queue.put((rank, result, None))
    except BaseException as exc:
        import traceback
        queue.put((rank, None, traceback.format_exc()))
        raise SystemExit(1) from exc


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
                         f"link {topo['intra_node_gbps']:.1f} GB/s")
        if r.get("megatron_ms"):
            m = r["megatron_ms"]
            lines.append(f"megatron-core refit: mean {statistics.mean(m):.2f} ms "
                         f"(speedup {statistics.median(m) / statistics.median(t):.2f}x)")
        lines.append(f"Bit-exact: {r['exact']}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Refit a toy Kimi K2 on CPU (gloo) and time it "
                                                 "against megatron-core's refit.")
    parser.add_argument("--world", type=int, default=4, help="gloo processes (default 4)")
    parser.add_argument("--src", default="tp=2,etp=2",
                        help="source layout (default tp=2,etp=2: the layouts megatron-core 0.16 can refit)")
    parser.add_argument("--dst", default="tp=1", help="destination layout (default tp=1)")
    parser.add_argument("--non-collocated", action="store_true",
                        help="source on the first half of the ranks, destination on the rest")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up iterations (default 2)")
    parser.add_argument("--bucket-mib", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for any wait")
    parser.add_argument("--no-megatron", action="store_true", help="skip megatron-core's refit")
    parser.add_argument("--model", default="", help="toy size overrides, e.g. hidden=512,num_layers=6")
    parser.add_argument("--json-out", help="also write the full results here")
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"],
                        help="under torchrun/srun: gloo (CPU tensors) or nccl (GPU tensors)")
    parser.add_argument("--full-size", action="store_true",
                        help="published Kimi K2 sizes (--model may still lower num_layers)")
    args = parser.parse_args(argv)
    args.model = parse_overrides(args.model)

    if launched():  # by torchrun / srun: this process is one rank
        init_from_env(args.backend, args.timeout)
        import torch.distributed as dist
        result = run_rank(dist.get_rank(), dist.get_world_size(), args)
        dist.destroy_process_group()
    else:
        import multiprocessing as mp
        queue = mp.get_context("spawn").Queue()
        print(f"[refit-bench] spawning {args.world} gloo processes", flush=True)
        procs = spawn_ranks(_worker, args.world, args, queue)
        result, failures = None, []
        for _ in procs:
            rank, value, error = queue.get(timeout=args.timeout + 600)
            if error:
                failures.append(f"rank {rank}:\n{error}")
            if rank == 0:
                result = value
        for p in procs:
            p.join()
        if failures:
            print("\n".join(failures), file=sys.stderr)
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
