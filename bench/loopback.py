"""Loopback refit: 8 virtual ranks of a scaled Kimi K2 on one GPU, against its floor.

Kimi K2 at full width and expert size (hidden 7168, experts of ffn 2048, vocab 163840), scaled
down in depth and expert count to fit one GPU with both models: --layers (default 4: one dense
+ three MoE) and --experts (default 32). Source TP8/EP8, destination TP4/EP4 on the same 8
virtual ranks (collocated). Two executors:

- staged: the NCCL executor's data path, bucket by bucket (pack, exchange by device copy,
  unpack), plain and as a CUDA graph;
- direct: every piece copied straight from source to destination in one fused kernel.

Floor: every destination byte read once and written once, over the measured copy bandwidth.
The last line is one JSON object with the key figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from refit_engine import LoopbackRefit, dtypes
from refit_engine.harness.models.kimi_k2 import loopback_pair
from refit_engine.harness.results import device_name, environment, results_dir, save_json
from refit_engine.harness.timing import copy_ceiling, time_cuda
from refit_engine.layouts import placement_box
from refit_engine.tables import PLACEMENT


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--bucket-mib", type=int, default=256)
    args = parser.parse_args(argv)

    src, dst = loopback_pair(args.layers, args.experts)

    def alloc(layout, fill):
        out = {}
        for b in layout.buffers:
            n = b.numel * dtypes.itemsize(b.dtype)
            out[(b.rank, b.key)] = (torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda")
                                    if fill else torch.full((n,), 0xA5, dtype=torch.uint8,
                                                            device="cuda"))
        return out

    src_t, dst_t = alloc(src, True), alloc(dst, False)
    dst_bytes = sum(t.numel() for t in dst_t.values())
    print(f"[loopback] scaled Kimi K2: {args.layers} layers, {args.experts} experts; source "
          f"{sum(t.numel() for t in src_t.values()) / 2**30:.1f} GiB, destination "
          f"{dst_bytes / 2**30:.1f} GiB over 8 virtual ranks", flush=True)

    # Correct first, on a copy of the values we can check on the host: one tensor per side of
    # the source is compared through the layouts (the whole model is too big to assemble here).
    results = {}
    ceiling = copy_ceiling(iters=args.iters)
    floor_ms = 2 * dst_bytes / (ceiling["gbps_rw"] * 1e6)
    for mode in ("staged", "direct"):
        refit = LoopbackRefit(src, dst, src_t, dst_t, bucket_bytes=args.bucket_mib << 20,
                              direct=mode == "direct")
        for t in dst_t.values():
            t.fill_(0xA5)
        refit.run()
        _check_sample(src, dst, src_t, dst_t)
        t_plain = time_cuda(lambda: refit.run(sync=False), args.iters)
        results[mode] = {"plain": t_plain}
        refit.run(graph=True)
        for t in dst_t.values():
            t.fill_(0x5A)
        refit.run(graph=True)
        _check_sample(src, dst, src_t, dst_t)
        results[mode]["graph"] = time_cuda(lambda: refit.run(graph=True, sync=False), args.iters)
        # Host cost of launching the whole captured refit.
        stream = torch.cuda.current_stream().cuda_stream
        launches = []
        for _ in range(50):
            t0 = time.perf_counter()
            refit.executor.replay(stream)
            launches.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        results[mode]["graph_launch_us"] = statistics.median(launches)
        results[mode]["bytes"] = refit.bytes_moved()
        results[mode]["buckets"] = refit.executor.num_buckets
        print(f"[loopback] {mode}: plain {t_plain['median_ms']:.2f} ms, graph "
              f"{results[mode]['graph']['median_ms']:.2f} ms", flush=True)
        refit = None  # free its staging before the next executor allocates its own
        torch.cuda.empty_cache()

    print()
    print(f"{device_name()}: copy ceiling {ceiling['gbps_rw']:.0f} GB/s; floor {floor_ms:.2f} ms "
          f"({dst_bytes / 2**30:.2f} GiB read + written)")
    print(f"{'executor':<16}{'median ms':>11}{'of floor':>10}{'launch us':>11}{'buckets':>9}")
    for mode, r in results.items():
        for kind in ("plain", "graph"):
            ms = r[kind]["median_ms"]
            print(f"{mode + ' ' + kind:<16}{ms:>11.2f}{floor_ms / ms:>10.1%}"
                  f"{(r['graph_launch_us'] if kind == 'graph' else float('nan')):>11.1f}"
                  f"{r['buckets']:>9}")
    payload = {"bench": "loopback", "env": {**environment(__file__), "device": device_name()},
               "layers": args.layers, "experts": args.experts, "ceiling": ceiling,
               "floor_ms": floor_ms, "dst_bytes": dst_bytes, "results": results}
    path = save_json(results_dir(__file__), "loopback", payload)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], path.name), "w") as f:
            json.dump(payload, f, indent=1)
    print(json.dumps({"device": device_name(), "floor_ms": floor_ms,
                      **{f"{m}_{k}_ms": r[k]["median_ms"] for m, r in results.items()
                         for k in ("plain", "graph")},
                      **{f"{m}_of_floor": floor_ms / r["graph"]["median_ms"] for m, r in results.items()},
                      "graph_launch_us": results["direct"]["graph_launch_us"]}))


def _check_sample(src, dst, src_t, dst_t):
    """A few destination tensors against the source, through the layouts, bit for bit."""
    names = [n for n in (m.name for m in dst.tensors)
             if "linear_q_up_proj.weight" in n or "experts.3.linear_fc1" in n
             or "word_embeddings" in n][:4]
    placements = {id(side): side.placements() for side in (src, dst)}
    for name in names:
        meta = dst.tensor(name)
        # Rebuild the global tensor from the source pieces, then each destination piece from it.
        full = torch.empty(meta.shape, dtype=torch.int16, device="cuda")
        for side, tensors, out in ((src, src_t, "fill"), (dst, dst_t, "check")):
            t_index = side._tensor_index[name]
            rows = placements[id(side)]
            for row in rows[rows[:, PLACEMENT["tensor"]] == t_index]:
                buf = side.buffers[int(row[PLACEMENT["buffer"]])]
                start, extent, strides = placement_box(row, len(meta.shape))
                local = tensors[(buf.rank, buf.key)].view(torch.int16).as_strided(
                    extent, strides, int(row[PLACEMENT["local_offset"]]))
                index = tuple(slice(s, s + e) for s, e in zip(start, extent))
                if out == "fill":
                    full[index] = local
                elif not torch.equal(full[index], local):
                    raise AssertionError(f"loopback refit wrong in {name} on rank {buf.rank}")


if __name__ == "__main__":
    main()
