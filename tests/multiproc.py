"""Runs a function on N gloo ranks in fresh processes, so pytest alone runs multi-rank tests."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    try:
        import datetime

        import torch.distributed as dist
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        try:
            queue.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # report everything to the parent
        queue.put((rank, "error", (repr(exc), traceback.format_exc())))


def run_world(fn, world: int, *args, timeout: float = 240.0, dying=()):
    """fn(rank, world, *args) on `world` processes; returns the per-rank results in rank order
    (None for ranks in `dying`, which are expected to die without reporting).
    Raises AssertionError with every failing rank's traceback; kills stragglers after timeout."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    import queue as queue_mod
    import time
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world - len(dying):
            try:
                rank, kind, value = queue.get(timeout=1.0)
                (results if kind == "ok" else errors)[rank] = value
            except queue_mod.Empty:
                crashed = [r for r, p in enumerate(procs) if r not in dying and not p.is_alive()
                           and r not in results and r not in errors and p.exitcode != 0]
                if crashed:
                    errors["crash"] = (f"ranks {crashed} exited without reporting", "")
                    break
                if time.monotonic() > deadline:
                    raise
    except queue_mod.Empty:
        errors["timeout"] = (f"ranks {sorted(set(range(world)) - set(results) - set(errors) - set(dying))} "
                             f"did not finish within {timeout} s", "")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(f"rank {r}: {e[0]}\n{e[1]}" for r, e in sorted(errors.items(), key=str)))
    return [results.get(r) for r in range(world)]
