"""Every timing loop of the harness and the benchmarks: warm up, time, report medians.

- `time_host`: one process, a host clock (CPU work, or GPU work that synchronizes itself);
- `time_cuda`: one process, CUDA events on the current stream; `copy_ceiling` times a plain
  device-to-device copy with it (the bandwidth no copy kernel beats);
- `time_ranks` / `slowest`: every rank of a process group starts together (a barrier), each
  times itself; a collective figure is the slowest rank's. `timed_collective` is the main job's
  loop (one slowest-rank figure per iteration); `topology.measure` takes medians per rank.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist


def summary(samples: list[float]) -> dict:
    """median / min / max of `samples`, and the samples."""
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


def time_host(fn, repeats: int = 5, warmup: int = 1) -> dict:
    """Runs fn() `warmup` times untimed, then `repeats` times; seconds as median/min/max."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return summary(samples)


def time_cuda(fn, iters: int = 20, warmup: int = 3) -> dict:
    """Median / min / max milliseconds of fn() measured with CUDA events on the current stream."""
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
    a = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_cuda(lambda: b.copy_(a), iters)
    return {"bytes": nbytes, **t, "gbps_rw": 2 * nbytes / t["median_ms"] / 1e6}


def slowest(seconds: float, group=None, device: str = "cpu") -> float:
    """The largest of every rank's `seconds` (collective over `group`; a tensor on `device`,
    which must be one `group`'s backend can reduce)."""
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def time_ranks(fn, repeats: int, group=None, sync=None) -> list[float]:
    """This rank's seconds for each of `repeats` runs of fn(), every rank of `group` starting
    each run together (a barrier) so they contend as in a refit; `sync` (e.g.
    torch.cuda.synchronize) runs before the clock starts and before it stops. Collective."""
    samples = []
    for _ in range(repeats):
        dist.barrier(group=group)
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - t0)
    return samples


def timed_collective(fn, iters: int, each=None) -> list[float]:
    """Milliseconds of each of `iters` runs of fn() on every rank of the default group, started
    together; the slowest rank ends a run, so each figure is the largest over ranks.
    `each(i, ms)` after every run (e.g. a progress line). Collective; every rank returns the
    same list."""
    times = []
    for i in range(iters):
        (seconds,) = time_ranks(fn, 1)
        times.append(slowest(seconds) * 1e3)
        if each:
            each(i, times[-1])
    return times
