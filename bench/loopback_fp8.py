"""Loopback refit BF16 -> FP8: 8 virtual ranks of a scaled Kimi K2 on one GPU (issue 16).

The model and layouts of bench/loopback.py (full width and expert size, --layers and --experts
scaled; source TP8/EP8, destination TP4/EP4, collocated). The destination is Kimi K2's serving
format (quantize.format_for: every linear weight fp8_block128, embeddings / output layer /
norms / router BF16, the router's expert bias float32), filled by the refit itself: each
piece quantized while it is copied (the direct path, and the staged path: pack, exchange,
unpack), plain and as a CUDA graph.

Baseline, in the same run: the receiver-side way (NeMo-RL's, megatron-core's): refit BF16 into
a BF16 destination with the same executor, then quantize each weight with torch ops (amax per
block, divide, clamp, cast), timed end to end.

Floor: bytes read (the BF16 pieces) plus bytes written (FP8, scales, the BF16 rest) over the
measured copy bandwidth (read + write). Correct first: a sample of tensors is checked bit for
bit against refit_engine.quantize before timing. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import torch

from refit_engine import LoopbackRefit, dtypes, quantize
from refit_engine.harness.baselines.torch_quantize import block_quantize
from refit_engine.harness.models.kimi_k2 import loopback_pair
from refit_engine.harness.results import device_name, environment, results_dir, save_json
from refit_engine.harness.timing import copy_ceiling, time_cuda
from refit_engine.layouts import placement_box
from refit_engine.tables import PLACEMENT
from refit_engine.transforms import PLAIN_FORMATS, TensorFormat, scale_shape


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--bucket-mib", type=int, default=256)
    args = parser.parse_args(argv)

    src, dst = loopback_pair(args.layers, args.experts)
    formats = {}
    for meta in dst.tensors:
        fmt = quantize.format_for(meta.name)
        if fmt != PLAIN_FORMATS[meta.dtype]:
            formats[meta.name] = TensorFormat(PLAIN_FORMATS[meta.dtype], fmt)

    src_t = {}
    for b in src.buffers:
        t = torch.randn(b.shape, device="cuda").to(getattr(torch, b.dtype))
        src_t[(b.rank, b.key)] = t
    plain_dst, fp8_dst, scales, quantized = {}, {}, {}, []
    for index, b in enumerate(dst.buffers):
        plain_dst[(b.rank, b.key)] = torch.empty(b.shape, dtype=getattr(torch, b.dtype),
                                                 device="cuda")
        fmt = formats.get(b.key)  # per-expert and dense buffers are keyed by their tensor
        if fmt is None:
            fp8_dst[(b.rank, b.key)] = plain_dst[(b.rank, b.key)].clone()
            continue
        fp8_dst[(b.rank, b.key)] = torch.empty(b.shape, dtype=torch.float8_e4m3fn, device="cuda")
        scales[(b.rank, b.key)] = torch.empty(scale_shape(b.shape, fmt.dst), dtype=torch.float32,
                                              device="cuda")
        quantized.append((b.rank, b.key))
    read = sum(math.prod(dst.buffers[i].shape) * dtypes.itemsize(dst.buffers[i].dtype)
               for i in range(len(dst.buffers)))
    written = sum(t.numel() * t.element_size() for t in [*fp8_dst.values(), *scales.values()])
    bf16_bytes = read
    print(f"[loopback-fp8] scaled Kimi K2: {args.layers} layers, {args.experts} experts; "
          f"destination {bf16_bytes / 2**30:.2f} GiB BF16 -> {written / 2**30:.2f} GiB "
          f"({len(quantized)} of {len(dst.buffers)} local tensors fp8_block128)", flush=True)

    ceiling = copy_ceiling(iters=args.iters)
    floor_ms = (read + written) / (ceiling["gbps_rw"] * 1e6)
    bf16_floor_ms = 2 * bf16_bytes / (ceiling["gbps_rw"] * 1e6)
    results = {}
    for mode in ("direct", "staged"):
        refit = LoopbackRefit(src, dst, src_t, fp8_dst, bucket_bytes=args.bucket_mib << 20,
                              direct=mode == "direct", formats=formats, scales=scales)
        for t in [*fp8_dst.values(), *scales.values()]:
            t.view(torch.uint8).fill_(0xA5)
        refit.run()
        checked = _check_sample(src, dst, src_t, fp8_dst, scales, formats)
        results[mode] = {"plain": time_cuda(lambda: refit.run(sync=False), args.iters)}
        refit.run(graph=True)
        for t in [*fp8_dst.values(), *scales.values()]:
            t.view(torch.uint8).fill_(0x5A)
        refit.run(graph=True)
        _check_sample(src, dst, src_t, fp8_dst, scales, formats)
        results[mode]["graph"] = time_cuda(lambda: refit.run(graph=True, sync=False), args.iters)
        results[mode]["assembled"] = sum(len(t.assembled) for t in refit.transforms.values())
        print(f"[loopback-fp8] {mode}: plain {results[mode]['plain']['median_ms']:.2f} ms, "
              f"graph {results[mode]['graph']['median_ms']:.2f} ms (checked {checked})",
              flush=True)
        refit = None
        torch.cuda.empty_cache()

    # The receiver-side way: BF16 refit (the same direct executor, graph), then torch ops.
    bf16 = LoopbackRefit(src, dst, src_t, plain_dst, bucket_bytes=args.bucket_mib << 20,
                         direct=True)
    bf16.run(graph=True)
    base_out = {k: torch.empty_like(fp8_dst[k]) for k in quantized}
    base_scale = {k: torch.empty_like(scales[k]) for k in quantized}

    def quantize_after():
        for k in quantized:
            x = plain_dst[k]
            for m in range(x.numel() // (x.shape[-2] * x.shape[-1])):
                xm = x.view(-1, *x.shape[-2:])[m]
                block_quantize(xm, base_out[k].view(-1, *x.shape[-2:])[m],
                                     base_scale[k].view(-1, *base_scale[k].shape[-2:])[m])

    def receiver_side():
        bf16.run(graph=True, sync=False)
        quantize_after()

    results["baseline_bf16_refit"] = time_cuda(lambda: bf16.run(graph=True, sync=False),
                                               args.iters)
    results["baseline_bf16_then_torch"] = time_cuda(receiver_side, args.iters)
    ours = min(results[m]["graph"]["median_ms"] for m in ("direct", "staged"))
    base = results["baseline_bf16_then_torch"]["median_ms"]
    print()
    print(f"{device_name()}: copy ceiling {ceiling['gbps_rw']:.0f} GB/s; FP8 floor "
          f"{floor_ms:.2f} ms ({read / 2**30:.2f} GiB read + {written / 2**30:.2f} GiB written); "
          f"BF16 floor {bf16_floor_ms:.2f} ms")
    print(f"{'run':<30}{'median ms':>11}{'of floor':>10}")
    for mode in ("direct", "staged"):
        for kind in ("plain", "graph"):
            ms = results[mode][kind]["median_ms"]
            print(f"{'FP8 ' + mode + ' ' + kind:<30}{ms:>11.2f}{floor_ms / ms:>10.1%}")
    ms = results["baseline_bf16_refit"]["median_ms"]
    print(f"{'BF16 refit (direct graph)':<30}{ms:>11.2f}{bf16_floor_ms / ms:>10.1%}")
    print(f"{'BF16 refit + torch quantize':<30}{base:>11.2f}{floor_ms / base:>10.1%}")
    print(f"FP8 refit {base / ours:.2f}x faster than BF16 refit + torch quantize")
    payload = {"bench": "loopback_fp8", "env": {**environment(__file__), "device": device_name()},
               "layers": args.layers, "experts": args.experts, "ceiling": ceiling,
               "floor_ms": floor_ms, "bf16_floor_ms": bf16_floor_ms, "bytes_read": read,
               "bytes_written": written, "results": results}
    path = save_json(results_dir(__file__), "loopback_fp8", payload)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], path.name), "w") as f:
            json.dump(payload, f, indent=1)
    print(json.dumps({"device": device_name(), "floor_ms": floor_ms,
                      **{f"{m}_{k}_ms": results[m][k]["median_ms"] for m in ("direct", "staged")
                         for k in ("plain", "graph")},
                      "of_floor": floor_ms / ours, "baseline_ms": base,
                      "speedup_vs_baseline": base / ours}))


def _check_sample(src, dst, src_t, dst_t, scales, formats) -> int:
    """Sample destination tensors against refit_engine.quantize of the global source tensor."""
    names = [n for n in (m.name for m in dst.tensors)
             if "linear_q_up_proj.weight" in n or "experts.3.linear_fc1" in n
             or "linear_proj" in n or "word_embeddings" in n][:6]
    placements = {id(side): side.placements() for side in (src, dst)}
    for name in names:
        meta = src.tensor(name)
        full = np.zeros(meta.shape, dtype=np.uint16)
        rows = placements[id(src)]
        for row in rows[rows[:, PLACEMENT["tensor"]] == src._tensor_index[name]]:
            buf = src.buffers[int(row[PLACEMENT["buffer"]])]
            start, extent, strides = placement_box(row, len(meta.shape))
            local = src_t[(buf.rank, buf.key)].view(torch.int16).as_strided(
                extent, strides, int(row[PLACEMENT["local_offset"]]))
            full[tuple(slice(s, s + e) for s, e in zip(start, extent))] = \
                local.cpu().numpy().view(np.uint16)
        rows = placements[id(dst)]
        for row in rows[rows[:, PLACEMENT["tensor"]] == dst._tensor_index[name]]:
            buf = dst.buffers[int(row[PLACEMENT["buffer"]])]
            start, extent, _ = placement_box(row, len(meta.shape))
            if tuple(extent) != tuple(buf.shape):
                continue  # a local tensor of several pieces (SwiGLU's fc1): not sampled
            box = full[tuple(slice(s, s + e) for s, e in zip(start, extent))]
            fmt = formats.get(name)
            got = dst_t[(buf.rank, buf.key)].view(torch.uint8 if fmt else torch.int16)
            got = got.cpu().numpy()
            if fmt is None:
                ok = np.array_equal(got.view(np.uint16), box)
            else:
                q, s = quantize.transform(np.ascontiguousarray(box), "bf16", fmt.dst)
                ok = np.array_equal(got, q) and np.array_equal(
                    scales[(buf.rank, buf.key)].cpu().numpy(), s)
            if not ok:
                raise AssertionError(f"FP8 loopback refit wrong in {name} on rank {buf.rank}")
    return len(names)


if __name__ == "__main__":
    main()
