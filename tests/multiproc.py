"""Runs a function on N gloo ranks in fresh processes, so pytest alone runs multi-rank tests
(through the harness's spawner, refit_engine.harness.spawn)."""

from __future__ import annotations

import datetime

import torch.distributed as dist

from refit_engine.harness.spawn import failure_report, run_ranks


def _gloo_rank(rank, world, fn, args):
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        return fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_world(fn, world: int, *args, timeout: float = 240.0, dying=()):
    """fn(rank, world, *args) on `world` processes; returns the per-rank results in rank order
    (None for ranks in `dying`, which are expected to die without reporting).
    Raises AssertionError with every failing rank's traceback; kills stragglers after timeout."""
    results, failures = run_ranks(_gloo_rank, world, fn, args, timeout=timeout, dying=set(dying))
    if failures:
        raise AssertionError(failure_report(failures))
    return [results.get(r) for r in range(world)]
