"""Cluster-scale planning: full-size Kimi K2 on 128, 512 and 2048 GPUs (CPU only).

For layouts typical of training (source) and inference (destination) at each size: time and
memory of one rank's plan and of the whole cluster's plan (one thread; one rank's plan is
validating and indexing both sides' tables, which every rank does, plus compiling its own
plan: the first run and the median of --repeats, over ranks at the start, middle and end of
the world), and for the source
choice, link-aware (a replica on the receiver's node first) against round-robin: busiest link
bytes (network and NVLink, either direction), the lower bound (bytes that must cross the
network spread perfectly over the ranks, or the busiest receiver's, whichever is larger), and
the cost model's predicted refit time on H100 nodes of 8 GPUs. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from refit_engine import _core  # noqa: E402
from refit_engine.compiler import DEFAULT_BUCKET_BYTES, RankPlan  # noqa: E402
from refit_engine.harness.cost import floor, predict, rank_figures  # noqa: E402
from refit_engine.harness.grid import ParallelGrid  # noqa: E402
from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_tables  # noqa: E402
from refit_engine.harness.results import environment, results_dir, save_json  # noqa: E402
from refit_engine.harness.topology import preset  # noqa: E402

# (GPUs, source TP/EP, destination TP/EP): expert-DP replicas on the source side, as training
# keeps them; the destination spreads experts as far as 384 experts and the GPU count allow.
SCALES = [(128, (8, 64), (4, 128)), (512, (8, 64), (4, 128)), (2048, (8, 128), (4, 128))]


def link_figures(plans: dict, topo) -> list:
    return [rank_figures(r, p.bytes_local, p.bytes_per_peer(), topo,
                         messages=len(p.send_messages)) for r, p in plans.items()]


def busiest(figs, kind):
    return max(max(getattr(f, f"sent_{kind}"), getattr(f, f"received_{kind}")) for f in figs)


def run(gpus, src_spec, dst_spec, cfg, repeats):
    topo = preset("h100", gpus)
    t0 = time.perf_counter()
    src = kimi_k2_tables(cfg, ParallelGrid(gpus, tp=src_spec[0], ep=src_spec[1]))
    dst = kimi_k2_tables(cfg, ParallelGrid(gpus, tp=dst_spec[0], ep=dst_spec[1]))
    tables_s = time.perf_counter() - t0
    row = {"gpus": gpus, "source": f"TP{src_spec[0]}/EP{src_spec[1]}",
           "destination": f"TP{dst_spec[0]}/EP{dst_spec[1]}", "tables_s": tables_s,
           "pieces": int(len(src[3]) + len(dst[3])), "placements": int(len(src[4]) + len(dst[4])),
           "tables_bytes": int(sum(a.nbytes for side in (src, dst) for a in side[1:]))}
    sample_ranks = sorted({0, gpus // 2 + 1, gpus - 1})
    for choice, rpn in (("link_aware", topo.gpus_per_node), ("round_robin", 0)):
        validate, rank_plans, phases = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            planner = _core.Planner(*src, *dst, DEFAULT_BUCKET_BYTES, rpn)
            validate.append(time.perf_counter() - t0)
            phases.append(dict(planner.timings))
            times = []
            for rank in sample_ranks:
                t0 = time.perf_counter()
                one = RankPlan.from_core(planner.plan_rank(rank))
                times.append(time.perf_counter() - t0)
            rank_plans.append(max(times))  # the slowest of the sampled ranks
        validate_s, rank_s = statistics.median(validate), statistics.median(rank_plans)
        t0 = time.perf_counter()
        plans = {p["rank"]: RankPlan.from_core(p) for p in planner.plan_all()}
        cluster_s = time.perf_counter() - t0
        one = plans[0]
        figs = link_figures(plans, topo)
        must_cross = sum(f.sent_inter for f in figs)  # link-aware: only what has no replica near
        row[choice] = {
            "validate_index_s": validate_s, "rank_plan_s": rank_s, "rank_total_s": validate_s + rank_s,
            "rank_total_first_s": validate[0] + rank_plans[0], "validate_runs_s": validate,
            "rank_plan_runs_s": rank_plans, "sample_ranks": sample_ranks,
            "validate_phases_s": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
            "cluster_plan_s": cluster_s, "cluster_total_s": validate_s + cluster_s,
            "rank0_plan_bytes": one.nbytes, "cluster_plan_bytes": sum(p.nbytes for p in plans.values()),
            "busiest_network_bytes": busiest(figs, "inter"), "busiest_nvlink_bytes": busiest(figs, "intra"),
            "network_bytes_total": must_cross,
            "busiest_receiver_network_bytes": max(f.received_inter for f in figs),
            "busiest_receiver_remote_bytes": max(f.received_inter + f.received_intra for f in figs),
            "nvlink_sent_mean_bytes": sum(f.sent_intra for f in figs) / len(figs),
            "busiest_link_s": max(busiest(figs, "intra") / (topo.intra_node_gbps * 1e9),
                                  busiest(figs, "inter") / (topo.inter_node_gbps * 1e9)),
            "predicted_s": predict(figs, topo, {r: p.num_buckets for r, p in plans.items()})["seconds"],
            "floor_s": floor(figs, topo)["seconds"]}
        del plans, planner
    la = row["link_aware"]
    lower = max(la["network_bytes_total"] / gpus, la["busiest_receiver_network_bytes"])
    row["network_lower_bound_bytes"] = lower
    row["busiest_over_lower_bound"] = la["busiest_network_bytes"] / lower if lower else 1.0
    # In time, over both kinds of link: the network bound above, and every receiver's remote
    # bytes arriving over NVLink and its NIC at once (whatever the choice of senders).
    row["link_time_lower_bound_s"] = max(
        lower / (topo.inter_node_gbps * 1e9),
        la["busiest_receiver_remote_bytes"] / ((topo.intra_node_gbps + topo.inter_node_gbps) * 1e9))
    row["busiest_link_time_over_bound"] = la["busiest_link_s"] / row["link_time_lower_bound_s"]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default="128,512,2048")
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = KimiK2Config(num_layers=args.layers)
    wanted = {int(g) for g in args.gpus.split(",")}
    rows = []
    for gpus, s, d in SCALES:
        if gpus in wanted:
            print(f"[scale] {gpus} GPUs: TP{s[0]}/EP{s[1]} -> TP{d[0]}/EP{d[1]} ...", flush=True)
            rows.append(run(gpus, s, d, cfg, args.repeats))
    print()
    print(f"{'GPUs':>5} {'config':<22}{'pieces':>8}{'rank s':>8}{'first':>7}{'cluster s':>10}{'rank KiB':>9}{'clust MiB':>10}"
          f"{'net busiest GiB (LA/RR)':>25}{'LB GiB':>8}{'pred ms (LA/RR)':>17}")
    for r in rows:
        la, rr = r["link_aware"], r["round_robin"]
        print(f"{r['gpus']:>5} {r['source'] + '->' + r['destination']:<22}{r['pieces']:>8}"
              f"{la['rank_total_s']:>8.3f}{la['rank_total_first_s']:>7.3f}"
              f"{la['cluster_total_s']:>10.2f}{la['rank0_plan_bytes'] / 1024:>9.0f}"
              f"{la['cluster_plan_bytes'] / 2**20:>10.0f}"
              f"{la['busiest_network_bytes'] / 2**30:>12.2f} / {rr['busiest_network_bytes'] / 2**30:<10.2f}"
              f"{r['network_lower_bound_bytes'] / 2**30:>8.2f}"
              f"{la['predicted_s'] * 1e3:>8.0f} / {rr['predicted_s'] * 1e3:<8.0f}")
    payload = {"bench": "scale", "env": environment(__file__), "layers": args.layers, "rows": rows}
    path = save_json(results_dir(__file__), "scale", payload)
    print(f"raw results: {path}")
    print(json.dumps({f"{r['gpus']}": {
        "rank_s": r["link_aware"]["rank_total_s"], "rank_first_s": r["link_aware"]["rank_total_first_s"],
        "cluster_s": r["link_aware"]["cluster_total_s"],
        "busiest_over_lower_bound": r["busiest_over_lower_bound"],
        "busiest_link_time_over_bound": r["busiest_link_time_over_bound"],
        "busiest_link_aware_gib": r["link_aware"]["busiest_network_bytes"] / 2**30,
        "busiest_round_robin_gib": r["round_robin"]["busiest_network_bytes"] / 2**30,
        "predicted_ms": r["link_aware"]["predicted_s"] * 1e3} for r in rows}))


if __name__ == "__main__":
    main()
