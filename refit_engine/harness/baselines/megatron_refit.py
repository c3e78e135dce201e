"""megatron-core's own refit (`swap_model_weights`) between two models built by
`refit_engine.harness.models.megatron_builder`: the baseline the benchmarks time ours against.

megatron-core's refit (`megatron_refit`), as found on 0.16.1 (CPU) and 0.19.2 (CPU, and CUDA
without TE), on these models:
- SequentialMLP experts are matched by their local index (`local_experts.<k>`; only TE's
  grouped `weight<k>` is mapped to the global expert): across EP sizes it copies wrong experts
  or fails planning; 0.16 plans on rank 0 only, so the other ranks then wait in its plan
  broadcast forever (the TP1/EP4 -> TP2/EP2 "hang"). 0.16 is also wrong for equal EP sizes
  whenever the first holder of a source DP group is of another EP rank; 0.19 filters sources
  by EP rank when EP sizes match.
- 0.16 takes EP1 experts (allreduce=True) for dense parameters and splits them over the TP
  group: wrong unless expert TP == TP. 0.16 does not copy buffers (`router.expert_bias`).
`megatron_refit(strict=True)` raises `RefitError` on every rank for these layouts before
megatron plans.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from refit_engine.errors import RefitError
from refit_engine.harness.models.megatron_builder import _patch_megatron_for_cpu, megatron_version
from refit_engine.megatron import GROUPED_EXPERT

__all__ = ["megatron_refit"]


class _AbsentModel(torch.nn.Module):
    """Stand-in for a model this rank does not hold (megatron <= 0.16 has no None models):
    no parameters, but the `config` and `pg_collection` its refit reads."""

    def __init__(self, num_moe_experts):
        super().__init__()
        self.config = types.SimpleNamespace(num_moe_experts=num_moe_experts)
        self.pg_collection = ProcessGroupCollection(dp=dist.group.WORLD)


# Per-rank refit state (stand-ins, whether the layouts were checked) persists between calls:
# attached to a model this rank holds, or kept here on ranks that hold neither.
_IDLE_RANK_STATE: dict[str, Any] = {}


def _refit_state(src, dst) -> dict:
    owner = dst if dst is not None else src
    if owner is None:
        return _IDLE_RANK_STATE
    return owner.__dict__.setdefault("_refit_engine_refit_state", {})  # not a submodule


def _stand_ins(state: dict, src, dst):
    if "stand_ins" not in state:
        held = src if src is not None else dst
        experts = held.config.num_moe_experts if held is not None else None
        state["stand_ins"] = (_AbsentModel(experts), _AbsentModel(experts))
    return state["stand_ins"]




def _all_ranks_agree(local_ok: bool) -> bool:
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(local_ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _side_facts(model, pgs) -> dict | None:
    if model is None:
        return None
    names = [n for n, _ in model.named_parameters()]
    return dict(tp=pgs.tp.size(), pp=pgs.pp.size(), ep=pgs.ep.size(), etp=pgs.expt_tp.size(),
                experts=model.config.num_moe_experts,
                sequential=any(".local_experts." in n for n in names),
                grouped=any(GROUPED_EXPERT.search(n) for n in names),
                ranks=[dist.get_rank()])


def _check_megatron_can_refit(src, dst, src_pgs, dst_pgs, legacy: bool) -> None:
    """Raise RefitError on every rank for layouts megatron-core's refit gets wrong or hangs on
    (found on 0.16.1 and 0.19.2, see `megatron_refit`). Collective."""
    facts = [None] * dist.get_world_size()
    dist.all_gather_object(facts, (_side_facts(src, src_pgs), _side_facts(dst, dst_pgs)))
    sides = []
    for side in (0, 1):
        seen = [f[side] for f in facts if f[side] is not None]
        if not seen:
            raise RefitError(f"no rank holds the {'source' if side == 0 else 'destination'} model")
        sides.append(dict(seen[0], ranks=sorted(r for f in seen for r in f["ranks"]),
                          sequential=any(f["sequential"] for f in seen),
                          grouped=any(f["grouped"] for f in seen)))
    s, d = sides
    ranks = s["ranks"] + d["ranks"]
    version = megatron_version()
    # SequentialMLP names carry the local expert index, which megatron does not map to the
    # global expert (it does for TE's grouped `weight<k>`). Newer releases (0.19) pick a source
    # of the same EP rank when EP sizes match; 0.16 takes the first holder of a DP group.
    try:  # megatron-core version-dependent (0.19 has it)
        from megatron.core.resharding import utils as mc_utils
        ep_rank_filter = hasattr(mc_utils, "_filter_by_ep_local_rank")
    except ImportError:
        ep_rank_filter = False
    sequential = s["sequential"] or d["sequential"]
    if sequential and (s["ep"] != d["ep"] or (max(s["ep"], d["ep"]) > 1 and not ep_rank_filter)):
        raise RefitError(
            f"megatron-core {version} cannot refit SequentialMLP experts from EP{s['ep']} to "
            f"EP{d['ep']}: it matches `local_experts.<k>` by the local index k, not the global "
            "expert, so it copies the wrong experts; where the destination holds more local "
            "experts, planning fails (0.16: on rank 0 only, while the other ranks wait in its "
            "plan broadcast, a hang)", ranks=ranks)
    if (s["grouped"] or d["grouped"]) and s["etp"] != d["etp"]:
        raise RefitError(
            f"megatron-core {version} cannot refit TE grouped experts between expert TP "
            f"{s['etp']} and {d['etp']}: TE marks them split on dim 0 with stride 1 (fc2 is "
            "split on dim 1, SwiGLU fc1 has stride 2)", ranks=ranks)
    if legacy:
        for name, side in (("source", s), ("destination", d)):
            routed = side["sequential"] or side["grouped"]
            if routed and side["ep"] == 1 and side["etp"] != side["tp"]:
                raise RefitError(
                    f"megatron-core {version} cannot refit a {name} with EP1 and expert TP "
                    f"{side['etp']} != TP {side['tp']}: with EP1 it takes experts for dense "
                    "parameters (allreduce=True) and splits them over the TP group", ranks=ranks)


def _swap_model_weights():
    try:  # megatron-core version-dependent: where swap_model_weights lives
        from megatron.core.resharding import swap_model_weights
    except ImportError:
        try:
            from megatron.core.resharding.refit import swap_model_weights
        except ImportError as exc:
            raise ImportError(f"megatron-core {megatron_version()} has no resharding."
                              "swap_model_weights (needs >= 0.16)") from exc
    return swap_model_weights


def megatron_refit(src_chunks, dst_chunks, src_pgs, dst_pgs, method: str = "gloo",
                   replan: bool = False, strict: bool = True) -> None:
    """Copy `src_chunks`' weights into `dst_chunks` with megatron-core's `swap_model_weights`.

    Collective: call on every rank of the default world (None or [] for a model the rank does
    not hold). The first call of a pair plans (megatron caches the plan); `replan` plans again.
    `strict`: before planning, raise `RefitError` on every rank for layouts megatron-core
    mishandles (SequentialMLP experts across EP sizes; on 0.16, EP1 with expert TP != TP)
    instead of letting it copy wrong experts or hang.
    megatron-core 0.16 copies parameters only: `router.expert_bias` buffers are not refit
    (0.19 copies persistent buffers too).
    Caveat (0.16, non-collocated): a rank holding only one side keeps one cached plan per model
    it holds; refitting that model with two different partners alternately needs `replan`.
    """
    swap = _swap_model_weights()
    if not torch.cuda.is_available():
        _patch_megatron_for_cpu()
    src_chunks, dst_chunks = list(src_chunks or []), list(dst_chunks or [])
    if len(src_chunks) > 1 or len(dst_chunks) > 1:
        raise NotImplementedError("megatron_refit: one model chunk per rank (no virtual pipeline)")
    src = src_chunks[0] if src_chunks else None
    dst = dst_chunks[0] if dst_chunks else None
    for model, pgs, side in ((src, src_pgs, "source"), (dst, dst_pgs, "destination")):
        built_with = getattr(model, "pg_collection", None)
        if model is not None and pgs is not None and built_with is not pgs:
            raise ValueError(f"{side} pg_collection differs from the one the model was built with")
    legacy = "src_rank_offset" not in inspect.signature(swap).parameters  # megatron <= 0.16

    state = _refit_state(src, dst)
    if legacy:  # both models must exist on every rank: stand in for absent ones
        absent_src, absent_dst = _stand_ins(state, src, dst)
        src_model = src if src is not None else absent_src
        dst_model = dst if dst is not None else absent_dst
        ready = getattr(dst_model, "_cached_reshard_plan", None) is not None
    else:  # None stands for a model not held here; plans are cached by layout
        src_model, dst_model = src, dst
        ready = True
    ready = ready and state.get("checked", False) and not replan
    # Planning is collective: plan (and check) on every rank unless every rank is ready.
    if not _all_ranks_agree(ready):
        if legacy and hasattr(dst_model, "_cached_reshard_plan"):
            delattr(dst_model, "_cached_reshard_plan")
        if not legacy and replan:
            from megatron.core.resharding import refit as mc_refit  # newer megatron-core only
            getattr(mc_refit, "clear_plan_cache", lambda: None)()
        if strict:
            _check_megatron_can_refit(src, dst, src_pgs, dst_pgs, legacy)
        state["checked"] = True
    if legacy:
        swap([src_model], [dst_model], refit_method=method)
    else:
        swap([src_model] if src_model is not None else None,
             [dst_model] if dst_model is not None else None, refit_method=method)
