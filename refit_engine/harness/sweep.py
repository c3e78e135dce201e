"""The Kimi K2 refit sweep: several source -> destination configurations in one job, with the
seed benchmark's outputs (per-configuration logs, summary), a JSON file of every figure and a
plot. Launched by slurm/kimi_k2.sh (srun, one process per GPU) or torchrun; on a machine
without a launcher it spawns --world gloo processes itself.

    python -m refit_engine.sweep --configs "8:4:collocated:nccl 8:2:collocated:nccl" --full-size

A configuration is SRC_TP:DST_TP[:MODE[:METHOD]]; EP / ETP / PP come from --src-extra /
--dst-extra (e.g. "ep=64"); where one is not given, an expert-parallel size is chosen so both
models fit: source EP the smallest that fits beside the destination's smallest footprint (EP
as large as the expert count and GPU count allow), destination EP the layout advisor's
fastest that fits beside the source (harness/advisor.py: the dry run of every rank's plan).
`--check-only` checks the same layouts the sweep would run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from math import gcd
from pathlib import Path

import torch.distributed as dist

from refit_engine.errors import RefitError
from refit_engine.harness import launch, main_job, spawn
from refit_engine.harness.advisor import best_expert_parallel
from refit_engine.harness.cli import env_flag, non_negative_int, positive_float, positive_int
from refit_engine.harness.config import RunConfig, model_config
from refit_engine.harness.dry_run import check_fits, parse_grid
from refit_engine.harness.grid import ParallelGrid, parse_layout_spec, parse_overrides
from refit_engine.harness.logs import LOGGER, configure, log_file
from refit_engine.harness.summary import summary_text
from refit_engine.harness.topology import PRESETS, measure_here, preset


def parse_configs(text: str) -> list[dict]:
    """"8:4 4:2:non-collocated:nccl" -> configurations; ValueError saying what is wrong."""
    out = []
    for item in text.replace(",", " ").split():
        parts = item.split(":")
        if not 2 <= len(parts) <= 4 or not all(p.isdigit() and int(p) > 0 for p in parts[:2]):
            raise ValueError(f"bad configuration '{item}': SRC_TP:DST_TP[:MODE[:METHOD]] with "
                             "positive TP sizes")
        mode = parts[2] if len(parts) > 2 else "collocated"
        if mode not in ("collocated", "non-collocated", "noncollocated"):
            raise ValueError(f"bad mode '{mode}' in '{item}' (collocated, non-collocated)")
        method = parts[3] if len(parts) > 3 else None
        if method not in (None, "nccl", "gloo"):
            raise ValueError(f"bad method '{method}' in '{item}' (nccl, gloo)")
        out.append({"src_tp": int(parts[0]), "dst_tp": int(parts[1]),
                    "mode": "non-collocated" if mode.startswith("non") else "collocated",
                    "method": method})
    if not out:
        raise ValueError("no configuration given")
    return out


def _side(world: int, src_tp: int, dst_tp: int, collocated: bool) -> int:
    """Ranks of each model; RefitError where a TP does not divide them (no EP helps then)."""
    side = world // 2 if not collocated else world
    where = f"{side} ranks" + ("" if collocated else " (half of the world, non-collocated)")
    for name, tp in (("source", src_tp), ("destination", dst_tp)):
        if tp < 1 or side % tp:  # no EP helps: say so, not "does not fit"
            raise RefitError(f"{name} TP {tp} does not divide {where}")
    return side


def choose_source_ep(cfg, world: int, src_tp: int, dst_tp: int, collocated: bool,
                     topo_name: str) -> int:
    """The smallest source EP that fits beside the destination's smallest footprint (EP as
    large as the expert count and GPU count allow)."""
    side = _side(world, src_tp, dst_tp, collocated)
    cap = gcd(cfg.num_experts, side)
    divisors = [d for d in range(1, cap + 1) if cap % d == 0]
    topo = preset(topo_name, world)
    last = None
    for src_ep in divisors:
        try:
            check_fits(cfg, ParallelGrid(side, tp=src_tp, ep=src_ep),
                       ParallelGrid(side, tp=dst_tp, ep=divisors[-1],
                                    offset=0 if collocated else side), topo, collocated)
            return src_ep
        except RefitError as exc:
            last = exc
    raise RefitError(f"no expert-parallel size lets TP{src_tp} -> TP{dst_tp} fit on "
                     f"{topo.describe(world)} (with source EP{divisors[-1]}: {last.reason})")


def choose_destination_ep(cfg, world: int, src: ParallelGrid, dst_tp: int, collocated: bool,
                          topo_name: str) -> int:
    """The layout advisor's fastest destination EP that fits beside `src` (ETP 1, PP 1, no
    aliasing: what the sweep runs), by the dry run of every rank's plan on the preset; where
    none fits, the largest EP (the smallest footprint), whose memory check then says why."""
    side = _side(world, src.tp, dst_tp, collocated)
    best = best_expert_parallel(cfg, src, dst_tp, preset(topo_name, world), collocated)
    return best.ep if best else max(d for d in range(1, side + 1)
                                    if side % d == 0 and cfg.num_experts % d == 0)


def choose_expert_parallel(cfg, world: int, src_tp: int, dst_tp: int, collocated: bool,
                           topo_name: str) -> tuple[int, int]:
    """(source EP, destination EP) so that both models fit: the source takes the smallest EP
    that fits beside the destination's smallest footprint, the destination the advisor's
    fastest that fits beside that source."""
    side = _side(world, src_tp, dst_tp, collocated)
    src_ep = choose_source_ep(cfg, world, src_tp, dst_tp, collocated, topo_name)
    return src_ep, choose_destination_ep(cfg, world, ParallelGrid(side, tp=src_tp, ep=src_ep),
                                         dst_tp, collocated, topo_name)


def plot(results: list[dict], path: Path) -> Path | None:
    """Bar chart: median refit time per configuration, its floor beside it."""
    try:  # matplotlib is optional: without it the sweep draws no plot
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[sweep] matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    ok = [r for r in results if not r.get("error")]
    if not ok:
        print("[sweep] no configuration ran: no plot")
        return None
    labels = [f"TP{r['config']['src']['tp']}->TP{r['config']['dst']['tp']}\n{r['config']['mode']}"
              for r in ok]
    times = [statistics.median(r["ours_ms"]) for r in ok]
    floors = [r.get("floor_ms") or 0.0 for r in ok]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(ok)), 4))
    xs = range(len(ok))
    ax.bar([x - 0.2 for x in xs], times, width=0.4, label="refit_engine (median)")
    ax.bar([x + 0.2 for x in xs], floors, width=0.4, label="floor (bytes / bandwidth)")
    if any(r.get("megatron_ms") for r in ok):
        ax.scatter(list(xs), [statistics.median(r["megatron_ms"]) if r.get("megatron_ms")
                              else float("nan") for r in ok], color="k", marker="x",
                   label="megatron-core (median)", zorder=3)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("refit time (ms)")
    ax.set_title("Kimi K2 refit")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refit_engine.sweep",
                                     description="Kimi K2 refit sweep")
    parser.add_argument("--configs", default=os.environ.get(
        "CONFIGS", "8:4:collocated 8:2:collocated 8:1:collocated 4:2:collocated 4:1:collocated"),
        help="SRC_TP:DST_TP[:MODE[:METHOD]] list, MODE collocated or non-collocated, METHOD "
             "the backend (default: the sweep's) (env CONFIGS)")
    parser.add_argument("--backend", default=os.environ.get("BACKEND") or "auto",
                        choices=["auto", "nccl", "gloo"],
                        help="auto (default): nccl with one GPU per rank when this node has a GPU "
                             "for every rank, else gloo with every tensor on CPU, as the main "
                             "job decides; nccl or gloo to insist (env BACKEND)")
    parser.add_argument("--world", type=positive_int, default=4,
                        help="processes to spawn without a launcher (default 4)")
    parser.add_argument("--iters", type=positive_int,
                        default=int(os.environ.get("NUM_ITERATIONS", 5)),
                        help="timed refits per configuration (env NUM_ITERATIONS, default 5)")
    parser.add_argument("--warmup", type=non_negative_int,
                        default=int(os.environ.get("NUM_WARMUP", 2)),
                        help="untimed refits first, after planning (env NUM_WARMUP, default 2)")
    parser.add_argument("--full-size", action=argparse.BooleanOptionalAction,
                        default=env_flag("FULL_SIZE"),
                        help="published Kimi K2 sizes (env FULL_SIZE=1); --no-full-size: toy "
                             "sizes. Unsaid: toy sizes for a run, full size for --check-only")
    parser.add_argument("--model", default=os.environ.get("MODEL_OVERRIDES", ""),
                        help="Kimi K2 overrides, e.g. num_layers=8 (toy sizes without --full-size)")
    parser.add_argument("--src-extra", default=os.environ.get("SRC_EXTRA", ""),
                        help="extra source layout, e.g. ep=64,etp=1,pp=1 (default: auto EP)")
    parser.add_argument("--dst-extra", default=os.environ.get("DST_EXTRA", ""),
                        help="extra destination layout, e.g. ep=128 (default: auto EP)")
    parser.add_argument("--gpu", default=os.environ.get("GPU_KIND", "h100"), choices=sorted(PRESETS),
                        help="topology preset for floors and memory checks: h100, h200, cpu "
                             "(env GPU_KIND)")
    parser.add_argument("--output-dir", default=os.environ.get(
        "OUTPUT_DIR", "benchmark_results/kimi_k2"),
        help="results go to OUTPUT_DIR/logs (env OUTPUT_DIR)")
    parser.add_argument("--run-id", default=os.environ.get("RUN_ID") or os.environ.get(
        "SLURM_JOB_ID") or time.strftime("%Y%m%d_%H%M%S"),
        help="prefix of the result files (env RUN_ID, else the Slurm job id, else the time)")
    parser.add_argument("--compare-megatron", action="store_true",
                        default=os.environ.get("COMPARE_MEGATRON", "0") == "1",
                        help="also time megatron-core's refit where it can do the layout "
                             "(env COMPARE_MEGATRON=1)")
    parser.add_argument("--bucket-mib", type=positive_int,
                        default=int(os.environ.get("BUCKET_MIB", 64)),
                        help="largest message between two ranks in one bucket, MiB "
                             "(env BUCKET_MIB, default 64)")
    parser.add_argument("--timeout", type=positive_float,
                        default=float(os.environ.get("TIMEOUT_S", 600)),
                        help="seconds for any wait (env TIMEOUT_S, default 600)")
    parser.add_argument("--check-only", action="store_true",
                        help="memory check of every configuration on --gpus GPUs, no GPUs used "
                             "(full-size Kimi K2 unless --no-full-size / FULL_SIZE=0)")
    parser.add_argument("--gpus", type=non_negative_int,
                        default=int(os.environ.get("TOTAL_GPUS", 0)),
                        help="GPU count for --check-only (env TOTAL_GPUS; default --world)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.full_size is None:  # the GPUs' question is whether the real model fits
        args.full_size = args.check_only
    args.model_overrides = parse_overrides(args.model)
    try:
        configs = parse_configs(args.configs)
    except ValueError as exc:
        parser.error(f"--configs: {exc}")
    if args.check_only:
        return check_only(args, configs)
    if not launch.launched():  # before any process starts: where, and one error if it cannot
        try:
            args.backend, why = launch.decide_backend(args.backend, args.world)
        except ValueError as exc:
            parser.error(str(exc))
        check_methods(parser, configs, args.backend)
        print(f"[sweep] spawning {args.world} {args.backend} processes, "
              f"{launch.where_text(args.backend)}: {why}", flush=True)
        return _spawn(args)
    first = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0
    try:  # agreed by every rank before any process group (launch.agree_launched)
        args.backend, why, store = launch.agree_launched(args.backend, args.timeout)
    except ValueError as exc:  # the same refusal on every rank; rank 0 says it
        if first:
            parser.error(str(exc))
        return 2
    if any(c["method"] not in (None, args.backend) for c in configs):  # the same on every rank
        if first:
            check_methods(parser, configs, args.backend)
        return 2
    launch.init_from_env(args.backend, args.timeout, store=store)
    rank, world = dist.get_rank(), dist.get_world_size()
    configure(rank).info(f"{world} {args.backend} ranks, {launch.where_text(args.backend)}: {why}")
    return run_sweep(rank, world, args, configs)


def check_methods(parser, configs: list[dict], backend: str) -> None:
    """A configuration's METHOD, where given, is the backend the sweep runs (one error,
    exit 2, otherwise: its results would be labelled with a backend they did not use)."""
    for c in configs:
        if c["method"] not in (None, backend):
            parser.error(f"--configs: TP{c['src_tp']} -> TP{c['dst_tp']} asks for "
                         f"{c['method']} but the sweep runs {backend} (--backend / BACKEND)")


def check_only(args, configs) -> int:
    """Before any job step: every configuration must fit (weights + staging on the GPU)."""
    if args.backend == "gloo":  # auto: the GPUs' question, whatever this host has
        print("[sweep] memory check skipped: CPU backend")
        return 0
    cfg = model_config(args.full_size, args.model_overrides)
    gpus = args.gpus or args.world
    topo = preset(args.gpu, gpus)
    print(f"[sweep] memory check: Kimi K2 at {'full' if args.full_size else 'toy'} size "
          f"({cfg.num_layers} layers, hidden {cfg.hidden}, {cfg.num_experts} experts) on "
          f"{topo.describe(gpus)}, {topo.memory_gib:.0f} GiB each")
    failed = 0
    for c in configs:
        collocated = c["mode"] == "collocated"
        side = gpus if collocated else gpus // 2
        try:
            src_extra, dst_extra = layout_extras(cfg, c, args, gpus)
            src = parse_grid_extra(c["src_tp"], src_extra, side, 0)
            dst = parse_grid_extra(c["dst_tp"], dst_extra, side, 0 if collocated else side)
            s_gib, d_gib = check_fits(cfg, src, dst, topo, collocated)
            print(f"[sweep] TP{c['src_tp']}/EP{src.ep} -> TP{c['dst_tp']}/EP{dst.ep} "
                  f"({c['mode']}): weights {s_gib:.1f} + {d_gib:.1f} GiB per GPU of "
                  f"{topo.memory_gib:.0f}: fits")
        except RefitError as exc:
            failed += 1
            print(f"[sweep] TP{c['src_tp']} -> TP{c['dst_tp']} ({c['mode']}) refused: "
                  f"{exc.reason}")
    return 2 if failed else 0


def layout_extras(cfg, c: dict, args, world: int) -> tuple[str, str]:
    """The EP / ETP / PP parts of configuration `c`'s two layouts: --src-extra / --dst-extra
    where given, otherwise an expert-parallel size chosen so both models fit (the
    destination's: the layout advisor's fastest beside the source)."""
    src_extra, dst_extra = args.src_extra, args.dst_extra
    collocated = c["mode"] == "collocated"
    src_tp, dst_tp = c["src_tp"], c["dst_tp"]
    if not src_extra:
        src_extra = f"ep={choose_source_ep(cfg, world, src_tp, dst_tp, collocated, args.gpu)}"
    if not dst_extra:
        src = parse_grid_extra(src_tp, src_extra, _side(world, src_tp, dst_tp, collocated), 0)
        dst_extra = f"ep={choose_destination_ep(cfg, world, src, dst_tp, collocated, args.gpu)}"
    return src_extra, dst_extra


def parse_grid_extra(tp: int, extra: str, world: int, offset: int):
    return parse_grid(f"tp={tp},{extra}", world, offset)


def run_sweep(rank: int, world: int, args, configs: list[dict]) -> int:
    logs = Path(args.output_dir) / "logs"
    if rank == 0:
        logs.mkdir(parents=True, exist_ok=True)
    gpus_per_node = launch.ranks_per_node(world)
    nodes = os.environ.get("SLURM_JOB_NUM_NODES", str(max(1, world // max(1, gpus_per_node))))
    cfg = model_config(args.full_size, args.model_overrides)
    # The links and copies of this machine, for floors and predictions.
    # (--gpu is the preset of the memory checks; this is the device the ranks run on.)
    topo = measure_here(launch.rank_device(), world)
    LOGGER.info(f"measured: copy {topo.copy_gbps:.0f} GB/s, same-node link "
                f"{topo.intra_node_gbps:.1f} GB/s, cross-node link {topo.inter_node_gbps:.1f} "
                "GB/s" + (" (preset: one node)" if world <= gpus_per_node else ""))
    results = []
    for i, c in enumerate(configs):
        method = args.backend  # check_methods: a configuration's METHOD is the backend
        name = f"{args.run_id}_tp{c['src_tp']}_to_tp{c['dst_tp']}_{c['mode']}_{method}"
        with log_file(logs / f"{name}.log" if rank == 0 else None):
            LOGGER.info(f"configuration {i + 1}/{len(configs)}: TP {c['src_tp']} -> TP "
                        f"{c['dst_tp']} ({c['mode']}, {method})")
            try:
                src_extra, dst_extra = layout_extras(cfg, c, args, world)
                config = RunConfig(
                    src=parse_layout_spec(f"tp={c['src_tp']},{src_extra}"),
                    dst=parse_layout_spec(f"tp={c['dst_tp']},{dst_extra}"),
                    non_collocated=c["mode"] != "collocated", iters=args.iters,
                    warmup=args.warmup, bucket_mib=args.bucket_mib,
                    megatron=args.compare_megatron, model=args.model_overrides,
                    full_size=args.full_size)
                result = main_job.run_rank(rank, world, config, topo)
            except RefitError as exc:  # e.g. does not fit: report and go on with the next one
                LOGGER.info(f"skipped: {exc.reason}")
                result = {"config": {"src": {"tp": c["src_tp"]}, "dst": {"tp": c["dst_tp"]},
                                     "mode": c["mode"], "method": method, "world": world},
                          "error": exc.reason}
        if rank == 0:
            results.append(result)
    code = write_outputs(args, results, logs, nodes, world, topo) if rank == 0 else 0
    # Every rank waits for rank 0's outputs, then all tear down together: a rank leaving early
    # let a failure in its exit (seen once: gloo threads at interpreter exit) make srun's
    # --kill-on-bad-exit stop rank 0 before it had written the plot.
    dist.barrier()
    dist.destroy_process_group()
    return code


def write_outputs(args, results: list[dict], logs: Path, nodes, world: int, topo) -> int:
    """Rank 0: summary, JSON and plot of the sweep; 0 if some configuration ran and every one
    that ran was exact."""
    summary = logs / f"{args.run_id}_summary.txt"
    summary.write_text(summary_text(args.run_id, results, nodes, world, args.backend) + "\n")
    (logs / f"{args.run_id}_results.json").write_text(json.dumps(
        {"run_id": args.run_id, "world": world, "nodes": nodes, "backend": args.backend,
         "topology": topo.__dict__, "results": results}, indent=1, default=str))
    png = plot(results, logs / f"{args.run_id}_refit_times.png")
    print(summary.read_text())
    print(f"[sweep] summary {summary}; figures {logs / (args.run_id + '_results.json')}"
          + (f"; plot {png}" if png else ""))
    ran = [r for r in results if not r.get("error")]  # skipped ones: refused with the reason
    return 0 if ran and all(r["exact"] for r in ran) else 2


def _spawn(args) -> int:
    """Without a launcher: --world ranks on this machine; the largest exit code of their
    sweeps, 1 where a rank failed (every failed rank's traceback on stderr)."""
    values, failures = spawn.run_ranks(
        _spawned, args.world, args, env=spawn.GLOO_ENV if args.backend == "gloo" else None)
    if failures:
        print(spawn.failure_report(failures), file=sys.stderr)
        return 1
    return max(values.values())


def _spawned(rank, world, args) -> int:
    """One spawned rank of the sweep (spawn.run_ranks set its environment)."""
    warnings.filterwarnings("ignore", category=UserWarning)
    configure(rank)
    launch.init_from_env(args.backend, args.timeout)
    return run_sweep(rank, world, args, parse_configs(args.configs))


if __name__ == "__main__":
    sys.exit(main())
