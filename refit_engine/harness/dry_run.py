"""Memory planner and dry run: will a refit configuration fit, and what will it move?

For a Kimi K2 configuration (source and destination TP / PP / EP / ETP on a number of GPUs,
collocated or not) this builds both layouts and every rank's plan without any GPU, then reports
per GPU: weights of the source and destination models, staging, total against the GPU's
memory; bytes moved locally and over links; and the floor (bytes over bandwidth, the largest
over ranks). A configuration that cannot fit is refused with a message saying by how much.

The transport is the plan's (`--transport`, default auto as the library's): same-node peers
over CUDA IPC need no staging and no pack / unpack passes; NCCL peers keep both. `--transport
nccl` gives the figures of every peer over NCCL.

Aliasing (`--alias`, `plan(..., alias=True)`; collocated only): a destination local tensor the
plan fills byte for byte from one source local tensor of the same rank shares its storage
(refit_engine.aliasing.aliasable_buffers on each rank's plan). Its bytes are counted once in
memory and never copied: they leave the local copies, the traffic and the prediction.

    python -m refit_engine.memory --src tp=8,ep=64 --dst tp=4,ep=128 --gpus 128 --gpu h100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from typing import NamedTuple

import numpy as np

from refit_engine import _core, dtypes
from refit_engine.aliasing import aliasable_buffers, without_buffers
from refit_engine.compiler import DEFAULT_BUCKET_BYTES, MSG, Planner, RankPlan
from refit_engine.errors import RefitError
from refit_engine.harness.cli import layout_arg, overrides_arg, positive_float, positive_int
from refit_engine.harness.cost import RankFigures, floor, predict, rank_figures
from refit_engine.harness.grid import ParallelGrid, parse_layout_spec
from refit_engine.harness.models.kimi_k2 import (KimiK2Config, kimi_k2_parameters,
                                                 kimi_k2_tables, stage_of)
from refit_engine.harness.topology import (PRESETS, TRANSPORTS, Topology, check_transport,
                                           describe_transport, preset)
from refit_engine.tables import BUFFER, PIECE, TENSOR, LayoutTables

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


def memory_need(cfg, src: ParallelGrid, dst: ParallelGrid, topo: Topology, collocated: bool,
                bucket_bytes: int = DEFAULT_BUCKET_BYTES, transport: str = "auto",
                alias: bool = False) -> dict:
    """GiB per GPU before building anything: the largest weights of each side, the staging
    allowance, and `need`, what the busiest GPU needs at least. With aliasing (collocated only)
    a rank can share at most the smaller of its two models, so `shared` is that bound and
    `need` the larger side plus staging; the dry run replaces it with the plan's exact
    figure."""
    src_gib, dst_gib = weights_per_gpu_gib(cfg, src), weights_per_gpu_gib(cfg, dst)
    ranks = max(src.offset + src.world, dst.offset + dst.world)
    staging_gib = staging_allowance(topo, ranks, transport, bucket_bytes) / GIB
    shared = min(src_gib, dst_gib) if alias and collocated else 0.0
    weights = src_gib + dst_gib - shared if collocated else max(src_gib, dst_gib)
    return {"src": src_gib, "dst": dst_gib, "staging": staging_gib, "shared": shared,
            "need": weights + staging_gib}


def check_fits(cfg, src: ParallelGrid, dst: ParallelGrid, topo: Topology, collocated: bool,
               headroom: float = 0.9, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
               transport: str = "auto", alias: bool = False) -> tuple[float, float]:
    """Refuse (RefitError) a configuration whose weights and staging cannot fit, before
    building anything. `headroom`: the fraction of GPU memory they may use; `transport`: the
    plan's (IPC peers need no staging); `alias`: aliased bytes counted once (`memory_need`:
    the smaller model at most, before the plan says exactly). Returns the largest per-GPU
    weights of each side, in GiB."""
    budget = topo.memory_gib * headroom
    m = memory_need(cfg, src, dst, topo, collocated, bucket_bytes, transport, alias)
    src_gib, dst_gib, staging_gib, need = m["src"], m["dst"], m["staging"], m["need"]
    if need > budget:
        cpu = topo.cpu_ranks  # CPU ranks over gloo: a memory budget, not a GPU
        unit = "rank" if cpu else "GPU"
        have = (f"CPU ranks (gloo) have {topo.memory_gib:.0f} GiB of memory budget each" if cpu
                else f"{topo.name} GPUs have {topo.memory_gib:.0f} GiB")
        raise RefitError(
            f"does not fit: weights and staging need {need:.1f} GiB per {unit} (source {src_gib:.1f} GiB at "
            f"TP{src.tp}/PP{src.pp}/EP{src.ep}/ETP{src.etp}"
            + (f" + destination {dst_gib:.1f} GiB at TP{dst.tp}/PP{dst.pp}/EP{dst.ep}/ETP{dst.etp}"
               if collocated else "")
            + (f" - at most {m['shared']:.1f} GiB aliased (the smaller side)" if m["shared"]
               else "") + f" + staging {staging_gib:.1f} GiB"
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


class TableBuffers:
    """One side's local tensors as `aliasing.aliasable_buffers` reads a Layout's (`.buffers[i]`
    with dtype, numel and shape), from the planner's tables: the dry run has no Layout (one of
    2048 ranks takes a minute to build). The tables hold no local shapes, so a local tensor is
    seen flat: for kimi_k2_tables that loses nothing, since each local tensor holds one box of
    one tensor, and the same tensor's box filled at the same offsets, as many elements of the
    same dtype, is the same local shape."""

    def __init__(self, tables: LayoutTables):
        pieces, count = tables.pieces, tables.pieces[:, PIECE["holders_count"]]
        # Holder slot of every (piece, holder) pair, piece by piece: first + 0, 1, ...
        starts = np.repeat(pieces[:, PIECE["holders_first"]] - (np.cumsum(count) - count), count)
        slots = starts + np.arange(int(count.sum()))
        self._codes = np.full(len(tables.buffers), -1, dtype=np.int64)
        self._codes[tables.holders[slots]] = tables.tensors[
            np.repeat(pieces[:, PIECE["tensor"]], count), TENSOR["dtype_code"]]
        self._numel = tables.buffers[:, BUFFER["numel"]]
        self.buffers = self

    def __len__(self) -> int:
        return len(self._numel)

    def __getitem__(self, i: int) -> _FlatBuffer:
        numel = int(self._numel[i])
        return _FlatBuffer(_core.DTYPE_NAMES[int(self._codes[i])], numel, (numel,))


class _FlatBuffer(NamedTuple):
    dtype: str
    numel: int
    shape: tuple


def plan_tables(cfg: KimiK2Config, src: ParallelGrid, dst: ParallelGrid, topo: Topology,
                bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                src_tables: LayoutTables | None = None) -> dict:
    """Both sides' tables, every rank's plan and the ranks ({"src", "dst", "plans", "world"});
    `src_tables`: the source's, already built for `src` (the advisor plans many destinations
    beside one)."""
    # The planner's tables built with NumPy: a Layout of 2048 GPUs would take a minute.
    src_tables = src_tables if src_tables is not None else kimi_k2_tables(cfg, src)
    dst_tables = kimi_k2_tables(cfg, dst)
    plans = Planner(src_tables, dst_tables, bucket_bytes, topo.gpus_per_node).plan_all()
    world = max(src.offset + src.world, dst.offset + dst.world)
    return {"src": src_tables, "dst": dst_tables, "plans": plans, "world": world}


def aliases_per_rank(planned: dict) -> dict[int, dict[int, int]]:
    """{rank: {destination buffer: source buffer}} that plan(..., alias=True) would share
    (aliasing.aliasable_buffers on each rank's plan; none where a rank holds one side only)."""
    src, dst = TableBuffers(planned["src"]), TableBuffers(planned["dst"])
    return {r: aliasable_buffers(p, src, dst) for r, p in planned["plans"].items()}


def dry_run(cfg: KimiK2Config, src: ParallelGrid, dst: ParallelGrid, topo: Topology,
            bucket_bytes: int = DEFAULT_BUCKET_BYTES, headroom: float = 0.9,
            transport: str = "auto", alias: bool = False) -> dict:
    """Every rank's figures (`RankFigures`), the floor and the prediction of a refit whose
    plan takes `transport` (refit_engine.plan's option: auto, nccl, ipc) and `alias`
    (plan(alias=True): shared local tensors counted once and never copied; collocated only)."""
    check_transport(topo, transport)
    collocated = src.offset == dst.offset
    alias = alias and collocated
    check_fits(cfg, src, dst, topo, collocated, headroom, bucket_bytes, transport, alias)
    planned = plan_tables(cfg, src, dst, topo, bucket_bytes)
    return figures(planned, topo, transport, headroom, aliases_per_rank(planned) if alias else None)


def figures(planned: dict, topo: Topology, transport: str = "auto", headroom: float = 0.9,
            aliases: dict[int, dict[int, int]] | None = None) -> dict:
    """The dry run's result from `plan_tables`' plans. `aliases`: `aliases_per_rank`'s (None:
    aliasing off): their destination bytes count once in memory (`RankFigures.aliased_bytes`)
    and leave the local copies, hence the prediction."""
    src_tables, dst_tables, plans = planned["src"], planned["dst"], planned["plans"]
    world = planned["world"]
    src_w, dst_w = _weights_per_rank(src_tables, world), _weights_per_rank(dst_tables, world)
    dst_bytes = dst_tables.buffers[:, BUFFER["numel"]] * dst_tables.buffers[:, BUFFER["itemsize"]]
    ranks, buckets = [], {}
    for r in range(world):
        p = plans.get(r)
        if p is None:
            ranks.append(RankFigures(r, src_bytes=src_w[r], dst_bytes=dst_w[r]))
            continue
        shared = (aliases or {}).get(r, {})
        aliased = int(dst_bytes[list(shared)].sum()) if shared else 0
        p = without_buffers(p, shared)  # aliased local tensors: nothing copies them
        per_peer = p.bytes_per_peer()
        transports = {peer: topo.peer_transport(r, peer, transport) for peer in per_peer}
        peers = staged_peers(transports)
        messages = sum(len(staged_messages(m, peers)) for m in (p.send_messages, p.recv_messages))
        ranks.append(rank_figures(r, p.bytes_local, per_peer, topo, transports,
                                  src_bytes=src_w[r], dst_bytes=dst_w[r],
                                  staging_bytes=staging_bytes(p, transports), messages=messages,
                                  aliased_bytes=aliased))
        buckets[r] = staged_buckets(p, transports)
    budget = topo.memory_gib * headroom * GIB
    worst = max(ranks, key=lambda f: f.total_bytes)
    result = {"ranks": ranks, "floor": floor(ranks, topo), "topology": topo,
              "transport": transport, "predicted": predict(ranks, topo, buckets),
              "alias": aliases is not None, "fits": worst.total_bytes <= budget}
    if not result["fits"]:
        result["reason"] = (
            f"does not fit: rank {worst.rank} needs {worst.total_bytes / GIB:.1f} GiB (source "
            f"{worst.src_bytes / GIB:.1f} + destination {worst.dst_bytes / GIB:.1f}"
            + (f" - aliased {worst.aliased_bytes / GIB:.1f}" if aliases is not None else "")
            + f" + staging {worst.staging_bytes / GIB:.1f} GiB, the plan's) but "
            f"{topo.memory_gib:.0f} GiB each, {budget / GIB:.0f} usable at {headroom:.0%}")
    return result


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
        *_aliased_lines(result),
        f"{'total (rank ' + str(worst.rank) + ')':<34}{worst.total_bytes / GIB:>10.2f}"
        f"   of {topo.memory_gib:.0f} GiB: {'fits' if result['fits'] else 'DOES NOT FIT'}",
        f"{'local copy (max)':<34}{max(f.local_bytes for f in ranks) / GIB:>10.2f}"
        + ("   (aliased bytes are not copied)" if result.get("alias") else ""),
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


def _aliased_lines(result: dict) -> list[str]:
    """With aliasing: how much each rank shares with the source (counted once, never copied)."""
    if not result.get("alias"):
        return []
    ranks = result["ranks"]
    top = max(ranks, key=lambda f: f.aliased_bytes)
    total = sum(f.aliased_bytes for f in ranks)
    dst = sum(f.dst_bytes for f in ranks)
    share = total / dst if dst else 0.0
    return [(f"{'aliased, counted once (rank ' + str(top.rank) + ')':<34}"
             f"{top.aliased_bytes / GIB:>10.2f}   {total / GIB:.1f} GiB over {len(ranks)} ranks: "
             f"{share:.1%} of the destination shares the source's storage")]


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
    parser.add_argument("--alias", action="store_true",
                        help="plan(alias=True): destination tensors the plan fills byte for byte "
                             "from one source tensor of the same rank share its storage, counted "
                             "once and never copied (collocated only)")
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
    if args.alias and args.non_collocated:
        parser.error("--alias: aliasing shares the storage of one rank's two models, so it needs "
                     "a collocated refit (not --non-collocated)")
    total = args.gpus * (2 if args.non_collocated else 1)
    topo = preset(args.gpu, total)
    try:
        check_transport(topo, args.transport)
    except ValueError as exc:
        parser.error(f"--transport: {exc} (--gpu {args.gpu})")
    try:
        result = dry_run(cfg, src, dst, topo, args.bucket_mib << 20, args.headroom,
                         args.transport, args.alias)
    except RefitError as exc:
        print(f"refused: {exc.reason}", file=sys.stderr)
        if args.json:
            print(json.dumps({"fits": False, "reason": exc.reason}))
        return 2
    if args.json:
        worst = max(result["ranks"], key=lambda f: f.total_bytes)
        ranks = result["ranks"]
        print(json.dumps({"fits": result["fits"], "floor_s": result["floor"]["seconds"],
                          "predicted_s": result["predicted"]["seconds"],
                          "max_gpu_gib": worst.total_bytes / GIB,
                          "max_staging_gib": max(f.staging_bytes for f in ranks) / GIB,
                          "alias": args.alias,
                          "max_aliased_gib": max(f.aliased_bytes for f in ranks) / GIB,
                          "max_local_gib": max(f.local_bytes for f in ranks) / GIB,
                          "transport": args.transport, "topology": asdict(topo),
                          **({"reason": result["reason"]} if "reason" in result else {})}))
    else:
        print(f"Kimi K2 ({cfg.num_layers} layers) source {args.src} -> destination {args.dst} "
              f"on {topo.describe(total)} "
              f"({'non-collocated' if args.non_collocated else 'collocated'}"
              f"{', aliasing on' if args.alias else ''})")
        print(report(result))
        if "reason" in result:
            print(result["reason"])
        if args.per_rank:
            print(per_rank_table(result["ranks"], topo))
    return 0 if result["fits"] else 2


def per_rank_table(ranks: list[RankFigures], topo: Topology | None = None) -> str:
    intra = topo.intra_link if topo else "NVLink"
    head = (f"{'rank':>5}{'source GiB':>11}{'dest GiB':>10}{'aliased':>8}{'staging GiB':>12}"
            f"{'total GiB':>10}"
            f"{'local GiB':>10}{intra[:7] + ' out':>11}{intra[:7] + ' in':>10}{'IPC in':>8}"
            f"{'net out':>9}{'net in':>8}")
    rows = [head]
    for f in ranks:
        rows.append(f"{f.rank:>5}{f.src_bytes / GIB:>11.2f}{f.dst_bytes / GIB:>10.2f}"
                    f"{f.aliased_bytes / GIB:>8.2f}{f.staging_bytes / GIB:>12.2f}"
                    f"{f.total_bytes / GIB:>10.2f}"
                    f"{f.local_bytes / GIB:>10.2f}{f.sent_intra / GIB:>11.2f}"
                    f"{f.received_intra / GIB:>10.2f}{f.received_ipc / GIB:>8.2f}"
                    f"{f.sent_inter / GIB:>9.2f}"
                    f"{f.received_inter / GIB:>8.2f}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
