"""What the main job and the sweep print at the end: the seed benchmark's summary ("Kimi K2
Refit Benchmark Summary ..."), one block per configuration with our layouts, prediction,
floor and megatron-core beside it, and the main job's last line, one JSON object."""

from __future__ import annotations

import statistics


def describe_layout(d: dict) -> str:
    """{"tp": 2, "pp": 1, "ep": 1, "etp": 2} -> "TP2/ETP2" (sizes of 1 left out, TP always)."""
    return "/".join(f"{k.upper()}{v}" for k, v in d.items() if v > 1 or k == "tp")


def summary_text(run_id: str, results: list[dict], nodes: str, ranks: int, backend: str) -> str:
    """The seed benchmark's summary of one or more configurations (the main job and the sweep),
    with our layouts, prediction, floor and megatron-core beside each."""
    gpus = f"{ranks}" if backend == "nccl" else f"0 ({ranks} CPU ranks, gloo)"
    lines = ["Kimi K2 Refit Benchmark Summary", "================================",
             f"Job ID: {run_id}", f"Nodes: {nodes}", f"Total GPUs: {gpus}", "", "Results:",
             "--------", ""]
    for r in results:
        c = r["config"]
        head = f"Config: TP {c['src']['tp']} -> TP {c['dst']['tp']} ({c['mode']}, {c['method']})"
        if r.get("error"):
            lines += [head, f"Failed: {r['error']}", ""]
            continue
        lines.append(f"{head}  [source {describe_layout(c['src'])}, destination "
                     f"{describe_layout(c['dst'])}]")
        t = r["ours_ms"]
        lines += [f"Mean refit time: {statistics.mean(t):.2f} ms",
                  f"Min refit time:  {min(t):.2f} ms",
                  f"Max refit time:  {max(t):.2f} ms"]
        if r.get("ours_graph_ms"):
            g = r["ours_graph_ms"]
            lines.append(f"CUDA graph replay: mean {statistics.mean(g):.2f} ms, min {min(g):.2f} "
                         f"ms, max {max(g):.2f} ms")
        if r.get("floor_ms") is not None:
            topo = r["topology"]
            lines.append(f"Predicted: {r['predicted_ms']:.2f} ms ({r['predicted_term']}); "
                         f"floor: {r['floor_ms']:.2f} ms ({r['floor_term']}); efficiency "
                         f"{r['efficiency']:.0%}; measured copy {topo['copy_gbps']:.0f} GB/s, "
                         f"link ({topo.get('intra_link', 'NVLink')}) "
                         f"{topo['intra_node_gbps']:.1f} GB/s")
        if r.get("megatron_ms"):
            m = r["megatron_ms"]
            lines.append(f"megatron-core refit: mean {statistics.mean(m):.2f} ms "
                         f"(speedup {statistics.median(m) / statistics.median(t):.2f}x)")
        lines.append(f"Bit-exact: {r['exact']}")
        lines.append("")
    return "\n".join(lines)


def key_figures(result: dict) -> dict:
    """The main job's last line: the key figures of one configuration's result."""
    ours_med = statistics.median(result["ours_ms"])
    meg_med = statistics.median(result["megatron_ms"]) if result["megatron_ms"] else None
    return {"exact": result["exact"], "ours_ms": ours_med, "megatron_ms": meg_med,
            "speedup": (meg_med / ours_med) if meg_med else None,
            "megatron_identical": result["megatron_exact"], "plan_s": result["plan_s"],
            "config": f"{describe_layout(result['config']['src'])} -> "
                      f"{describe_layout(result['config']['dst'])} ({result['config']['mode']})",
            "bytes_local": result["bytes"]["bytes_local"],
            "bytes_sent": result["bytes"]["bytes_sent"],
            "predicted_ms": result["predicted_ms"], "floor_ms": result["floor_ms"]}
