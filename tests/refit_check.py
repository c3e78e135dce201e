"""Shared test helper: compile a refit, run the reference executor, compare bit for bit."""

from __future__ import annotations

import numpy as np

from refit_engine import Layout, Split, compile_plans
from refit_engine.harness.grid import ParallelGrid
from refit_engine.tables import MSG, SEG
from refit_engine.executors.reference import materialize, random_globals, run_reference

POISONS = (0xA5, 0x5A)


def dense(world, tp, name="w", shape=(16, 12), dim=0, stride=1, blocks=None, offset=0, pp=1,
          dtype="bfloat16"):
    """One tensor split over TP (on `dim`, with `stride` or packed `blocks`), DP replicas
    beyond, on `world` ranks from `offset`."""
    layout = Layout()
    grid = ParallelGrid(world, tp=tp, pp=pp, offset=offset)
    split = Split(dim, tp, stride=stride, blocks=blocks) if tp > 1 or blocks else None
    layout.place(name, shape, dtype, grid.dense_holders(), split)
    return layout


def check_refit(src, dst, bucket_bytes=1 << 20, seed=0, ranks_per_node=0):
    """Refit fresh random globals from `src` to `dst` with the reference executor.

    The destination is poisoned first, with two different poisons on two runs, so an element
    the plan never writes cannot match the expected value by chance. Returns the plans.
    """
    plans = compile_plans(src, dst, bucket_bytes=bucket_bytes, ranks_per_node=ranks_per_node)
    check_pairing(plans, bucket_bytes)
    rng = np.random.default_rng(seed)
    for poison in POISONS:
        globals_ = random_globals(src, rng)
        src_buffers = materialize(src, globals_)
        dst_buffers = materialize(dst, poison=poison)
        run_reference(plans, src, dst, src_buffers, dst_buffers)
        expected = materialize(dst, globals_)
        for key, want in expected.items():
            got = dst_buffers[key]
            if not np.array_equal(got, want):
                bad = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
                raise AssertionError(f"destination buffer {key}: {bad.size} of {want.size} "
                                     f"elements differ (first at {bad[0]})")
    return plans


def check_pairing(plans, bucket_bytes):
    """Sender and receiver lists match in order and size; messages respect the budget."""
    for rank, plan in plans.items():
        assert (plan.send_messages[:, MSG["bytes"]] <= bucket_bytes).all()
        assert (plan.recv_messages[:, MSG["bytes"]] <= bucket_bytes).all()
        for peer in np.unique(plan.send[:, SEG["peer"]]):
            other = plans[int(peer)]
            mine = plan.send[plan.send[:, SEG["peer"]] == peer]
            theirs = other.recv[other.recv[:, SEG["peer"]] == rank]
            cols = [SEG["tensor"], SEG["bucket"], SEG["rows"], SEG["row_bytes"], SEG["dst_offset"]]
            their_cols = [SEG["tensor"], SEG["bucket"], SEG["rows"], SEG["row_bytes"], SEG["src_offset"]]
            # Same pieces in the same order; the staging offsets are each rank's own, so compare
            # offsets relative to each message's start.
            assert np.array_equal(mine[:, cols[:4]], theirs[:, their_cols[:4]]), (rank, int(peer))
            sent = plan.send_messages[plan.send_messages[:, MSG["peer"]] == peer]
            got = other.recv_messages[other.recv_messages[:, MSG["peer"]] == rank]
            assert np.array_equal(sent[:, [MSG["bucket"], MSG["bytes"]]],
                                  got[:, [MSG["bucket"], MSG["bytes"]]]), (rank, int(peer))
            for (b, off), (b2, off2) in zip(sent[:, [1, 2]], got[:, [1, 2]]):
                in_mine = mine[mine[:, SEG["bucket"]] == b][:, SEG["dst_offset"]] - off
                in_theirs = theirs[theirs[:, SEG["bucket"]] == b2][:, SEG["src_offset"]] - off2
                assert np.array_equal(in_mine, in_theirs), (rank, int(peer), int(b))
