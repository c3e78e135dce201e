"""The drop-in `swap_model_weights`: its plan cache follows the models, ranks and options it
was built from, never reuses a plan another rank would not, and plans again after a failure or
a replaced tensor. Every refit is checked bit for bit against a fresh plan of the models just
passed, with the destination poisoned first."""

import pytest

pytest.importorskip("megatron.core")

from megatron_check import count_plans, poison
from multiproc import run_world


def _swap_and_check(original_plan, src, dst):
    """swap_model_weights(src, dst) into a poisoned dst; the names of wrong tensors, checked by a
    fresh plan of exactly these models (never executed)."""
    from refit_engine.megatron import swap_model_weights
    from refit_engine.verify import check_exact
    poison(dst)
    swap_model_weights(src, dst, refit_method="gloo", timeout_s=60)
    return check_exact(original_plan(src, dst, timeout_s=60))


def _collocated_worker(rank, world):
    original_plan, planned = count_plans()
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    from refit_engine.megatron import cached_plan, clear_caches
    cfg = KimiK2Config.toy(num_layers=2, num_experts=4)
    s, d = ParallelGrid(world, tp=2, ep=2), ParallelGrid(world, tp=1, ep=4)
    spg, dpg = build_process_groups(s), build_process_groups(d)
    src1 = build_kimi_k2(cfg, s, spg, seed=11)
    src2 = build_kimi_k2(cfg, s, spg, seed=33)
    dst = build_kimi_k2(cfg, d, dpg, seed=22)
    out = {}
    out["first"] = _swap_and_check(original_plan, src1, dst)
    out["new source"] = _swap_and_check(original_plan, src2, dst)
    out["plans after new source"] = len(planned)
    out["back to first"] = _swap_and_check(original_plan, src1, dst)
    out["plans after back"] = len(planned)  # (src1, dst) is still cached on every rank

    plan = cached_plan(src1, dst, timeout_s=60)
    if rank == 1:  # broken on one rank only: every rank must plan again
        plan.broken = "test: broken on rank 1"
    out["after broken"] = _swap_and_check(original_plan, src1, dst)
    out["plans after broken"] = len(planned)

    if rank == 2:  # a destination tensor replaced on one rank: every rank plans again
        param = next(dst[0].parameters())
        param.data = param.data.clone()
    out["after replaced tensor"] = _swap_and_check(original_plan, src1, dst)
    out["plans after replaced"] = len(planned)

    if rank == 3:  # one rank's cache cleared: every rank plans again
        clear_caches()
    out["after clear"] = _swap_and_check(original_plan, src1, dst)
    out["plans after clear"] = len(planned)

    # Other options are another plan; the earlier one stays cached.
    poison(dst)
    from refit_engine.megatron import swap_model_weights
    swap_model_weights(src1, dst, "gloo", timeout_s=60, bucket_bytes=1 << 16)
    out["small buckets"] = len(planned)
    out["same plan again"] = cached_plan(src1, dst, timeout_s=60) is \
        cached_plan(src1, dst, timeout_s=60)
    out["plans at end"] = len(planned)
    return out


def test_swap_model_weights_follows_source_and_replans_after_failures():
    for rank, out in enumerate(run_world(_collocated_worker, 4, timeout=400)):
        for name in ("first", "new source", "back to first", "after broken",
                     "after replaced tensor", "after clear"):
            assert out[name] == [], (rank, name, out[name][:5])
        assert out["plans after new source"] == 2, (rank, out)
        assert out["plans after back"] == 2, (rank, out)
        assert out["plans after broken"] == 3, (rank, out)
        assert out["plans after replaced"] == 4, (rank, out)
        assert out["plans after clear"] == 5, (rank, out)
        assert out["small buckets"] == 6 and out["same plan again"], (rank, out)
        assert out["plans at end"] == 6, (rank, out)  # the default-bucket plan stayed cached


def _bystander_worker(rank, world):
    """Source on ranks 0-1; two destinations on rank 2 and rank 3 in turn, so that each of
    ranks 2 and 3 holds neither model in every other refit."""
    original_plan, planned = count_plans()
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    cfg = KimiK2Config.toy(num_layers=2, num_experts=4)
    s = ParallelGrid(2, tp=2, ep=2)
    a, b = ParallelGrid(1, tp=1, offset=2), ParallelGrid(1, tp=1, offset=3)
    spg, apg, bpg = build_process_groups(s), build_process_groups(a), build_process_groups(b)
    src = build_kimi_k2(cfg, s, spg, seed=11) or None
    dst_a = build_kimi_k2(cfg, a, apg, seed=22) or None
    dst_b = build_kimi_k2(cfg, b, bpg, seed=33) or None
    out = {}
    for step, (dst, name) in enumerate([(dst_a, "a"), (dst_b, "b"), (dst_a, "a"),
                                        (dst_b, "b")]):
        out[f"{step}:{name}"] = _swap_and_check(original_plan, src, dst)
    out["plans"] = len(planned)
    return out


def test_swap_model_weights_ranks_holding_neither_model_agree():
    for rank, out in enumerate(run_world(_bystander_worker, 4, timeout=400)):
        for name, wrong in out.items():
            if name != "plans":
                assert wrong == [], (rank, name, wrong[:5])
        assert out["plans"] == 2, (rank, out)  # one plan per pair, reused on every rank


def test_clear_plan_cache_closes_every_plan_even_when_one_fails():
    import types

    from refit_engine import RefitError, megatron

    closed = []

    def plan(name, fails=False):
        def close():
            closed.append(name)
            if fails:
                raise RuntimeError(f"{name} cannot be released")
        return types.SimpleNamespace(plan=types.SimpleNamespace(close=close))

    saved = dict(megatron._PLANS)
    megatron._PLANS.clear()
    megatron._PLANS.update({"a": [plan("first"), plan("bad", fails=True)], "b": [plan("last")]})
    try:
        with pytest.raises(RefitError, match="1 plan.s. failed to close: RuntimeError: bad"):
            megatron.clear_plan_cache()
    finally:
        megatron._PLANS.clear()
        megatron._PLANS.update(saved)
    assert closed == ["first", "bad", "last"] and not megatron._PLANS.get("a")
