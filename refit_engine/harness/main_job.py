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
import itertools
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import fields

import torch
import torch.distributed as dist

import refit_engine
from refit_engine.errors import RefitError
from refit_engine.harness import launch, spawn
from refit_engine.harness.cli import (layout_arg, non_negative_int, overrides_arg, positive_float,
                                      positive_int)
from refit_engine.harness.config import RunConfig, check_layouts
from refit_engine.harness.cost import floor, predict, rank_figures
from refit_engine.harness.grid import ParallelGrid, parse_layout_spec
from refit_engine.harness.logs import LOGGER, configure
from refit_engine.harness.models.kimi_k2 import KimiK2Config
from refit_engine.harness.summary import describe_layout, key_figures, summary_text
from refit_engine.harness.timing import slowest, timed_collective
from refit_engine.harness.topology import measure_here
from refit_engine.verify import check_exact


def place_on(chunks, device: str) -> None:
    """Every parameter and buffer of `chunks` on `device`. Where CUDA is available
    megatron-core creates some tensors on the current GPU whatever the model's device (the
    router's expert_bias, rotary buffers) and the builder moves models to CPU only from CUDA;
    a refit needs one device per rank."""
    want = torch.device(device)
    for chunk in chunks:
        chunk.to(want)
    strays = [f"{name} ({t.device})" for chunk in chunks for name, t in
              itertools.chain(chunk.named_parameters(), chunk.named_buffers())
              if t.device != want]
    if strays:
        raise RefitError(f"{len(strays)} tensors are not on {want} after moving the model: "
                         f"{strays[:3]}")


def _poison(chunks) -> None:
    for chunk in chunks:
        for tensor in list(chunk.parameters()) + list(chunk.buffers()):
            tensor.data.view(torch.uint8).fill_(0xA5)


def run_rank(rank: int, world: int, config: RunConfig, topo=None) -> dict | None:
    """One configuration on this rank (collective). `topo`: the measured topology for the
    floor and the prediction (measured here when not given). Rank 0 returns the figures."""
    # megatron-core is optional for the package (the dry run, the parsers and the checks run
    # without it); only building and refitting the models here needs it.
    from refit_engine.harness.baselines.megatron_refit import megatron_refit
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups

    cfg = config.model_config()
    device = launch.rank_device()
    method = "nccl" if device != "cpu" else "gloo"
    src_spec, dst_spec = config.src, config.dst
    check_layouts(cfg, src_spec, dst_spec, world, config.non_collocated)  # the same on every rank
    if topo is None:
        topo = measure_here(device, world)
    side = world // 2 if config.non_collocated else world
    src_grid = ParallelGrid(side, **src_spec)
    dst_grid = ParallelGrid(side, **dst_spec, offset=world - side)
    src_ranks, dst_ranks = src_grid.ranks, dst_grid.ranks
    mode = config.mode

    def log(message: str) -> None:  # progress lines: rank 0's (logs.configure)
        LOGGER.info(message)

    log(f"building process groups: source {describe_layout(src_spec)} on ranks "
        f"{src_ranks[0]}-{src_ranks[-1]}, destination {describe_layout(dst_spec)} on ranks "
        f"{dst_ranks[0]}-{dst_ranks[-1]} ({mode})")
    src_pgs = build_process_groups(src_grid)
    dst_pgs = build_process_groups(dst_grid)
    log(f"building Kimi K2 models on {device} ({cfg.num_layers} layers, hidden "
        f"{cfg.hidden}, {cfg.num_experts} experts)")
    # Canonical init (every expert distinct, so misrouted experts show) draws every full tensor
    # on every holder: toy sizes only.
    init = "megatron" if config.full_size else "canonical"
    src = build_kimi_k2(cfg, src_grid, src_pgs, device=device, seed=1234, init=init) or None
    dst = build_kimi_k2(cfg, dst_grid, dst_pgs, device=device, seed=4321, init=init) or None
    for chunks in (src, dst):
        place_on(chunks or [], device)
    if dst:
        _poison(dst)

    def timed(fn, label: str) -> list[float]:
        return timed_collective(fn, config.iters, each=lambda i, ms: log(
            f"{label} iteration {i + 1}/{config.iters}: {ms:.2f} ms"))

    log("warm-up: planning (gathers layouts once; excluded from timing)")
    t0 = time.perf_counter()
    plan = refit_engine.plan(src, dst, bucket_bytes=config.bucket_mib << 20)
    plan_s = slowest(time.perf_counter() - t0)
    for _ in range(config.warmup):
        refit_engine.execute(plan)
    ours = timed(lambda: refit_engine.execute(plan), "refit_engine")
    ours_graph = None
    if device != "cpu":  # the same refit captured once as a CUDA graph, then replayed
        refit_engine.execute(plan, graph=True)
        ours_graph = timed(lambda: refit_engine.execute(plan, graph=True),
                           "refit_engine (CUDA graph)")
    if config.full_size:
        # Full size: per-piece checksums of sent vs landed bytes (gathering the model is out).
        try:
            refit_engine.execute(plan, verify=True)
            wrong = []
        except refit_engine.RefitError as exc:
            wrong = [exc.tensor]
    else:
        wrong = check_exact(plan)
    exact = slowest(float(bool(wrong))) == 0.0
    log(f"bit-exact against the source weights: {exact}"
        + (f" (rank {rank} differs in {wrong[:3]})" if wrong else ""))

    megatron = None
    if config.megatron:
        if dst:
            _poison(dst)
        log(f"megatron-core refit ({method}): warm-up (builds its plan)")
        try:
            for _ in range(max(1, config.warmup)):
                megatron_refit(src, dst, src_pgs, dst_pgs, method=method)
            megatron = timed(lambda: megatron_refit(src, dst, src_pgs, dst_pgs, method=method),
                             "megatron-core")
            # Ours was exact, so this compares megatron-core's result with ours. megatron-core
            # 0.16 moves parameters only: persistent buffers (router.expert_bias) stay behind.
            buffers = {name for chunk in dst or [] for name, _ in chunk.named_buffers()}
            differ = [] if config.full_size else \
                [k for k in check_exact(plan) if k not in buffers]
            megatron_exact = slowest(float(bool(differ))) == 0.0
            log(f"megatron-core result identical to ours on every parameter: {megatron_exact}"
                + (f" (rank 0 differs in {len(differ)} tensors, e.g. {differ[:3]})"
                   if differ else ""))
        except Exception as exc:  # report, keep our figures
            log(f"megatron-core refit failed: {type(exc).__name__}: {exc}")
            megatron, megatron_exact = None, False

    per_rank = [None] * world
    dist.all_gather_object(per_rank, plan.traffic)  # what every refit of the plan moves
    if rank != 0:
        return None
    total = {k: sum(s[k] for s in per_rank) for k in ("bytes_local", "bytes_sent")}
    figs = [rank_figures(s["rank"], s["bytes_local"], s["per_peer"], topo) for s in per_rank]
    fl = floor(figs, topo)
    pred = predict(figs, topo, {s["rank"]: s["buckets"] for s in per_rank})
    med = statistics.median(ours)
    log(f"median {med:.2f} ms; predicted {pred['seconds'] * 1e3:.2f} ms "
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


def rank_main(rank: int, world: int, config: RunConfig, backend: str, timeout: float):
    """One spawned rank of the main job (spawn.run_ranks set its environment): rank 0's
    figures, None on the others."""
    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's config chatter
    configure(rank)
    launch.init_from_env(backend, timeout)  # nccl: cuda:rank for this rank
    result = run_rank(rank, world, config)
    dist.destroy_process_group()
    return result


def run_config(args) -> RunConfig:
    """The configuration the main job's command line asks for."""
    return RunConfig(src=parse_layout_spec(args.src), dst=parse_layout_spec(args.dst),
                     non_collocated=args.non_collocated, iters=args.iters, warmup=args.warmup,
                     bucket_mib=args.bucket_mib, megatron=not args.no_megatron,
                     model=args.model, full_size=args.full_size)


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


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", args.world))) \
        if launch.launched() else args.world
    config = run_config(args)
    try:  # before any process starts: one clear error
        check_layouts(config.model_config(), config.src, config.dst, world, config.non_collocated)
    except TypeError:  # an unknown --model field
        known = [f.name for f in fields(KimiK2Config)]
        parser.error(f"--model: unknown field(s) {sorted(set(args.model) - set(known))} "
                     f"(known: {', '.join(known)})")
    except RefitError as exc:
        parser.error(exc.reason)
    if launch.launched():  # by torchrun / srun: this process is one rank
        first = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
        try:  # agreed by every rank (a node with fewer GPUs makes every rank use gloo)
            args.backend, why = launch.init_launched(args.backend, args.timeout)
        except ValueError as exc:  # the same refusal on every rank; rank 0 says it
            if first:
                parser.error(str(exc))
            return 2
        if first:
            print(f"[refit-bench] {world} {args.backend} ranks, "
                  f"{launch.where_text(args.backend)}: {why}", flush=True)
        configure(dist.get_rank())
        result = run_rank(dist.get_rank(), dist.get_world_size(), config)
        dist.destroy_process_group()
    else:
        try:
            args.backend, why = launch.decide_backend(args.backend, world)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"[refit-bench] spawning {args.world} {args.backend} processes, "
              f"{launch.where_text(args.backend)}: {why}", flush=True)
        values, failures = spawn.run_ranks(
            rank_main, args.world, config, args.backend, args.timeout,
            env=spawn.GLOO_ENV if args.backend == "gloo" else None, timeout=args.timeout + 600)
        result = values.get(0)
        if failures:
            print(spawn.failure_report(failures), file=sys.stderr)
            return 1
    if result is None:
        return 0
    print()
    print(summary_text(os.environ.get("SLURM_JOB_ID", "local"), [result],
                       os.environ.get("SLURM_JOB_NUM_NODES", "1"), result["config"]["world"],
                       result["config"]["method"]))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(key_figures(result)))
    return 0 if result["exact"] else 2


if __name__ == "__main__":
    sys.exit(main())
