"""GPU timing helpers: CUDA events, medians, and the device-to-device copy ceiling."""

from __future__ import annotations

import statistics


def time_cuda(fn, iters: int = 20, warmup: int = 3) -> dict:
    """Median / min / max milliseconds of fn() measured with CUDA events on the current stream."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(samples), "min_ms": min(samples),
            "max_ms": max(samples)}


def copy_ceiling(nbytes: int = 4 << 30, iters: int = 20) -> dict:
    """Plain device-to-device copy: GB/s counting bytes read plus bytes written."""
    import torch
    a = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_cuda(lambda: b.copy_(a), iters)
    return {"bytes": nbytes, **t, "gbps_rw": 2 * nbytes / t["median_ms"] / 1e6}


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name()
