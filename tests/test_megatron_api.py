"""The drop-in `refit_engine.megatron.swap_model_weights` against megatron-core 0.19 / main's
API: its signature, refit_method checks (megatron's exception types and words), None returned
and our statistics through `stats=`, prepare_swap_model_weights and the cache functions, rank
offsets, destination pools, persistent-buffer dtype harmonization and the refresh_cache hook.
Every refit lands in a poisoned destination and is compared bit for bit with the source's
global weights through a fresh plan of the same models (refit_engine.verify.check_exact)."""

import inspect

import pytest

pytest.importorskip("megatron.core")

from megatron_check import POISON, count_plans, poison
from multiproc import run_world

# -- local checks: no process group needed, so they are made before any collective ------------

# megatron-core 0.19 / main's parameters (the installed megatron-core may be older: 0.16.1
# has the first three of swap_model_weights only).
MEGATRON_PARAMETERS = {
    "swap_model_weights": ["src_model", "target_model", "refit_method", "group",
                           "src_rank_offset", "dst_rank_offset", "transform", "num_dst_pools",
                           "dst_pool_index"],
    "prepare_swap_model_weights": ["src_model", "target_model", "group", "src_rank_offset",
                                   "dst_rank_offset"],
    "clear_all_caches": [], "clear_plan_cache": [], "clear_service_cache": [],
}


def test_signature_matches_megatron_core():
    """megatron-core's parameters, in its order, with its defaults (those of the installed
    megatron-core checked against it); ours follow, keyword-only."""
    from megatron.core.resharding import refit as theirs

    from refit_engine import megatron as ours
    for name, names in MEGATRON_PARAMETERS.items():
        got = list(inspect.signature(getattr(ours, name)).parameters.values())
        assert [p.name for p in got[:len(names)]] == names, name
        assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in got[:len(names)])
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in got[len(names):]), name
        if hasattr(theirs, name):
            want = list(inspect.signature(getattr(theirs, name)).parameters.values())
            assert [p.name for p in want] == names[:len(want)], name
            for mine, their in zip(got, want):
                assert mine.default == their.default, (name, mine.name)
    params = inspect.signature(ours.swap_model_weights).parameters
    assert params["refit_method"].default is inspect.Parameter.empty  # required, as megatron's
    assert [params[n].default for n in MEGATRON_PARAMETERS["swap_model_weights"][3:]] == \
        [None, 0, 0, None, 1, 0]


def test_refit_method_checked_like_megatron_before_any_collective():
    """No process group exists here: each error below is raised before any collective (a
    collective would raise RefitError 'not initialized' instead)."""
    import torch.distributed as dist

    from refit_engine import RefitError
    from refit_engine.megatron import REFIT_METHODS, UnsupportedTransformError, swap_model_weights
    assert not dist.is_initialized()
    assert set(REFIT_METHODS) == {"nccl", "gloo", "nvshmem", "nixl"}
    with pytest.raises(ValueError, match=r"^Unknown backend 'ucx'$"):
        swap_model_weights(None, None, "ucx")
    for value in (3, None, b"gloo", ["gloo"]):
        with pytest.raises(TypeError,
                           match=r"^refit_method must be a str backend name or a CopyService "
                                 r"instance$"):
            swap_model_weights(None, None, value)
    with pytest.raises(TypeError):
        swap_model_weights(None, None)  # required, as in megatron-core
    # Accepted names and a CopyService instance get past the check, to the first collective.
    from megatron.core.resharding.copy_services.base import CopyService

    class Service(CopyService):
        def submit_send(self, *args, **kwargs): ...
        def submit_recv(self, *args, **kwargs): ...
        def run(self): ...

    service = Service.__new__(Service)  # its __init__ (0.19) would need a process group
    for method in [*REFIT_METHODS, service]:
        with pytest.raises(RefitError, match="not initialized"):
            swap_model_weights(None, None, method)
    with pytest.raises(UnsupportedTransformError, match="transform=object") as info:
        swap_model_weights(None, None, "gloo", transform=object())
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, RefitError)
    for kwargs, words in (({"num_dst_pools": 0}, "num_dst_pools"),
                          ({"num_dst_pools": 2, "dst_pool_index": 2}, "dst_pool_index"),
                          ({"src_rank_offset": 1.5}, "src_rank_offset"),
                          ({"stats": []}, "stats")):
        with pytest.raises(RefitError, match=words):
            swap_model_weights(None, None, "gloo", **kwargs)


# -- multi-rank: toy Kimi K2 (MLA, MoE, fp32 expert_bias, bf16 parameters) on CPU / gloo --------

def _wrong(original_plan, src, dst, group=None):
    """The destination tensors of this rank that differ from the source (a fresh plan of these
    models, never executed; collective), and how many were checked."""
    from refit_engine.verify import check_exact
    plan = original_plan(src, dst, group=group, timeout_s=60)
    wrong = check_exact(plan)
    plan.close()
    return wrong, len(plan.dst_tensors)


def _expert_biases(model):
    return {n: b for chunk in model or [] for n, b in chunk.named_buffers()
            if n.endswith("expert_bias")}


def _collocated_worker(rank, world):
    import dataclasses

    import torch

    from refit_engine import RefitError
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    from refit_engine.megatron import (
        clear_all_caches,
        clear_caches,
        prepare_swap_model_weights,
        swap_model_weights,
    )
    original_plan, planned = count_plans()
    cfg = KimiK2Config.toy(num_layers=2, num_experts=4)
    s, d = ParallelGrid(world, tp=2, ep=2), ParallelGrid(world, tp=1, ep=4)
    spg, dpg = build_process_groups(s), build_process_groups(d)
    src = build_kimi_k2(cfg, s, spg, seed=11)
    dst = build_kimi_k2(cfg, d, dpg, seed=22)
    out = {"clear_caches is clear_all_caches": clear_caches is clear_all_caches}

    # None returned, statistics through stats=
    poison(dst)
    stats = {"stale": 1}
    out["returned"] = swap_model_weights(src, dst, "gloo", stats=stats, timeout_s=60)
    out["stats"] = stats
    out["first"] = _wrong(original_plan, src, dst)
    out["plans after first"] = len(planned)

    # prepare, then swap: planned once, by prepare
    clear_all_caches()
    out["prepare returned"] = prepare_swap_model_weights(src, dst, timeout_s=60)
    out["plans after prepare"] = len(planned)
    poison(dst)
    swap_model_weights(src, dst, "nccl", timeout_s=60)  # a name, not an executor: CPU, gloo
    out["after prepare"] = _wrong(original_plan, src, dst)
    out["plans after swap"] = len(planned)

    # clear_all_caches on one rank: every rank plans again
    if rank == 2:
        clear_all_caches()
    poison(dst)
    swap_model_weights(src, dst, "gloo", timeout_s=60)
    out["after clear"] = _wrong(original_plan, src, dst)
    out["plans after clear"] = len(planned)

    # expert_bias bf16 on the destination (as Float16Module leaves an inference model), fp32
    # on the source: the destination takes fp32 and the source's values, no error
    biases = {}
    for chunk in dst:
        for module in chunk.modules():
            if module._buffers.get("expert_bias") is not None:
                module.expert_bias = module.expert_bias.to(torch.bfloat16)
    out["bf16 biases before"] = sorted({str(b.dtype) for b in _expert_biases(dst).values()})
    poison(dst)
    swap_model_weights(src, dst, "gloo", timeout_s=60)
    biases = _expert_biases(dst)
    out["bias dtypes after"] = sorted({str(b.dtype) for b in biases.values()})
    out["bias count"] = len(biases)
    source_biases = _expert_biases(src)
    out["bias values"] = all(torch.equal(biases[n], source_biases[n]) for n in biases)
    out["after harmonize"] = _wrong(original_plan, src, dst)
    out["plans after harmonize"] = len(planned)

    # refresh_cache (megatron-core main) on destination MegatronModules, after the data landed
    seen = []
    chunk = dst[0]
    weight = chunk.decoder.final_layernorm.weight
    chunk.refresh_cache = lambda: seen.append(weight.detach().clone())
    poison(dst)
    swap_model_weights(src, dst, "gloo", timeout_s=60)
    want = dict(src[0].named_parameters())["decoder.final_layernorm.weight"]
    out["refresh calls"] = len(seen)
    out["refreshed after landing"] = bool(seen) and torch.equal(seen[0], want.detach())
    del chunk.refresh_cache

    # parameters of another dtype: refused on every rank, both dtypes named, nothing written
    dst32 = build_kimi_k2(dataclasses.replace(cfg, dtype="float32"), d, dpg, seed=22)
    poison(dst32)
    try:
        swap_model_weights(src, dst32, "gloo", timeout_s=60)
        out["dtype error"] = None
    except RefitError as exc:
        out["dtype error"] = (exc.tensor, tuple(exc.ranks), exc.reason)
    out["dtype untouched"] = all(
        bool((t.data.view(torch.uint8) == POISON).all())
        for t in list(dst32[0].parameters()) + list(dst32[0].buffers()))
    return out


def test_collocated_api():
    per_rank = run_world(_collocated_worker, 4, timeout=500)
    for rank, out in enumerate(per_rank):
        assert out["clear_caches is clear_all_caches"]
        assert out["returned"] is None and out["prepare returned"] is None, rank
        stats = out["stats"]
        assert "stale" not in stats and stats["rank"] == rank, stats
        assert len(stats["passes"]) == 1 and stats["passes"][0]["rank"] == rank
        assert stats["bytes_local"] + stats["bytes_received"] > 0, stats
        assert stats["elapsed_s"] >= 0 and stats["buckets"] >= 1
        for name in ("first", "after prepare", "after clear", "after harmonize"):
            wrong, checked = out[name]
            assert wrong == [] and checked > 0, (rank, name, wrong[:5])
        assert out["plans after first"] == 1, out
        assert out["plans after prepare"] == 2 and out["plans after swap"] == 2, out
        assert out["plans after clear"] == 3, out
        # the buffers replaced (bf16) and harmonized: a new plan
        assert out["plans after harmonize"] == 4, out
        assert out["bf16 biases before"] == ["torch.bfloat16"], out
        assert out["bias count"] > 0 and out["bias dtypes after"] == ["torch.float32"], out
        assert out["bias values"], rank
        assert out["refresh calls"] == 1 and out["refreshed after landing"], out
        tensor, ranks, reason = out["dtype error"]
        assert "dtype differs" in reason and "bfloat16" in reason and "float32" in reason, reason
        assert ranks and tensor != "*", out["dtype error"]
        assert out["dtype untouched"], rank
    assert len({o["dtype error"] for o in per_rank}) == 1  # the same error on every rank


def _pools_worker(rank, world):
    """Source TP2 on ranks 0-1; pool 0 = TP1 on rank 2, pool 1 = TP1 on rank 3."""

    from refit_engine import RefitError
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    from refit_engine.megatron import swap_model_weights
    original_plan, planned = count_plans()
    cfg = KimiK2Config.toy(num_layers=2, num_experts=4)
    s = ParallelGrid(2, tp=2)
    a, b = ParallelGrid(1, offset=2), ParallelGrid(1, offset=3)
    spg, apg, bpg = build_process_groups(s), build_process_groups(a), build_process_groups(b)
    src = build_kimi_k2(cfg, s, spg, seed=11) or None
    dst_a = build_kimi_k2(cfg, a, apg, seed=22) or None
    dst_b = build_kimi_k2(cfg, b, bpg, seed=33) or None
    mine, pool = (dst_a, 0) if rank == 2 else (dst_b, 1) if rank == 3 else (None, 0)
    out = {}
    for step in range(2):
        poison(mine)
        stats = {}
        swap_model_weights(src, mine, "gloo", num_dst_pools=2, dst_pool_index=pool,
                           stats=stats, timeout_s=60)
        out[f"{step}: pool 0"] = _wrong(original_plan, src, dst_a)
        out[f"{step}: pool 1"] = _wrong(original_plan, src, dst_b)
        out[f"{step}: plans"] = len(planned)
        out[f"{step}: passes"] = len(stats["passes"])
    # a rank that passes another number of pools: refused on every rank at the first pass
    try:
        swap_model_weights(src, mine, "gloo", num_dst_pools=1 if rank == 3 else 2,
                           dst_pool_index=0 if rank == 3 else pool, timeout_s=60)
        out["mismatch"] = None
    except RefitError as exc:
        out["mismatch"] = (tuple(exc.ranks), exc.reason)
    return out


def test_destination_pools():
    per_rank = run_world(_pools_worker, 4, timeout=400)
    for rank, out in enumerate(per_rank):
        for step in range(2):
            for pool in (0, 1):
                wrong, checked = out[f"{step}: pool {pool}"]
                assert wrong == [], (rank, step, pool, wrong[:5])
                assert rank == 2 + pool or checked == 0, (rank, pool, checked)
            assert out[f"{step}: passes"] == 2
        assert out["0: plans"] == 2, out  # one plan per pool
        assert out["1: plans"] == 2, out  # both reused
        ranks, reason = out["mismatch"]
        assert ranks == (0, 1, 2, 3) and "num_dst_pools" in reason, out["mismatch"]
    assert per_rank[2]["0: pool 0"][1] > 0 and per_rank[3]["0: pool 1"][1] > 0


def _offsets_worker(rank, world):
    """group = ranks 1..3 of a world of 4; source TP1 on rank 1, destination TP2 on ranks 2-3,
    their process groups built on those global ranks. Offsets -1 put each side's rank lists in
    the group's rank space (megatron-core's rule); 0 keeps global ranks (as before)."""
    import torch
    import torch.distributed as dist

    from refit_engine import RefitError
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    from refit_engine.megatron import swap_model_weights
    original_plan, planned = count_plans()
    cfg = KimiK2Config.toy(num_layers=2, num_experts=4)
    s, d = ParallelGrid(1, offset=1), ParallelGrid(2, tp=2, offset=2)
    spg, dpg = build_process_groups(s), build_process_groups(d)
    group = dist.new_group([1, 2, 3])
    src = build_kimi_k2(cfg, s, spg, seed=11) or None
    dst = build_kimi_k2(cfg, d, dpg, seed=22) or None
    out = {}
    if rank == 0:  # not in the group; hosts the store, so it waits for the others
        dist.barrier()
        return out
    for offsets in ((-1, -1), (0, 0)):
        poison(dst)
        swap_model_weights(src, dst, "gloo", group, *offsets, timeout_s=60)
        out[offsets] = _wrong(original_plan, src, dst, group=group)
    out["plans"] = len(planned)
    # destination offset +1: its TP ranks [2, 3] + 1 = [3, 4], group rank 3 does not exist
    poison(dst)
    try:
        swap_model_weights(src, dst, "gloo", group, -1, +1, timeout_s=60)
        out["outside"] = None
    except RefitError as exc:
        out["outside"] = (exc.tensor, tuple(exc.ranks), exc.reason)
    # destination offset -2: [0, 1], which leaves out rank 3 (group rank 2)
    try:
        swap_model_weights(src, dst, "gloo", group, -1, -2, timeout_s=60)
        out["left out"] = None
    except RefitError as exc:
        out["left out"] = (exc.tensor, tuple(exc.ranks), exc.reason)
    out["untouched"] = dst is None or all(
        bool((t.data.view(torch.uint8) == POISON).all()) for t in dst[0].parameters())
    dist.barrier()
    return out


def test_rank_offsets():
    per_rank = run_world(_offsets_worker, 4, timeout=400)
    assert per_rank[0] == {}
    for rank, out in enumerate(per_rank[1:], start=1):
        for offsets in ((-1, -1), (0, 0)):
            wrong, checked = out[offsets]
            assert wrong == [] and checked == (0 if rank == 1 else checked), (rank, offsets)
        assert out["plans"] == 2, out  # offsets are in the cache key
        _, ranks, reason = out["outside"]
        assert "rank-offset mismatch" in reason and "outside the refit group" in reason, reason
        assert ranks == (2, 3), out["outside"]
        _, ranks, reason = out["left out"]
        assert "rank-offset mismatch" in reason and "leaves out this rank" in reason, reason
        assert set(ranks) <= {2, 3} and ranks, out["left out"]
        assert out["untouched"], rank
    assert per_rank[2][(-1, -1)][1] > 0
    for name in ("outside", "left out"):  # the same error on every rank
        assert len({o[name] for o in per_rank[1:]}) == 1, name
