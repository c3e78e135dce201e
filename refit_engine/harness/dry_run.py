"""Memory planner and dry run: will a refit configuration fit, and what will it move?

For a Kimi K2 configuration (source and destination TP / PP / EP / ETP on a number of GPUs,
collocated or not) this builds both layouts and every rank's plan without any GPU, then reports
per GPU: weights of the source and destination models, staging, total against the GPU's
memory; bytes moved locally and over links; and the floor (bytes over bandwidth, the largest
over ranks). A configuration that cannot fit is refused with a message saying by how much.

The transport is the plan's (`--transport`, default auto as the library's): same-node peers
over CUDA IPC need no staging and no pack / unpack passes; NCCL peers keep both. `--transport
nccl` gives the figures of every peer over NCCL.

    python -m refit_engine.memory --src tp=8,ep=64 --dst tp=4,ep=128 --gpus 128 --gpu h100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict

import numpy as np

from refit_engine import dtypes
from refit_engine.compiler import DEFAULT_BUCKET_BYTES, MSG, Planner, RankPlan
from refit_engine.errors import RefitError
from refit_engine.harness.cli import layout_arg, overrides_arg, positive_float, positive_int
from refit_engine.harness.cost import RankFigures, floor, predict, rank_figures
from refit_engine.harness.grid import ParallelGrid, parse_layout_spec
from refit_engine.harness.models.kimi_k2 import (KimiK2Config, kimi_k2_parameters,
                                                 kimi_k2_tables, stage_of)
from refit_engine.harness.topology import (PRESETS, TRANSPORTS, Topology, check_transport,
                                           describe_transport, preset)
from refit_engine.tables import BUFFER, LayoutTables

GIB = 2**30


def _weights_per_rank(tables: LayoutTables, world: int) -> list[int]:
    """Bytes of local tensors per rank, from a side's tables."""
    buffers = tables.buffers
    per_rank = np.bincount(buffers[:, BUFFER["rank"]],
                           weights=buffers[:, BUFFER["numel"]] * buffers[:, BUFFER["itemsize"]],
                           minlength=world)
    return [int(b) for b in per_rank[:world]]


def weights_per_gpu_gib(cfg: KimiK2Config, grid: ParallelGrid) -> float:
    """Largest per-GPU weight bytes of one model, from parameter counts alone (no layout),
    so hopeless configurations are refused in milliseconds."""
    per_stage = [0.0] * grid.pp
    for p in kimi_k2_parameters(cfg):
        n = dtypes.itemsize(p.dtype) * math.prod(p.shape)
        if p.expert is not None:
            n /= grid.ep * grid.etp
        elif p.split:
            n /= grid.tp
        per_stage[stage_of(cfg, grid, p)] += n
    return max(per_stage) / GIB


# Staging allowance before a plan exists: double-buffered send and receive, one bucket per peer,
# for a typical 16 peers (the dry run replaces it with the plan's exact figure).
TYPICAL_PEERS = 16


def staging_allowance(topo: Topology, ranks: int, transport: str, bucket_bytes: int) -> int:
    """Bytes of staging to allow per GPU before a plan exists: none where every peer can be
    IPC (GPUs, one node, transport auto or ipc); otherwise the typical peers' (how many of a
    rank's peers are across nodes is the plan's to say)."""
    if not topo.cpu_ranks and transport != "nccl" and ranks <= topo.gpus_per_node:
        return 0
    return 4 * bucket_bytes * TYPICAL_PEERS


def check_fits(cfg, src: ParallelGrid, dst: ParallelGrid, topo: Topology, collocated: bool,
               headroom: float = 0.9, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
               transport: str = "auto") -> tuple[float, float]:
    """Refuse (RefitError) a configuration whose weights and staging cannot fit, before
    building anything. `headroom`: the fraction of GPU memory they may use; `transport`: the
    plan's (IPC peers need no staging). Returns the largest per-GPU weights of each side, in
    GiB."""
    budget = topo.memory_gib * headroom
    src_gib, dst_gib = weights_per_gpu_gib(cfg, src), weights_per_gpu_gib(cfg, dst)
    ranks = max(src.offset + src.world, dst.offset + dst.world)
    staging_gib = staging_allowance(topo, ranks, transport, bucket_bytes) / GIB
    need = (src_gib + dst_gib if collocated else max(src_gib, dst_gib)) + staging_gib
    if need > budget:
        cpu = topo.cpu_ranks  # CPU ranks over gloo: a memory budget, not a GPU
        unit = "rank" if cpu else "GPU"
        have = (f"CPU ranks (gloo) have {topo.memory_gib:.0f} GiB of memory budget each" if cpu
                else f"{topo.name} GPUs have {topo.memory_gib:.0f} GiB")
        raise RefitError(
            f"does not fit: weights and staging need {need:.1f} GiB per {unit} (source {src_gib:.1f} GiB at "
            f"TP{src.tp}/PP{src.pp}/EP{src.ep}/ETP{src.etp}"
            + (f" + destination {dst_gib:.1f} GiB at TP{dst.tp}/PP{dst.pp}/EP{dst.ep}/ETP{dst.etp}"
               if collocated else "") + f" + staging {staging_gib:.1f} GiB"
            + (" (every peer over CUDA IPC)" if not staging_gib else "")
            + f") but {have} ({budget:.0f} GiB usable "
            f"at {headroom:.0%}); raise EP (experts are 99% of the weights) or TP")
    return src_gib, dst_gib


def staged_peers(transports: dict[int, str]) -> np.ndarray:
    """Peers whose messages go through staging (all but IPC), as an array for np.isin."""
    return np.array([p for p, t in transports.items() if t != "ipc"], dtype=np.int64)


def staged_messages(messages: np.ndarray, peers: np.ndarray) -> np.ndarray:
    return messages[np.isin(messages[:, MSG["peer"]], peers)]


def staging_bytes(plan: RankPlan, transports: dict[int, str]) -> int:
    """Device staging of one rank: two buffers per direction (double-buffered), each as large
    as its largest bucket needs for the staged messages. IPC peers are read in place, so a
    rank whose peers are all IPC has none. With every peer staged this is the plan's own
    send/recv_staging_bytes figure."""
    peers = staged_peers(transports)

    def largest_bucket(messages: np.ndarray) -> int:
        # NOTE: the IPC executor packs the staged messages of a bucket end to end
        # (refit_engine.executors.ipc.without_peers), so a bucket needs their sum.
        rows = staged_messages(messages, peers)
        if not len(rows):
            return 0
        return int(np.bincount(rows[:, MSG["bucket"]], weights=rows[:, MSG["bytes"]]).max())
    return 2 * (largest_bucket(plan.send_messages) + largest_bucket(plan.recv_messages))


def staged_buckets(plan: RankPlan, transports: dict[int, str]) -> int:
    """Buckets the staged messages take (num_buckets where every peer is staged, 0 where none
    is): each carries a message latency in the cost model, IPC reads carry none."""
    peers = staged_peers(transports)
    buckets = [staged_messages(m, peers)[:, MSG["bucket"]]
               for m in (plan.send_messages, plan.recv_messages)]
    return max((int(b.max()) + 1 for b in buckets if len(b)), default=0)


def dry_run(cfg: KimiK2Config, src: ParallelGrid, dst: ParallelGrid, topo: Topology,
            bucket_bytes: int = DEFAULT_BUCKET_BYTES, headroom: float = 0.9,
            transport: str = "auto") -> dict:
    """Every rank's figures (`RankFigures`), the floor and the prediction of a refit whose
    plan takes `transport` (refit_engine.plan's option: auto, nccl, ipc)."""
    check_transport(topo, transport)
    collocated = src.offset == dst.offset
    check_fits(cfg, src, dst, topo, collocated, headroom, bucket_bytes, transport)
    world = max(src.offset + src.world, dst.offset + dst.world)
    # The planner's tables built with NumPy: a Layout of 2048 GPUs would take a minute.
    src_tables, dst_tables = kimi_k2_tables(cfg, src), kimi_k2_tables(cfg, dst)
    plans = Planner(src_tables, dst_tables, bucket_bytes, topo.gpus_per_node).plan_all()
    src_w, dst_w = _weights_per_rank(src_tables, world), _weights_per_rank(dst_tables, world)
    ranks, buckets = [], {}
    for r in range(world):
        p = plans.get(r)
        if p is None:
            ranks.append(RankFigures(r, src_bytes=src_w[r], dst_bytes=dst_w[r]))
            continue
        per_peer = p.bytes_per_peer()
        transports = {peer: topo.peer_transport(r, peer, transport) for peer in per_peer}
        peers = staged_peers(transports)
        messages = sum(len(staged_messages(m, peers)) for m in (p.send_messages, p.recv_messages))
        ranks.append(rank_figures(r, p.bytes_local, per_peer, topo, transports,
                                  src_bytes=src_w[r], dst_bytes=dst_w[r],
                                  staging_bytes=staging_bytes(p, transports), messages=messages))
        buckets[r] = staged_buckets(p, transports)
    return {"ranks": ranks, "floor": floor(ranks, topo), "topology": topo,
            "transport": transport, "predicted": predict(ranks, topo, buckets),
            "fits": max(f.total_bytes for f in ranks) <= topo.memory_gib * headroom * GIB}


def parse_grid(text: str, world: int, offset: int = 0) -> ParallelGrid:
    return ParallelGrid(world, offset=offset, **parse_layout_spec(text))


def report(result: dict) -> str:
    ranks, topo = result["ranks"], result["topology"]
    worst = max(ranks, key=lambda f: f.total_bytes)

    def most(what: str, label: str) -> str:  # the largest figure over ranks, and whose it is
        top = max(ranks, key=lambda f: getattr(f, what))
        return f"{label + ' (rank ' + str(top.rank) + ')':<34}{getattr(top, what) / GIB:>10.2f}"
    fl = result["floor"]
    intra, inter = topo.intra_link, topo.inter_link
    transport = result.get("transport", "nccl")  # results from before IPC: every peer staged
    lines = [
        f"transport {describe_transport(topo, transport)}" + _ipc_refusal(ranks, topo, transport),
        f"{'per GPU (max over ranks)':<34}{'GiB':>10}",
        f"{'source weights':<34}{max(f.src_bytes for f in ranks) / GIB:>10.2f}",
        f"{'destination weights':<34}{max(f.dst_bytes for f in ranks) / GIB:>10.2f}",
        f"{'staging (2 x send + 2 x recv)':<34}{max(f.staging_bytes for f in ranks) / GIB:>10.2f}",
        f"{'total (rank ' + str(worst.rank) + ')':<34}{worst.total_bytes / GIB:>10.2f}"
        f"   of {topo.memory_gib:.0f} GiB: {'fits' if result['fits'] else 'DOES NOT FIT'}",
        f"{'local copy (max)':<34}{max(f.local_bytes for f in ranks) / GIB:>10.2f}",
        most("sent_intra", f"sent over {intra}"), most("received_intra", f"received over {intra}"),
        most("received_ipc", "of which read over IPC"),
        most("sent_inter", f"sent over {inter}"), most("received_inter", f"received over {inter}"),
        f"predicted: {result['predicted']['seconds'] * 1e3:.2f} ms (rank "
        f"{result['predicted']['rank']}, {result['predicted']['term']})",
        f"floor: {fl['seconds'] * 1e3:.2f} ms (rank {fl['rank']}, {fl['term']}) on "
        f"{topo.describe(len(ranks))}: {intra} {topo.intra_node_gbps:g} GB/s, {inter} "
        f"{topo.inter_node_gbps:g} GB/s, copy {topo.copy_gbps:g} GB/s",
    ]
    return "\n".join(lines)


def _ipc_refusal(ranks: list[RankFigures], topo: Topology, transport: str) -> str:
    """What the library says of transport "ipc" on more than one node: it refuses the plan
    (refit_engine.peers.choose_transports); the figures count peers on other nodes over NCCL."""
    if transport != "ipc" or len(ranks) <= topo.gpus_per_node:
        return ""
    return ("\n  (refit_engine.plan(transport=\"ipc\") refuses ranks on more than one node: use "
            "auto; peers on other nodes are counted over NCCL here)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refit_engine.memory",
                                     description="Kimi K2 refit memory planner and dry run")
    parser.add_argument("--src", type=layout_arg, default="tp=8,ep=64",
                        help="source layout (default tp=8,ep=64)")
    parser.add_argument("--dst", type=layout_arg, default="tp=4,ep=128",
                        help="destination layout (default tp=4,ep=128)")
    parser.add_argument("--gpus", type=positive_int, default=128,
                        help="GPUs of each model (default 128)")
    parser.add_argument("--gpu", default="h100", choices=sorted(PRESETS),
                        help="topology preset: memory, bandwidths, GPUs per node (default h100)")
    parser.add_argument("--non-collocated", action="store_true",
                        help="destination on --gpus more GPUs after the source's")
    parser.add_argument("--layers", type=positive_int, default=61,
                        help="Kimi K2 layers (default 61, the published model)")
    parser.add_argument("--model", type=overrides_arg, default={},
                        help="Kimi K2 overrides, e.g. hidden=64,num_experts=8")
    parser.add_argument("--bucket-mib", type=positive_int, default=DEFAULT_BUCKET_BYTES >> 20,
                        help=f"largest message between two ranks in one bucket, MiB (default "
                             f"{DEFAULT_BUCKET_BYTES >> 20})")
    parser.add_argument("--headroom", type=positive_float, default=0.9,
                        help="fraction of GPU memory weights and staging may use (default 0.9)")
    parser.add_argument("--transport", default="auto", choices=TRANSPORTS,
                        help="the plan's transport: auto (the library's default: same-node peers "
                             "over CUDA IPC, other nodes over NCCL), nccl (every peer over NCCL: "
                             "the figures before IPC), ipc (same-node peers over IPC)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--per-rank", action="store_true",
                        help="also print every rank's memory and bytes moved")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.headroom > 1:
        parser.error(f"--headroom is a fraction of GPU memory, at most 1, not {args.headroom}")
    try:
        cfg = KimiK2Config(**{"num_layers": args.layers, **args.model})
    except TypeError as exc:
        parser.error(f"--model: {exc}")
    try:
        src = parse_grid(args.src, args.gpus)
        dst = parse_grid(args.dst, args.gpus, offset=args.gpus if args.non_collocated else 0)
    except RefitError as exc:
        parser.error(f"{exc.reason} (--gpus {args.gpus})")
    total = args.gpus * (2 if args.non_collocated else 1)
    topo = preset(args.gpu, total)
    try:
        check_transport(topo, args.transport)
    except ValueError as exc:
        parser.error(f"--transport: {exc} (--gpu {args.gpu})")
    try:
        result = dry_run(cfg, src, dst, topo, args.bucket_mib << 20, args.headroom,
                         args.transport)
    except RefitError as exc:
        print(f"refused: {exc.reason}", file=sys.stderr)
        if args.json:
            print(json.dumps({"fits": False, "reason": exc.reason}))
        return 2
    if args.json:
        worst = max(result["ranks"], key=lambda f: f.total_bytes)
        print(json.dumps({"fits": result["fits"], "floor_s": result["floor"]["seconds"],
                          "predicted_s": result["predicted"]["seconds"],
                          "max_gpu_gib": worst.total_bytes / GIB,
                          "max_staging_gib": max(f.staging_bytes for f in result["ranks"]) / GIB,
                          "transport": args.transport, "topology": asdict(topo)}))
    else:
        print(f"Kimi K2 ({cfg.num_layers} layers) source {args.src} -> destination {args.dst} "
              f"on {topo.describe(total)} "
              f"({'non-collocated' if args.non_collocated else 'collocated'})")
        print(report(result))
        if args.per_rank:
            print(per_rank_table(result["ranks"], topo))
    return 0 if result["fits"] else 2


def per_rank_table(ranks: list[RankFigures], topo: Topology | None = None) -> str:
    intra = topo.intra_link if topo else "NVLink"
    head = (f"{'rank':>5}{'source GiB':>11}{'dest GiB':>10}{'staging GiB':>12}{'total GiB':>10}"
            f"{'local GiB':>10}{intra[:7] + ' out':>11}{intra[:7] + ' in':>10}{'IPC in':>8}"
            f"{'net out':>9}{'net in':>8}")
    rows = [head]
    for f in ranks:
        rows.append(f"{f.rank:>5}{f.src_bytes / GIB:>11.2f}{f.dst_bytes / GIB:>10.2f}"
                    f"{f.staging_bytes / GIB:>12.2f}{f.total_bytes / GIB:>10.2f}"
                    f"{f.local_bytes / GIB:>10.2f}{f.sent_intra / GIB:>11.2f}"
                    f"{f.received_intra / GIB:>10.2f}{f.received_ipc / GIB:>8.2f}"
                    f"{f.sent_inter / GIB:>9.2f}"
                    f"{f.received_inter / GIB:>8.2f}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
