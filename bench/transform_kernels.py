"""The transform kernel (csrc/transform) on one Kimi K2 rank's quantized weights, against the
copy ceiling and against quantizing with torch ops.

Destination rank 0 of TP4/EP128 on 128 ranks (full width and expert count, --layers of the 61),
every local tensor whose Kimi K2 format (quantize.format_for) is fp8_block128: one table row
per whole local tensor (each starts on a 128 x 128 block), BF16 in. Three runs of the same
kernel: BF16 -> fp8_block128 (e4m3 + float32 scale_inv), BF16 -> MXFP8 (e4m3 + e8m0), BF16 ->
BF16 (the kernel as a plain copy). Bandwidth counts bytes read plus bytes written (scales
included); the ceiling is the plain device-to-device copy. Baseline: the same block
quantization with torch ops per tensor (amax over blocks, divide, clamp, cast), as a receiver
that refits BF16 first would run it. Every output is checked bit for bit against
refit_engine.quantize on one tensor before timing. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from refit_engine import _core, quantize
from refit_engine.harness.baselines.torch_quantize import block_quantize
from refit_engine.harness.grid import ParallelGrid
from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout
from refit_engine.harness.results import device_name, environment, results_dir, save_json
from refit_engine.harness.timing import copy_ceiling, time_cuda
from refit_engine.transforms import TensorFormat, TransformRows

def _table(tensors, outputs, scales, dst_fmt):
    """One row per whole local tensor, BF16 in."""
    rows = TransformRows()
    fmt = TensorFormat("bf16", dst_fmt)
    for (src, shape), out, scale in zip(tensors, outputs, scales):
        r, c = shape
        pitch = 0 if scale is None else (quantize.scale_shape(shape, dst_fmt)[1]
                                         * scale.element_size())
        rows.append(fmt, src.data_ptr(), out.data_ptr(), c * 2, c * out.element_size(), r, c,
                    scale.data_ptr() if scale is not None else 0, pitch)
    return _core.TransformTable(rows.table())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)

    cfg = KimiK2Config(num_layers=args.layers)
    dst = kimi_k2_layout(cfg, ParallelGrid(128, tp=4, ep=128))
    shapes = []
    for i in dst.buffers_of(0):
        b = dst.buffers[i]
        if len(b.shape) == 2 and quantize.format_for(b.key) == "fp8_block128":
            shapes.append(tuple(b.shape))
    elements = sum(r * c for r, c in shapes)
    print(f"[transform] rank 0 of TP4/EP128, {args.layers} layers: {len(shapes)} quantized local "
          f"tensors, {elements * 2 / 2**30:.2f} GiB of BF16", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = [((torch.randn(s, device="cuda", generator=gen) * 0.02).to(torch.bfloat16), s)
               for s in shapes]

    ceiling = copy_ceiling()
    result = {"device": device_name(), "layers": args.layers, "tensors": len(shapes),
              "bf16_gib": elements * 2 / 2**30, "copy_ceiling_gbps": ceiling["gbps_rw"],
              "env": environment()}
    for dst_fmt in ("fp8_block128", "mxfp8", "bf16"):
        outs = [torch.full(s, 0xA5, dtype=torch.uint8 if dst_fmt != "bf16" else torch.int16,
                           device="cuda") for _, s in tensors]
        scales = [None if dst_fmt == "bf16" else torch.full(
            quantize.scale_shape(s, dst_fmt), 0xA5,
            dtype=torch.float32 if dst_fmt == "fp8_block128" else torch.uint8, device="cuda")
            for _, s in tensors]
        table = _table([(t, s) for t, s in tensors], outs, scales, dst_fmt)
        stream = torch.cuda.current_stream().cuda_stream
        table.launch(stream)
        torch.cuda.synchronize()
        # Bit for bit against the reference on the first and the last tensor.
        for k in (0, len(tensors) - 1):
            bits = tensors[k][0].view(torch.int16).cpu().numpy().view(np.uint16)
            data, sc = quantize.transform(bits, "bf16", dst_fmt)
            got = outs[k].cpu().numpy().view(np.uint8)
            assert np.array_equal(got.ravel(), np.ascontiguousarray(data).view(np.uint8).ravel()), \
                f"{dst_fmt}: tensor {k} differs from the reference"
            if sc is not None:
                assert np.array_equal(scales[k].cpu().numpy().view(np.uint8).ravel(),
                                      np.ascontiguousarray(sc).view(np.uint8).ravel())
        t = time_cuda(lambda: table.launch(stream), iters=args.iters)
        out_bytes = elements * (2 if dst_fmt == "bf16" else 1) + sum(
            s.numel() * s.element_size() for s in scales if s is not None)
        moved = elements * 2 + out_bytes
        gbps = moved / t["median_ms"] / 1e6
        result[dst_fmt] = {"ms": t["median_ms"], "gbps": gbps,
                           "of_ceiling": gbps / ceiling["gbps_rw"], "bytes": moved, "exact": True}
        print(f"[transform] bf16 -> {dst_fmt:<13} {t['median_ms']:8.3f} ms  {gbps:7.0f} GB/s "
              f"({gbps / ceiling['gbps_rw']:.0%} of the {ceiling['gbps_rw']:.0f} GB/s copy "
              "ceiling)", flush=True)
        del outs, scales, table
    t = time_cuda(lambda: [block_quantize(x) for x, _ in tensors], iters=max(3, args.iters // 4))
    result["torch_block128"] = {"ms": t["median_ms"]}
    ours = result["fp8_block128"]["ms"]
    print(f"[transform] torch ops block quantization: {t['median_ms']:.3f} ms "
          f"({t['median_ms'] / ours:.1f}x the kernel)", flush=True)
    result["speedup_vs_torch"] = t["median_ms"] / ours
    path = save_json(results_dir(__file__), "transform_kernels", result)
    print(f"[transform] saved {path}")
    print(json.dumps({k: v for k, v in result.items() if k != "env"}))


if __name__ == "__main__":
    main()
