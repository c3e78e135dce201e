"""Pack and unpack of one Kimi K2 rank's real segment table, against the copy ceiling.

Rank 0 of TP8/EP64 -> TP4/EP128 on 128 ranks (full width and expert count; --layers of the 61,
to fit one GPU). Pack = its send segments (sources -> one staging buffer), unpack = its receive
segments (staging -> destinations). In the same run: the plain device-to-device copy ceiling,
torch.cat packing of the same pieces, and a per-piece copy_ loop. Bandwidth counts bytes read
plus bytes written. The last line is one JSON object with the key figures.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from refit_engine import Planner, _core, dtypes
from refit_engine.compiler import SEG
from refit_engine.harness.grid import ParallelGrid
from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout
from refit_engine.harness.results import device_name, environment, results_dir, save_json
from refit_engine.harness.timing import copy_ceiling, time_cuda


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)

    cfg = KimiK2Config(num_layers=args.layers)
    src = kimi_k2_layout(cfg, ParallelGrid(128, tp=8, ep=64))
    dst = kimi_k2_layout(cfg, ParallelGrid(128, tp=4, ep=128))
    plan = Planner(src, dst, bucket_bytes=1 << 40).plan_rank(0)  # one bucket: the whole table
    print(f"[kernels] rank 0: {len(plan.send)} send segments ({plan.bytes_sent / 2**30:.2f} GiB), "
          f"{len(plan.recv)} receive segments ({plan.bytes_received / 2**30:.2f} GiB)", flush=True)

    def alloc(layout, fill):
        out = {}
        for i in layout.buffers_of(0):
            nbytes = layout.buffers[i].numel * dtypes.itemsize(layout.buffers[i].dtype)
            out[i] = (torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
                      if fill else torch.full((nbytes,), 0xA5, dtype=torch.uint8, device="cuda"))
        return out

    src_buf, dst_buf = alloc(src, True), alloc(dst, False)
    src_bases = np.zeros(len(src.buffers), np.int64)
    dst_bases = np.zeros(len(dst.buffers), np.int64)
    for i, t in src_buf.items():
        src_bases[i] = t.data_ptr()
    for i, t in dst_buf.items():
        dst_bases[i] = t.data_ptr()
    send, recv = plan.send, plan.recv
    staging = torch.empty(plan.bytes_sent, dtype=torch.uint8, device="cuda")
    inbox = torch.randint(0, 256, (plan.bytes_received,), dtype=torch.uint8, device="cuda")
    cols = [send[:, SEG[c]] for c in ("src_pitch", "dst_pitch", "rows", "row_bytes")]
    pack = _core.SegmentTable(src_bases[send[:, SEG["src_buffer"]]] + send[:, SEG["src_offset"]],
                              staging.data_ptr() + send[:, SEG["dst_offset"]], *cols)
    rcols = [recv[:, SEG[c]] for c in ("src_pitch", "dst_pitch", "rows", "row_bytes")]
    unpack = _core.SegmentTable(inbox.data_ptr() + recv[:, SEG["src_offset"]],
                                dst_bases[recv[:, SEG["dst_buffer"]]] + recv[:, SEG["dst_offset"]],
                                *rcols)
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731

    # The same pieces as torch views, for the baselines and the correctness check.
    def view(buffers, buffer, offset, pitch, rows, row_bytes):
        return buffers[buffer].as_strided((rows, row_bytes), (pitch, 1), offset)
    views = [view(src_buf, *(int(v) for v in s[[SEG["src_buffer"], SEG["src_offset"],
                                                 SEG["src_pitch"], SEG["rows"], SEG["row_bytes"]]]))
             for s in send]
    flat_out = [staging[o:o + r * b].view(r, b) for o, r, b in
                zip(send[:, SEG["dst_offset"]], send[:, SEG["rows"]], send[:, SEG["row_bytes"]])]

    # Correct first: the fused pack equals the copy_ loop, byte for byte (staging poisoned).
    staging.fill_(0xA5)
    pack.launch(stream())
    fused = staging.clone()
    staging.fill_(0x5A)
    for out, v in zip(flat_out, views):
        out.copy_(v)
    assert torch.equal(fused, staging), "fused pack differs from the copy_ loop"
    del fused
    dst_views = [view(dst_buf, *(int(v) for v in s[[SEG["dst_buffer"], SEG["dst_offset"],
                                                     SEG["dst_pitch"], SEG["rows"],
                                                     SEG["row_bytes"]]])) for s in recv]
    unpack.launch(stream())
    for v, o, r, b in zip(dst_views, recv[:, SEG["src_offset"]], recv[:, SEG["rows"]],
                          recv[:, SEG["row_bytes"]]):
        assert torch.equal(v, inbox[o:o + r * b].view(r, b)), "fused unpack wrong"
    print("[kernels] fused pack and unpack are bit-exact", flush=True)

    ceiling = copy_ceiling(iters=args.iters)
    rows = []

    def add(name, fn, nbytes):
        t = time_cuda(fn, args.iters)
        gbps = 2 * nbytes / t["median_ms"] / 1e6
        rows.append({"name": name, "bytes": nbytes, **t, "gbps_rw": gbps,
                     "of_ceiling": gbps / ceiling["gbps_rw"]})
        print(f"[kernels] {name}: {t['median_ms']:.3f} ms", flush=True)

    add("fused pack", lambda: pack.launch(stream()), plan.bytes_sent)
    add("fused unpack", lambda: unpack.launch(stream()), plan.bytes_received)
    # reshape(-1) copies pitched views first: that is what torch.cat packing costs a user.
    add("torch.cat pack", lambda: torch.cat([v.reshape(-1) for v in views], out=staging),
        plan.bytes_sent)
    add("copy_ loop pack", lambda: [o.copy_(v) for o, v in zip(flat_out, views)], plan.bytes_sent)

    print()
    print(f"{device_name()}: copy ceiling {ceiling['gbps_rw']:.0f} GB/s (read+write, "
          f"{ceiling['bytes'] >> 30} GiB copy); Kimi K2 rank 0 TP8/EP64 -> TP4/EP128, "
          f"{args.layers} layers")
    print(f"{'method':<18}{'bytes':>14}{'pieces':>8}{'median ms':>11}{'GB/s r+w':>10}{'of copy':>9}")
    for r in rows:
        pieces = len(recv) if "unpack" in r["name"] else len(send)
        print(f"{r['name']:<18}{r['bytes']:>14}{pieces:>8}{r['median_ms']:>11.3f}"
              f"{r['gbps_rw']:>10.0f}{r['of_ceiling']:>9.1%}")
    payload = {"bench": "kernels", "env": {**environment(__file__), "device": device_name()},
               "layers": args.layers, "ceiling": ceiling, "rows": rows,
               "send_segments": len(send), "recv_segments": len(recv)}
    out = os.environ.get("OUT")
    path = save_json(results_dir(__file__), "kernels", payload)
    if out:
        with open(os.path.join(out, path.name), "w") as f:
            json.dump(payload, f, indent=1)
    print(json.dumps({"device": device_name(), "ceiling_gbps": ceiling["gbps_rw"],
                      **{r["name"].replace(" ", "_") + "_of_ceiling": r["of_ceiling"] for r in rows}}))


if __name__ == "__main__":
    main()
