"""Malformed input: RefitError on every rank, naming tensor, ranks and reason, before any byte
moves, with the destination left bit-identical. Also: a dead peer mid-refit, repeated refits."""

import os
import resource

import pytest
import torch

import refit_engine
from refit_engine import RefitError, ShardedTensors, Split

from multiproc import run_world

SHAPES = {"fc1": (32, 16), "proj": (16, 24), "norm": (16,)}


def _globals(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in SHAPES.items()}


def _model(rank, tp, globals_, poison=None, ranks=(0, 1), shapes=SHAPES, dtype=torch.bfloat16):
    """TP over `ranks` (replicas beyond tp); None off those ranks."""
    if rank not in ranks:
        return None
    part = ranks.index(rank) % tp
    m = ShardedTensors()
    for name, shape in shapes.items():
        split = Split(0, tp) if tp > 1 and len(shape) == 2 else None
        full = globals_[name] if name in globals_ else torch.zeros(shape, dtype=dtype)
        local = full.chunk(tp, 0)[part].clone() if split else full.clone()
        if poison is not None:
            local.view(torch.uint8).fill_(poison)
        m.add(name, local.to(dtype).contiguous(), shape, split, part)
    return m


def _bad_cases(rank):
    """name -> (function returning (src, dst, plan kwargs), expected tensor, expected ranks,
    words in the reason). Every case is wrong on some rank only or on all ranks."""
    g = _globals()

    def base(**kw):
        return _model(rank, 2, g), _model(rank, 1, g, poison=0xA5), kw

    def drop(model, name):
        if model is not None:
            model.entries = [e for e in model.entries if e.name != name]
            model.tensors.pop(name, None)
        return model

    def missing_in_src():
        s, d, kw = base()
        return drop(s, "norm"), d, kw

    def missing_in_dst():
        s, d, kw = base()
        return s, drop(d, "norm"), kw

    def extra_tensor():
        s, d, kw = base()
        s.add("extra", torch.zeros(4), (4,))
        return s, d, kw

    def shape_mismatch():
        shapes = dict(SHAPES, proj=(16, 20))
        return _model(rank, 2, g), _model(rank, 1, {}, 0xA5, shapes=shapes), {}

    def dtype_mismatch():
        return _model(rank, 2, g), _model(rank, 1, g, 0xA5, dtype=torch.float32), {}

    def empty_dtype_mismatch():  # zero-size tensors are checked in Python (local.py)
        s, d = _model(rank, 2, g), _model(rank, 1, g, 0xA5)
        s.add("empty", torch.zeros(0, 4, dtype=torch.bfloat16), (0, 4))
        d.add("empty", torch.zeros(0, 4, dtype=torch.float32), (0, 4))
        return s, d, {}

    def tp_does_not_divide():
        s = ShardedTensors()
        s.add("fc1", torch.zeros(11, 16, dtype=torch.bfloat16), (32, 16), Split(0, 3), rank)
        return s, _model(rank, 1, g, 0xA5), {}

    def ep_does_not_divide():
        from refit_engine.harness.grid import ParallelGrid
        ParallelGrid(2, ep=2).expert_holders(0, num_experts=3)
        raise AssertionError("unreachable")

    def part_out_of_range():
        s = ShardedTensors()
        s.add("fc1", torch.zeros(16, 16, dtype=torch.bfloat16), (32, 16), Split(0, 2), 2)
        return s, _model(rank, 1, g, 0xA5), {}

    def missing_shard():
        s, d, kw = base()
        if rank == 1:
            drop(s, "fc1")
        return s, d, kw

    def overlapping_sources():
        s = _model(rank, 2, g)
        if rank == 1:  # claims rows 8:24 of fc1 instead of 16:32
            s.entries = [e for e in s.entries if e.name != "fc1"]
            s.tensors.pop("fc1")
            s.add("fc1", torch.zeros(16, 16, dtype=torch.bfloat16), (32, 16),
                  Split(0, 4), 1, part_shape=(8, 16))
            s.add("fc1", s.tensors["fc1"], (32, 16), Split(0, 4), 2, offset=8 * 16, part_shape=(8, 16))
        return s, _model(rank, 1, g, 0xA5), {}

    def dst_not_covered():
        s, d, kw = base()
        bigger = torch.zeros(17, 24, dtype=torch.bfloat16)
        drop(d, "proj")
        d.add("proj", bigger, (16, 24), part_shape=(16, 24))
        return s, d, kw

    def non_contiguous():
        s, d, kw = base()
        if rank == 1:
            t = torch.zeros(24, 16, dtype=torch.bfloat16).t()
            drop(d, "proj")
            d.add("proj", t.contiguous(), (16, 24))
            d.tensors["proj"] = t
        return s, d, kw

    def meta_tensor():
        s, d, kw = base()
        if rank == 0:
            drop(d, "norm")
            d.add("norm", torch.empty(16, dtype=torch.bfloat16, device="meta"), (16,))
        return s, d, kw

    def unsupported_dtype():
        s, d, kw = base()
        if rank == 1:
            s.add("cplx", torch.zeros(4, dtype=torch.complex64), (4,))
        return s, d, kw

    def too_many_dims():
        s, d, kw = base()
        s.add("five_d", torch.zeros(1, 1, 1, 1, 2), (1, 1, 1, 1, 2))
        return s, d, kw

    def overlapping_ranks_non_collocated():
        s, d, kw = base()
        return s, d, dict(mode="non-collocated")

    def not_collocated():
        return _model(rank, 1, g, ranks=(0,)), _model(rank, 1, g, 0xA5, ranks=(1,)), \
            dict(mode="collocated")

    def ranks_disagree_on_plan():
        s, d, kw = base()
        return s, d, dict(bucket_bytes=1024 if rank == 0 else 2048)

    def bad_bucket_budget():
        s, d, kw = base()
        return s, d, dict(bucket_bytes=0)

    def wrong_group_claim():
        s, d, kw = base()
        s.claimed_ranks = {0, 1, 2, 3}  # a model built for a world of 4
        return s, d, kw

    def key_bound_twice():
        s, d, kw = base()
        s.add("norm", torch.zeros(16, dtype=torch.bfloat16), (16,))
        return s, d, kw

    def tensor_smaller_than_declared():
        s, d, kw = base()
        drop(d, "fc1")
        d.add("fc1", torch.zeros(16, 16, dtype=torch.bfloat16), (32, 16), part_shape=(32, 16))
        return s, d, kw

    return {
        "tensor missing in source": (missing_in_src, "norm", [0, 1], "missing from the source"),
        "tensor missing in destination": (missing_in_dst, "norm", [0, 1], "extra tensor"),
        "extra tensor": (extra_tensor, "extra", [0, 1], "extra tensor"),
        "global shape mismatch": (shape_mismatch, "proj", [0, 1], "global shape differs"),
        # dtypes named, not numbered (the plan compiler's table, _core.DTYPE_NAMES)
        "dtype mismatch": (dtype_mismatch, "fc1", [0, 1],
                           "dtype differs between source and destination (bfloat16 and float32)"),
        "dtype mismatch, empty tensor": (empty_dtype_mismatch, "empty", [0, 1],
                                         ("dtype differs between source and destination "
                                          "(bfloat16 and float32)")),
        "TP does not divide": (tp_does_not_divide, "fc1", [0], "does not divide"),
        "EP does not divide experts": (ep_does_not_divide, "*", [0, 1], "do not divide"),
        "part out of range": (part_out_of_range, "fc1", None, "out of range"),
        "source shard missing": (missing_shard, "fc1", [0], "cover"),
        "overlapping source pieces": (overlapping_sources, "fc1", None, "overlap"),
        "destination element never written": (dst_not_covered, "proj", None, "never be written"),
        "non-contiguous tensor": (non_contiguous, "proj", [1], "not contiguous"),
        "meta tensor": (meta_tensor, "norm", [0], "meta"),
        "unsupported dtype": (unsupported_dtype, "cplx", None, "unsupported dtype"),
        "more than 4 dims": (too_many_dims, "five_d", None, "at most 4"),
        "overlapping ranks, non-collocated": (overlapping_ranks_non_collocated, "*", [0, 1],
                                              "hold both models"),
        "collocated promise broken": (not_collocated, "*", [0, 1], "different ranks"),
        "ranks disagree on the plan": (ranks_disagree_on_plan, "*", [0, 1], "disagree"),
        "bad bucket budget": (bad_bucket_budget, "*", None, "bucket_bytes"),
        "model claims a bigger world": (wrong_group_claim, "*", [0, 2, 3], "outside the refit group"),
        "local key bound to two tensors": (key_bound_twice, "norm", None, "two different tensors"),
        "local tensor smaller than declared": (tensor_smaller_than_declared, "fc1", [0],
                                               "reaches elements"),
    }


def _bad_input_worker(rank, world):
    results = {}
    for name, (make, tensor, ranks, words) in _bad_cases(rank).items():
        snapshot = None
        try:
            src, dst, kwargs = make()
            snapshot = {k: v.clone() for k, v in dst.tensors.items()
                        if v.device.type != "meta"} if dst else {}
            refit_engine.plan(src, dst, **kwargs)
            results[name] = "no error"
        except RefitError as exc:
            unchanged = all(torch.equal(dst.tensors[k], v) for k, v in (snapshot or {}).items())
            results[name] = (exc.tensor, exc.ranks, exc.reason, unchanged)
        torch.distributed.barrier()
    return results


def test_bad_input_matrix():
    per_rank = run_world(_bad_input_worker, 2)
    cases = _bad_cases(0)
    assert len(cases) >= 20
    for name, (_, tensor, ranks, words) in cases.items():
        outcomes = [r[name] for r in per_rank]
        for rank, outcome in enumerate(outcomes):
            assert outcome != "no error", f"{name}: rank {rank} did not raise"
            got_tensor, got_ranks, reason, unchanged = outcome
            assert words in reason, (name, reason)
            assert got_tensor == tensor, (name, got_tensor)
            if ranks is not None:
                assert got_ranks == ranks, (name, got_ranks)
            assert unchanged, f"{name}: destination changed on rank {rank}"
        # The same error on every rank.
        assert len({(o[0], tuple(o[1]), o[2]) for o in outcomes}) == 1, (name, outcomes)



def _stale_plan_worker(rank, world):
    g = _globals(1)
    src, dst = _model(rank, 2, g), _model(rank, 1, g, poison=0xA5)
    owner = torch.nn.Parameter(src.tensors["proj"], requires_grad=False)
    src.current["proj"] = owner  # as the megatron adapter records parameters
    plan = refit_engine.plan(src, dst)
    refit_engine.execute(plan)
    if rank == 1:  # the training side swaps a weight for one of another shape
        owner.data = torch.zeros(4, 4, dtype=torch.bfloat16)
    before = {k: v.clone().fill_(0) for k, v in dst.tensors.items()}
    for k, v in dst.tensors.items():
        v.copy_(before[k])
    with pytest.raises(RefitError) as info:
        refit_engine.execute(plan)
    assert all(torch.equal(dst.tensors[k], v) for k, v in before.items())
    return info.value.tensor, info.value.ranks, info.value.reason


def test_plan_reused_after_tensor_replaced():
    results = run_world(_stale_plan_worker, 2)
    assert results[0] == results[1]
    tensor, ranks, reason = results[0]
    assert tensor == "proj" and ranks == [1] and "replaced after planning" in reason


def _dead_peer_worker(rank, world):
    import time

    from refit_engine.executors.cpu import GlooExecutor
    shapes = {"fc1": (48, 16), "proj": (24, 24), "norm": (16,)}
    g = {n: torch.randn(s, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
         for n, s in shapes.items()}
    ranks = (0, 1, 2)
    src = _model(rank, 3, g, ranks=ranks, shapes=shapes)
    dst = _model(rank, 1, {}, poison=0xA5, ranks=ranks, shapes=shapes)
    plan = refit_engine.plan(src, dst, bucket_bytes=64, timeout_s=5.0)
    assert plan.rank_plan.num_buckets > 4
    if rank == 2:  # dies in the middle of the refit, after bucket 3 is on its way
        real_post = GlooExecutor._post

        def post_then_die(self, bucket):
            if bucket == 3:
                os._exit(3)
            return real_post(self, bucket)
        plan.executor._post = post_then_die.__get__(plan.executor)
    t0 = time.perf_counter()
    with pytest.raises(RefitError) as info:
        refit_engine.execute(plan, check=False)
    elapsed = time.perf_counter() - t0
    with pytest.raises(RefitError, match="unusable"):
        refit_engine.execute(plan, check=False)
    return elapsed, info.value.ranks, str(info.value)


def test_dead_peer_raises_within_timeout():
    results = run_world(_dead_peer_worker, 3, dying={2}, timeout=120)
    for rank in (0, 1):
        elapsed, ranks, message = results[rank]
        assert elapsed < 5.0 + 3.0, message  # the timeout, plus slack
        assert 2 in ranks, message


def _repeated_worker(rank, world, refits):
    g = _globals(3)
    src, dst = _model(rank, 2, g), _model(rank, 1, g, poison=0xA5)
    plan = refit_engine.plan(src, dst)
    rss = []
    for i in range(refits):
        fresh = _globals(100 + i)
        for key, t in src.tensors.items():
            part = rank % 2
            t.copy_(fresh[key].chunk(2, 0)[part] if t.dim() == 2 else fresh[key])
        refit_engine.execute(plan)
        for key, t in dst.tensors.items():
            assert torch.equal(t, fresh[key]), (i, key)
        if i in (refits // 10, refits - 1):
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return rss


def test_thousand_refits_exact_with_stable_memory():
    per_rank = run_world(_repeated_worker, 2, 1000, timeout=400)
    for early, late in per_rank:
        assert late - early < 8 * 1024, (early, late)  # KiB of peak RSS growth


def test_errors_kept_by_any_describer_are_raised(monkeypatch):
    # Whatever fills a ShardedTensors (the megatron adapter here) keeps add()'s problems for
    # plan() to raise on every rank; describe() must raise them for every kind of model.
    from refit_engine import megatron_layout as megatron, refit
    kept = ShardedTensors()
    kept.add("w", [1, 2, 3], (3,))  # not an array: recorded, not raised
    monkeypatch.setattr(megatron, "describe", lambda model: kept)
    with pytest.raises(RefitError, match="cannot be refit") as info:
        refit.describe(object())
    assert info.value.tensor == "w"


def test_bound_object_that_is_not_an_array():
    from refit_engine.layouts import BufferMeta
    from refit_engine.local import checked_info
    meta = BufferMeta(3, "w", (4,), "float32")
    with pytest.raises(RefitError, match="destination local tensor 'w' cannot be refit") as info:
        checked_info(meta, [0.0] * 4, "destination")
    assert info.value.tensor == "w" and info.value.ranks == [3]


def test_ranks_disagreeing_on_a_tensor_name_the_later_rank():
    from refit_engine.local import build_layout
    per_rank = []
    for rank, shape in ((0, (8, 4)), (1, (8, 8))):
        local = ShardedTensors()
        local.add("w", torch.zeros(shape), shape)
        per_rank.append((rank, local.entries))
    with pytest.raises(RefitError, match="declared twice with different metadata") as info:
        build_layout(per_rank)
    assert info.value.tensor == "w" and info.value.ranks == [1]
