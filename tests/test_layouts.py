"""Every layout kind, refit through the planner and the reference executor, bit-exact."""

import numpy as np
import pytest

from refit_engine import Layout, RefitError, Split
from refit_engine.harness.grid import ParallelGrid
from refit_engine.executors.reference import assemble, materialize, random_globals

from refit_check import check_refit, dense


def test_replicated_to_replicated_across_world_sizes():
    src, dst = Layout(), Layout()
    src.place("norm", (10,), "float32", [(r, 0) for r in range(2)])
    dst.place("norm", (10,), "float32", [(r, 0) for r in range(4)])
    plans = check_refit(src, dst)
    assert plans[0].bytes_local == 40 and plans[2].bytes_received == 40


@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("src_tp,dst_tp", [(2, 1), (1, 4), (4, 2), (2, 4)])
def test_tp_on_any_dim(dim, src_tp, dst_tp):
    shape = (8, 12, 16)
    check_refit(dense(4, src_tp, shape=shape, dim=dim), dense(4, dst_tp, shape=shape, dim=dim))


def test_tp_changes_dim():
    check_refit(dense(2, 2, dim=0), dense(2, 2, dim=1))


def test_partition_stride_swiglu():
    """fc1 keeps [gate_i; up_i] per rank: stride 2 on dim 0."""
    src = dense(4, 4, shape=(32, 6), stride=2)
    dst = dense(4, 2, shape=(32, 6), stride=2)
    check_refit(src, dst)
    # Rank 1 of TP4 holds gate rows 4:8 and up rows 20:24, in that order.
    g = {"w": np.arange(32 * 6, dtype=np.uint16).reshape(32, 6)}
    local = materialize(src, g)[(1, "w")]
    assert np.array_equal(local, np.concatenate([g["w"][4:8], g["w"][20:24]]))


def test_stride_to_plain_split():
    check_refit(dense(4, 4, shape=(32, 6), stride=2), dense(4, 4, shape=(32, 6)))


def test_block_interleaved_packed():
    """Packed q/k/v with per-rank block sizes [4, 2, 2]: global dim = 4*tp + 2*tp + 2*tp."""
    src = dense(2, 2, shape=(16, 4), blocks=(4, 2, 2))
    dst = dense(4, 4, shape=(16, 4), blocks=(2, 1, 1))
    check_refit(src, dst)
    g = {"w": np.arange(16 * 4, dtype=np.uint16).reshape(16, 4)}
    local = materialize(src, g)[(1, "w")]
    w = g["w"]
    assert np.array_equal(local, np.concatenate([w[4:8], w[10:12], w[14:16]]))


def moe(world, ep, etp=1, experts=8, grouped=False, offset=0, shape=(8, 6)):
    """Per-expert tensors named by global expert index; grouped: one local buffer per rank."""
    grid = ParallelGrid(world, ep=ep, etp=etp, offset=offset)
    layout = Layout()
    per_rank = experts // ep
    for e in range(experts):
        holders = grid.expert_holders(e, experts)
        split = Split(0, etp) if etp > 1 else None
        local_shape = split.local_shape("x", shape) if split else shape
        for rank, part, local in holders:
            kwargs = {}
            if grouped:
                kwargs = dict(key="experts.fc1", buffer_shape=(per_rank,) + local_shape,
                              offset=local * int(np.prod(local_shape)))
            layout.place(f"experts.{e}.fc1", shape, "bfloat16", [(rank, part)], split, **kwargs)
    return layout


@pytest.mark.parametrize("src_ep,dst_ep", [(2, 4), (4, 1), (1, 2)])
def test_ep_per_expert(src_ep, dst_ep):
    check_refit(moe(4, src_ep), moe(4, dst_ep))


@pytest.mark.parametrize("src_grouped,dst_grouped", [(True, True), (True, False), (False, True)])
def test_ep_grouped_experts(src_grouped, dst_grouped):
    check_refit(moe(4, 2, grouped=src_grouped), moe(4, 4, grouped=dst_grouped))


def test_expert_tp_independent_of_tp():
    # ETP 2 with EP 2 on 4 ranks -> ETP 1 with EP 4; a dense tensor keeps TP 4 on both sides.
    src, dst = moe(4, 2, etp=2), moe(4, 4, etp=1)
    for side, tp in ((src, 4), (dst, 2)):
        side.place("dense", (8, 8), "bfloat16", ParallelGrid(4, tp=tp).dense_holders(), Split(0, tp))
    check_refit(src, dst)


def test_grouped_expert_with_etp():
    check_refit(moe(4, 2, etp=2, grouped=True), moe(4, 1, etp=4, grouped=True))


def test_pipeline_stages():
    """PP 2 -> PP 1: local layer index -> global layer in the canonical name."""
    def model(world, pp, tp):
        grid = ParallelGrid(world, tp=tp, pp=pp)
        layout = Layout()
        for stage in range(pp):
            for layer in grid.stage_layers(4, stage):
                layout.place(f"layers.{layer}.w", (8, 4), "float32", grid.dense_holders(stage),
                             Split(0, tp) if tp > 1 else None)
        return layout
    check_refit(model(4, 2, 2), model(4, 1, 2))
    check_refit(model(4, 1, 4), model(4, 4, 1))


def test_dp_replicas_spread_senders():
    # TP1 DP4 -> TP1 DP4 on other ranks: each receiver takes a different replica.
    src = dense(4, 1, shape=(8, 8))
    dst = dense(4, 1, shape=(8, 8), offset=4)
    plans = check_refit(src, dst)
    senders = [int(p.recv[0, 1]) for r, p in sorted(plans.items()) if r >= 4]
    assert sorted(senders) == [0, 1, 2, 3]


def test_collocated_prefers_local_copy():
    plans = check_refit(dense(4, 1), dense(4, 1))
    assert all(p.bytes_sent == 0 and p.bytes_local == 16 * 12 * 2 for p in plans.values())


def test_non_collocated_rank_offset():
    plans = check_refit(dense(4, 4), dense(2, 2, offset=4))
    assert sorted(plans) == [0, 1, 2, 3, 4, 5]
    assert all(plans[r].bytes_local == 0 for r in plans)


def test_assemble_detects_replica_mismatch():
    layout = dense(2, 1)
    buffers = materialize(layout, random_globals(layout, np.random.default_rng(0)))
    buffers[(1, "w")][0, 0] ^= 1
    with pytest.raises(RefitError, match="replicas"):
        assemble(layout, buffers)


def test_scalar_and_1d_tensors():
    src, dst = Layout(), Layout()
    src.place("scale", (), "float32", [(0, 0), (1, 0)])
    dst.place("scale", (), "float32", [(0, 0), (1, 0), (2, 0)])
    src.place("bias", (12,), "float16", [(0, 0), (1, 1)], Split(0, 2))
    dst.place("bias", (12,), "float16", [(r, r) for r in range(3)], Split(0, 3))
    check_refit(src, dst)
