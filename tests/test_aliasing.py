"""Aliased shards (aliasing.py, plan(alias=True)) on CPU: which tensors alias, bit-exactness
against the unaliased refit, training updates seen at once, storage released, and the
replaced-tensor checks on either side."""

import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from multiproc import run_world  # noqa: E402

from refit_engine.aliasing import aliasable_buffers, aliased_bytes  # noqa: E402
from refit_engine.compiler import Planner  # noqa: E402
from refit_engine.harness.grid import ParallelGrid  # noqa: E402
from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout  # noqa: E402


def _layouts(world, src, dst):
    cfg = KimiK2Config.toy()
    return (kimi_k2_layout(cfg, ParallelGrid(world, **src)),
            kimi_k2_layout(cfg, ParallelGrid(world, **dst)))


def test_experts_alias_when_ep_and_expert_tp_stay():
    # TP4 -> TP2 with EP4 on both sides: every routed expert tensor, and every tensor that is
    # whole on every rank (norms, MLA's down projections, the router), alias; TP-split ones
    # change layout and are copied.
    src, dst = _layouts(4, dict(tp=4, ep=4), dict(tp=2, ep=4))
    planner = Planner(src, dst)
    for rank in range(4):
        found = aliasable_buffers(planner.plan_rank(rank), src, dst)
        keys = {dst.buffers[d].key for d in found}
        experts = {b.key for b in dst.buffers if b.rank == rank and ".experts." in b.key}
        assert experts and experts <= keys
        for d, s in found.items():
            assert src.buffers[s].key == dst.buffers[d].key
            assert src.buffers[s].shape == dst.buffers[d].shape
        split = {b.key for b in dst.buffers if b.rank == rank and
                 any(a.key == b.key and a.rank == rank and a.shape != b.shape
                     for a in src.buffers)}
        assert split and not split & keys
    total = sum(aliased_bytes(planner.plan_rank(r), src, dst) for r in range(4))
    assert total >= sum(b.numel * 2 for b in dst.buffers if ".experts." in b.key)


def test_every_aliased_pair_holds_the_same_bytes_and_moved_experts_do_not_alias():
    # EP4 -> EP2: a rank's first experts stay (global experts 0, 1 on rank 0 in both), the
    # others move. Whatever aliases must be, byte for byte, what the refit would write.
    from refit_engine.executors.reference import materialize, random_globals

    src, dst = _layouts(4, dict(tp=4, ep=4), dict(tp=2, ep=2))
    g = random_globals(src, np.random.default_rng(3))
    have, want = materialize(src, g), materialize(dst, g)
    planner = Planner(src, dst)
    moved = 0
    for rank in range(4):
        found = aliasable_buffers(planner.plan_rank(rank), src, dst)
        for d, s in found.items():
            a, b = src.buffers[s], dst.buffers[d]
            assert np.array_equal(have[(rank, a.key)].view(np.uint8),
                                  want[(rank, b.key)].view(np.uint8)), b.key
        moved += sum(1 for i, b in enumerate(dst.buffers)
                     if b.rank == rank and ".experts." in b.key and i not in found)
    assert moved > 0


def _refit(rank, world, alias, numpy_dst=False):
    import refit_engine
    from refit_engine.errors import RefitError
    from refit_engine.executors.reference import materialize, random_globals
    from refit_engine.local import from_layout

    src, dst = _layouts(world, dict(tp=world, ep=world), dict(tp=world // 2, ep=world))
    g = random_globals(src, np.random.default_rng(7))
    src_t = {k[1]: torch.from_numpy(v) for k, v in materialize(src, g, ranks={rank}).items()}
    dst_np = {k[1]: v for k, v in materialize(dst, poison=0xA5, ranks={rank}).items()}
    dst_t = dst_np if numpy_dst else {k: torch.from_numpy(v) for k, v in dst_np.items()}
    want = materialize(dst, g, ranks={rank})
    before = {k: (t.data_ptr() if isinstance(t, torch.Tensor) else 0) for k, t in dst_t.items()}
    plan = refit_engine.plan(from_layout(src, rank, src_t), from_layout(dst, rank, dst_t),
                             timeout_s=60, alias=alias)
    stats = refit_engine.execute(plan)
    out = {"aliased": sorted(a.key for a in plan.aliases), "bytes": stats["bytes_aliased"],
           "not_aliased": dict(plan.not_aliased), "local": stats["bytes_local"]}
    bound = {plan.dst_layout.buffers[i].key: t for i, t in plan.dst_tensors.items()}
    out["exact"] = all(np.array_equal(np.asarray(bound[k]).view(np.uint8),
                                      want[(rank, k)].view(np.uint8)) for k in bound)
    out["shared"] = sorted(k for k in out["aliased"]
                           if dst_t[k].data_ptr() == src_t[k].data_ptr() != before[k])
    if out["aliased"]:
        key = out["aliased"][0]
        src_t[key].view(torch.int16).add_(1)  # a training update in place: seen at once
        out["sees_update"] = bool(torch.equal(dst_t[key], src_t[key]))
        # A later change of either side's storage is caught like any replaced tensor.
        dst_t[key].data = dst_t[key].clone()
        try:
            refit_engine.execute(plan)
            out["replaced"] = "not caught"
        except RefitError as exc:
            out["replaced"] = str(exc)
    plan.close()
    gc.collect()
    return out


def _both(rank, world):
    return _refit(rank, world, True), _refit(rank, world, False)


def test_aliased_refit_equals_the_copied_one_and_shares_storage():
    for aliased, copied in run_world(_both, 2, timeout=180):
        assert aliased["exact"] and copied["exact"]
        assert aliased["aliased"] and not copied["aliased"]
        assert aliased["shared"] == aliased["aliased"]
        assert aliased["sees_update"]
        assert "after planning" in aliased["replaced"] and aliased["aliased"][0] in \
            aliased["replaced"]
        assert aliased["bytes"] > 0 and copied["bytes"] == 0
        assert aliased["local"] == copied["local"] - aliased["bytes"]


def _numpy_destinations(rank, world):
    return _refit(rank, world, True, numpy_dst=True)


def test_arrays_that_cannot_be_rebound_are_copied_with_the_reason():
    for out in run_world(_numpy_destinations, 2, timeout=180):
        assert out["exact"] and not out["aliased"]
        assert out["not_aliased"] and all("copied" in why for why in out["not_aliased"].values())


def _megatron(rank, world):
    import warnings

    import refit_engine
    from megatron_check import poison
    from refit_engine.harness.models.megatron_builder import build_kimi_k2, build_process_groups
    from refit_engine.verify import check_exact
    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = KimiK2Config.toy(num_layers=3, num_experts=8)
    sg, dg = ParallelGrid(world, tp=2, ep=2), ParallelGrid(world, tp=1, ep=2)
    src = build_kimi_k2(cfg, sg, build_process_groups(sg), device="cpu", seed=1)
    dst = build_kimi_k2(cfg, dg, build_process_groups(dg), device="cpu", seed=2)
    poison(dst)
    plan = refit_engine.plan(src, dst, timeout_s=60, alias=True)
    refit_engine.execute(plan)
    wrong = check_exact(plan)
    def tensors(chunk):  # parameters and persistent buffers (the router's expert_bias)
        return {**dict(chunk.named_parameters()), **dict(chunk.named_buffers())}

    src_params = tensors(src[0])
    shared = [n for n, p in tensors(dst[0]).items()
              if n in src_params and p.data_ptr() == src_params[n].data_ptr()]
    # A second aliased plan over the same (now sharing) models is no conflict.
    again = refit_engine.plan(src, dst, timeout_s=60, alias=True, name="again")
    refit_engine.execute(again)
    # The drop-in takes alias=True as one of plan()'s keywords.
    from refit_engine.megatron import swap_model_weights
    stats = {}
    swap_model_weights(src, dst, "gloo", alias=True, stats=stats)
    assert stats["bytes_aliased"] == again.traffic["bytes_aliased"] > 0, stats
    return wrong, len(plan.aliases), shared, check_exact(again), len(again.aliases)


@pytest.mark.skipif(pytest.importorskip("megatron.core", reason="needs megatron-core") is None,
                    reason="needs megatron-core")
def test_megatron_expert_parameters_share_the_training_storage():
    for wrong, n, shared, wrong_again, n_again in run_world(_megatron, 2, timeout=300):
        assert wrong == [] and wrong_again == []
        assert n > 0 and n_again == n
        assert len(shared) == n and any(".experts." in name for name in shared)
