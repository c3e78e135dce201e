"""How long does it take to compile a full-size Kimi K2 refit plan on 128 ranks?

For each of the seed's TP pairs (8->4, 8->2, 8->1, 4->2, 4->1) with EP 64 -> 128, ETP 1, PP 1,
collocated on 128 ranks, this times (medians, one thread):

- ours, one rank: validate + index all ranks' layouts, then compile that rank's plan; this is
  everything a rank does between gathering layouts and moving bytes;
- ours, cluster: validate + index, then compile every rank's plan;
- plan memory of rank 0 and of the whole cluster;
- megatron-core's planner on equivalent synthetic rosters (bench/megatron_planner.py), when
  megatron-core is installed: the per-destination-rank core of its loop, and the whole loop.
  In megatron-core 0.16 rank 0 computes every rank's plan (build_centralized_reshard_plan) and
  in 0.19+ every rank replays the whole schedule (build_plan_from_rosters), so in both the time
  until one rank holds its plan is the whole loop: that is `megatron_rank_s`.

Last line: one JSON object with the TP8->TP4 figures (and every configuration under "all").
Usage: python bench/plan_compile.py [--repeats 5] [--configs 8:4,4:2] [--no-megatron]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # keep NumPy's BLAS threads off the core

from refit_engine import Planner  # noqa: E402
from refit_engine.harness.grid import ParallelGrid  # noqa: E402
from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout  # noqa: E402
from refit_engine.harness.results import environment, results_dir, save_json  # noqa: E402
from refit_engine.harness.timing import time_host  # noqa: E402

CONFIGS = [(8, 4), (8, 2), (8, 1), (4, 2), (4, 1)]
WORLD, SRC_EP, DST_EP = 128, 64, 128


def measure_ours(cfg, src_tp, dst_tp, repeats):
    t0 = time.perf_counter()
    src = kimi_k2_layout(cfg, ParallelGrid(WORLD, tp=src_tp, ep=SRC_EP))
    dst = kimi_k2_layout(cfg, ParallelGrid(WORLD, tp=dst_tp, ep=DST_EP))
    src.tables(), dst.tables()
    layout_s = time.perf_counter() - t0
    rank = time_host(lambda: Planner(src, dst).plan_rank(0), repeats)
    cluster = time_host(lambda: Planner(src, dst).plan_all(), repeats)
    planner = Planner(src, dst)
    plans = planner.plan_all()
    one = plans[0]
    return {
        "layout_build_s": layout_s,
        "tensors": len(src.tensors),
        "pieces": int(len(src.tables().pieces) + len(dst.tables().pieces)),
        "placements": int(len(src.placements()) + len(dst.placements())),
        "ours_rank_s": rank["median"], "ours_rank": rank,
        "ours_cluster_s": cluster["median"], "ours_cluster": cluster,
        "rank0_plan_bytes": one.nbytes,
        "cluster_plan_bytes": sum(p.nbytes for p in plans.values()),
        "rank0_segments": int(len(one.local) + len(one.send) + len(one.recv)),
        "rank0_bytes_local": one.bytes_local, "rank0_bytes_sent": one.bytes_sent,
        "rank0_bytes_received": one.bytes_received,
    }


def measure_megatron(src_tp, dst_tp):
    import megatron_planner as mp
    t0 = time.perf_counter()
    rosters = mp.build_rosters(src_tp, dst_tp, SRC_EP, DST_EP, WORLD)
    roster_s = time.perf_counter() - t0
    slice_s = mp.time_rank_plan(rosters, 0)
    cluster_s, extrapolated = mp.time_cluster_plan(rosters)
    return {"megatron_version": mp.megatron_version(),
            "megatron_api": "build_plan_from_rosters" if mp.HAS_ROSTER_API else "centralized loop",
            "megatron_roster_build_s": roster_s, "megatron_dst_rank_slice_s": slice_s,
            "megatron_cluster_s": cluster_s, "megatron_cluster_extrapolated": extrapolated,
            "megatron_rank_s": cluster_s}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default=",".join(f"{s}:{d}" for s, d in CONFIGS))
    parser.add_argument("--no-megatron", action="store_true")
    args = parser.parse_args(argv)
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    cfg = KimiK2Config()
    use_megatron = not args.no_megatron
    if use_megatron:
        try:
            import megatron_planner  # noqa: F401
        except ImportError as e:
            print(f"megatron-core not importable ({e}); timing ours only", flush=True)
            use_megatron = False
    rows = []
    for src_tp, dst_tp in configs:
        name = f"TP{src_tp}/EP{SRC_EP} -> TP{dst_tp}/EP{DST_EP}"
        print(f"[plan_compile] {name}: building layouts and timing ours ...", flush=True)
        row = {"config": name, **measure_ours(cfg, src_tp, dst_tp, args.repeats)}
        if use_megatron:
            print(f"[plan_compile] {name}: timing megatron-core's planner ...", flush=True)
            row.update(measure_megatron(src_tp, dst_tp))
            row["speedup"] = row["megatron_rank_s"] / row["ours_rank_s"]
            row["speedup_vs_dst_rank_slice"] = row["megatron_dst_rank_slice_s"] / row["ours_rank_s"]
        rows.append(row)

    print()
    print("Kimi K2 full size, 128 ranks, collocated, ETP 1; seconds are medians of "
          f"{args.repeats}, one thread")
    head = (f"{'config':<26}{'ours rank s':>12}{'ours clust s':>13}{'rank0 KiB':>10}"
            f"{'clust MiB':>10}{'mcore rank s':>13}{'mcore slice s':>14}{'speedup':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['config']:<26}{r['ours_rank_s']:>12.4f}{r['ours_cluster_s']:>13.4f}"
              f"{r['rank0_plan_bytes'] / 1024:>10.1f}{r['cluster_plan_bytes'] / 2**20:>10.1f}"
              f"{r.get('megatron_rank_s', float('nan')):>13.3f}"
              f"{r.get('megatron_dst_rank_slice_s', float('nan')):>14.4f}"
              f"{r.get('speedup', float('nan')):>9.1f}")
    payload = {"bench": "plan_compile", "env": environment(__file__), "rows": rows}
    path = save_json(results_dir(__file__), "plan_compile", payload)
    print(f"raw results: {path}")
    first = rows[0]
    summary = {k: first.get(k) for k in ("config", "ours_cluster_s", "ours_rank_s",
                                          "megatron_rank_s", "speedup",
                                          "megatron_dst_rank_slice_s", "megatron_version",
                                          "rank0_plan_bytes", "cluster_plan_bytes")}
    summary["all"] = [{k: r.get(k) for k in ("config", "ours_rank_s", "ours_cluster_s",
                                             "megatron_rank_s", "speedup")} for r in rows]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
