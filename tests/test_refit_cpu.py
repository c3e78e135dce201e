"""refit_engine.plan / execute on CPU over gloo, with plain tensors (ShardedTensors)."""

import numpy as np
import pytest
import torch

import refit_engine
from refit_engine import RefitError, ShardedTensors, Split
from refit_engine.harness.grid import ParallelGrid

from multiproc import run_world

SHAPES = {"fc1": (32, 16), "proj": (16, 24), "norm": (16,)}
SPLITS = {"fc1": (0, 2), "proj": (1, 1), "norm": None}


def global_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float32).to(torch.bfloat16)
            for n, s in SHAPES.items()}


def local_model(rank, grid, globals_, poison=None):
    """This rank's shards of every tensor under `grid` (None if the rank is not in it)."""
    holders = dict(grid.dense_holders())
    if rank not in holders:
        return None
    part = holders[rank]
    model = ShardedTensors()
    for name, shape in SHAPES.items():
        spec = SPLITS[name]
        split = Split(spec[0], grid.tp, stride=spec[1]) if spec and grid.tp > 1 else None
        if poison is not None:
            local = torch.full(split.local_shape(name, shape) if split else shape, poison,
                               dtype=torch.bfloat16)
        else:
            blocks = split.boxes(name, shape, part) if split else None
            full = globals_[name]
            local = full.clone() if split is None else torch.cat(
                [full.narrow(split.dim, start, size) for start, _, size in blocks], split.dim)
        model.add(name, local.contiguous(), shape, split, part)
    return model


def expected_local(rank, grid, globals_):
    return local_model(rank, grid, globals_)


def _refit_worker(rank, world, cases):
    out = []
    for src_grid, dst_grid, bucket in cases:
        globals_ = global_tensors(seed=len(out) + 7)
        src = local_model(rank, src_grid, globals_)
        dst = local_model(rank, dst_grid, globals_, poison=float("nan"))
        plan = refit_engine.plan(src, dst, bucket_bytes=bucket, timeout_s=60)
        for step in range(2):  # the plan is reused; new source values each step
            if step:
                globals_ = global_tensors(seed=100 + step)
                fresh = local_model(rank, src_grid, globals_)
                if src is not None:
                    for key, t in src.tensors.items():
                        t.copy_(fresh.tensors[key])
            stats = refit_engine.execute(plan)
            want = expected_local(rank, dst_grid, globals_)
            if dst is not None:
                for key, t in dst.tensors.items():
                    assert torch.equal(t.view(torch.int16), want.tensors[key].view(torch.int16)), \
                        (rank, key, src_grid, dst_grid)
        out.append(stats)
    return out


def test_tp_changes_collocated_and_not():
    g = ParallelGrid
    cases = [
        (g(4, tp=2), g(4, tp=1), 1 << 20),      # TP2 -> TP1
        (g(4, tp=1), g(4, tp=4), 1 << 20),      # TP1 -> TP4
        (g(4, tp=4), g(4, tp=2), 100),          # many buckets
        (g(2, tp=2), g(2, tp=1, offset=2), 1 << 20),  # non-collocated: ranks 0-1 -> 2-3
    ]
    stats = run_world(_refit_worker, 4, cases)
    # TP1 (DP4) -> TP4: every rank already holds everything, so it only copies locally.
    assert all(s[1]["bytes_sent"] == 0 and s[1]["bytes_received"] == 0 for s in stats)
    assert stats[0][0]["bytes_received"] > 0
    assert stats[2][3]["bytes_local"] == 0 and stats[2][3]["bytes_received"] > 0


def _bad_input_worker(rank, world):
    globals_ = global_tensors(1)
    src = local_model(rank, ParallelGrid(2, tp=2), globals_)
    dst = local_model(rank, ParallelGrid(2, tp=1), globals_, poison=0.0)
    if rank == 1:  # one rank hands a non-contiguous tensor
        t = dst.tensors["proj"]
        dst.tensors["proj"] = torch.empty(t.shape[::-1], dtype=t.dtype).t()
    before = {k: v.clone() for k, v in dst.tensors.items()}
    with pytest.raises(RefitError) as info:
        refit_engine.plan(src, dst)
    for k, v in dst.tensors.items():
        if k != "proj" or rank != 1:
            assert torch.equal(v, before[k])
    return str(info.value)


def test_bad_tensor_on_one_rank_raises_on_every_rank():
    messages = run_world(_bad_input_worker, 2)
    assert all("'proj'" in m and "[1]" in m and "not contiguous" in m for m in messages)


def _verify_worker(rank, world):
    from refit_engine.executors.cpu import GlooExecutor
    globals_ = global_tensors(3)
    src = local_model(rank, ParallelGrid(2, tp=2), globals_)
    dst = local_model(rank, ParallelGrid(2, tp=1, offset=0), globals_, poison=0.0)
    plan = refit_engine.plan(src, dst)
    before = {k: t.clone() for k, t in dst.tensors.items()}
    with pytest.raises(RefitError, match="verify=True needs sync=True"):
        refit_engine.execute(plan, verify=True, sync=False)  # refused before anything moves
    assert all(torch.equal(before[k], t) for k, t in dst.tensors.items())
    refit_engine.execute(plan, verify=True)  # clean refit: passes
    if rank == 1:  # corrupt one byte on the wire into rank 1
        real_wait = GlooExecutor._wait

        def corrupting_wait(self, works, bucket):
            real_wait(self, works, bucket)
            self._recv_staging[bucket % 2][5] ^= 0x10
        plan.executor._wait = corrupting_wait.__get__(plan.executor)
    with pytest.raises(RefitError) as info:
        refit_engine.execute(plan, verify=True)
    return info.value.tensor, info.value.ranks


def test_verify_reports_corrupted_tensor_by_name():
    results = run_world(_verify_worker, 2)
    assert results[0] == results[1]  # every rank raises the same error
    tensor, ranks = results[0]
    assert tensor in SHAPES and ranks == [0, 1]


def test_zero_copy_messages_chosen_per_side():
    """A message that is one contiguous piece goes straight from / into the tensor; others
    stay in staging. Pure NumPy: the selection logic of the NCCL executor."""
    from refit_engine.executors.cuda import _messages
    from refit_engine.tables import MSG, SEG, SEGMENT_FIELDS
    segs = np.zeros((3, len(SEGMENT_FIELDS)), dtype=np.int64)
    # peer 5: one contiguous segment; peer 6: two segments (one message, packed).
    for i, (peer, rows, pitch) in enumerate([(5, 4, 64), (6, 1, 64), (6, 2, 128)]):
        segs[i, [SEG["peer"], SEG["rows"], SEG["row_bytes"], SEG["src_pitch"], SEG["dst_pitch"]]] = \
            (peer, rows, 64, pitch, 64)
    msgs = np.array([[5, 0, 0, 256], [6, 0, 256, 192]], dtype=np.int64)
    tensor_addr = np.array([1000, 2000, 3000], dtype=np.int64)
    rows, keep = _messages(msgs, 0, segs, tensor_addr, "src", 1 << 20, {5: 1, 6: 2}, True)
    assert rows.tolist() == [[1, 1000, 256], [2, (1 << 20) + 256, 192]]
    assert keep.tolist() == [False, True, True]
    rows, keep = _messages(msgs, 0, segs, tensor_addr, "src", 1 << 20, {5: 1, 6: 2}, False)
    assert keep.all() and rows[0, 1] == 1 << 20
    assert MSG["bytes"] == 3
