"""Time megatron-core's refit/reshard planner on synthetic full-size Kimi K2 rosters (CPU only).

No process groups are created: rosters (each rank's list of ``ParameterMetadata``) are produced
by megatron's own ``extract_param_metadata`` fed with duck-typed parameters and "groups" that are
plain rank lists (``torch.distributed.get_process_group_ranks`` is patched to the identity while
rosters are built; nothing is patched while timing).  This reproduces, per installed version, what
``all_gather_object`` would hand to the planner.

Two megatron-core APIs are supported, detected at import time:
  * 0.16.x (``build_centralized_reshard_plan``): global rank 0 loops over every destination rank
    and parameter calling ``select_src_metadata_balanced`` + ``_determine_source_ranks_for_dst_param``
    and appends ``TransferOp``s for both peers.  We replay that loop on our rosters.
  * 0.19+ (``build_plan_from_rosters``): every rank replays the whole global schedule itself and
    keeps its own ops; we call it directly on the indexed rosters.

Timing semantics (same for both APIs, so numbers are comparable):
  * ``time_rank_plan``    = planning the parameters of ONE destination rank (one slice of the loop).
  * ``time_cluster_plan`` = planning all destination ranks.  In 0.16 that is rank 0's work; in
    0.19 it is what EVERY rank does (``build_plan_from_rosters`` replays the global schedule).
Python's cyclic GC is left on, as in a real process; on 0.16 it adds ~30% to the cluster time
because every TransferOp of every rank accumulates in one heap (a one-rank slice barely sees it).
Layer model follows megatron's Transformer-Engine GPT spec with MLA + qk_layernorm (Kimi K2 /
DeepSeek-V3 style).  Full size plans in seconds on CPU; if needed, ``num_layers`` can be lowered
(layer 0 stays dense, the rest MoE) and the caller extrapolates linearly per MoE layer.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from unittest import mock

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|absl|Torch Norm).*")
from megatron.core.resharding import planner as _planner  # noqa: E402
from megatron.core.resharding import utils as _utils  # noqa: E402

HAS_ROSTER_API = hasattr(_planner, "build_plan_from_rosters")  # megatron-core >= 0.19

# Kimi K2 dimensions.
HIDDEN, VOCAB, HEADS = 7168, 163840, 64
Q_LORA, KV_LORA, QK_NOPE, QK_ROPE, V_HEAD = 1536, 512, 128, 64, 128
DENSE_FFN, MOE_FFN, SHARED_FFN = 18432, 2048, 2048
BF16, FP32 = torch.bfloat16, torch.float32


def megatron_version() -> str:
    # package_info of the megatron actually imported (dist-info may belong to another copy).
    from megatron.core import package_info
    return package_info.__version__


class _FakeParam:
    """Just what extract_param_metadata reads: shape, dtype, element_size() and megatron's
    parameter attributes (tensor_model_parallel / partition_dim / partition_stride / allreduce)."""

    def __init__(self, shape, dtype=BF16, tp_dim=None, stride=1, expert=False):
        self.shape, self.dtype = tuple(shape), dtype
        if tp_dim is not None:  # set by megatron/TE column (dim 0) / row (dim 1) parallel layers
            self.tensor_model_parallel, self.partition_dim, self.partition_stride = True, tp_dim, stride
        if expert:  # TE grouped linear with EP>1: allreduce=False, and explicit_expert_comm
            self.allreduce = False  # makes TE skip the tensor_model_parallel attribute

    def element_size(self):
        return torch.empty((), dtype=self.dtype).element_size()


def _param_list(tp: int, ep: int, num_layers: int, num_experts: int, with_buffers: bool):
    """(name, fake param) for one rank; identical for all ranks of a config (only groups differ)."""
    c, r = 0, 1  # column-parallel splits dim 0, row-parallel splits dim 1
    P = _FakeParam
    out = [("embedding.word_embeddings.weight", P((VOCAB // tp, HIDDEN), tp_dim=c))]
    for i in range(num_layers):
        a = f"decoder.layers.{i}."
        s = a + "self_attention."
        out += [
            (a + "input_layernorm.weight", P((HIDDEN,))),
            # TE spec uses TELinear(parallel_mode='duplicated') for both down projections -> replicated
            (s + "linear_q_down_proj.weight", P((Q_LORA, HIDDEN))),
            (s + "linear_kv_down_proj.weight", P((KV_LORA + QK_ROPE, HIDDEN))),
            # qk_layernorm=True: q/kv norms are fused into TELayerNormColumnParallelLinear
            (s + "linear_q_up_proj.layer_norm_weight", P((Q_LORA,))),
            (s + "linear_q_up_proj.weight", P((HEADS * (QK_NOPE + QK_ROPE) // tp, Q_LORA), tp_dim=c)),
            (s + "linear_kv_up_proj.layer_norm_weight", P((KV_LORA,))),
            (s + "linear_kv_up_proj.weight", P((HEADS * (QK_NOPE + V_HEAD) // tp, KV_LORA), tp_dim=c)),
            (s + "linear_proj.weight", P((HIDDEN, HEADS * V_HEAD // tp), tp_dim=r)),
        ]
        m = a + "mlp."
        if i == 0:  # dense layer: pre-MLP norm fused into fc1 (TE spec), SwiGLU fc1 stride 2
            out += [
                (m + "linear_fc1.layer_norm_weight", P((HIDDEN,))),
                (m + "linear_fc1.weight", P((2 * DENSE_FFN // tp, HIDDEN), tp_dim=c, stride=2)),
                (m + "linear_fc2.weight", P((HIDDEN, DENSE_FFN // tp), tp_dim=r)),
            ]
            continue
        out += [(a + "pre_mlp_layernorm.weight", P((HIDDEN,))),
                (m + "router.weight", P((num_experts, HIDDEN)))]
        if with_buffers:  # >=0.19 also refits persistent buffers (named_refit_tensors)
            out.append((m + "router.expert_bias", P((num_experts,), dtype=FP32)))
        # Shared expert = plain MLP on the dense TP group.
        out += [(m + "shared_experts.linear_fc1.weight", P((2 * SHARED_FFN // tp, HIDDEN), tp_dim=c, stride=2)),
                (m + "shared_experts.linear_fc2.weight", P((HIDDEN, SHARED_FFN // tp), tp_dim=r))]
        # TEGroupedMLP names experts "weight{local_idx}"; megatron maps local->global itself.
        for k in range(num_experts // ep):
            out.append((f"{m}experts.linear_fc1.weight{k}", P((2 * MOE_FFN, HIDDEN), expert=True)))
        for k in range(num_experts // ep):
            out.append((f"{m}experts.linear_fc2.weight{k}", P((HIDDEN, MOE_FFN), expert=True)))
    out += [("decoder.final_layernorm.weight", P((HIDDEN,))),
            ("output_layer.weight", P((VOCAB // tp, HIDDEN), tp_dim=c))]
    return out


def _groups(rank: int, world: int, tp: int, ep: int, etp: int = 1):
    """Megatron's default 'tp-cp-ep-dp-pp' layout (CP=PP=1), as plain rank lists.
    Dense: TP innermost, DP strided by TP.  Experts: ETP innermost, then EP, then expert-DP."""
    tp_start = rank - rank % tp
    ep_block = etp * ep
    ep_start = rank - rank % ep_block
    return {
        "tp": list(range(tp_start, tp_start + tp)),
        "dp": list(range(rank % tp, world, tp)),
        "ep": list(range(ep_start + rank % etp, ep_start + ep_block, etp)),
        "expt_tp": list(range(rank - rank % etp, rank - rank % etp + etp)),
        "pp": [rank],  # PP=1
    }


class _PgCollection:
    def __init__(self, groups, cache):
        for key, ranks in groups.items():  # share equal lists, like a pickled gather would mostly
            setattr(self, key, cache.setdefault(tuple(ranks), ranks))


@dataclass
class Rosters:
    dst_by_rank: dict  # dst rank -> {resolved_name: ParameterMetadata}
    src_by_name: dict  # resolved_name -> [ParameterMetadata from every src rank holding it]
    world: int
    num_layers: int
    desc: str


def _rank_metadata(params, rank, pgc, num_experts):
    # >=0.19 dedups group lists per rank (build_local_reshard_plan passes _rank_list_cache).
    kw = {"_rank_list_cache": {}} if HAS_ROSTER_API else {}
    return [_utils.extract_param_metadata(p, n, rank, pgc, num_experts=num_experts, **kw)
            for n, p in params]


def build_rosters(src_tp, dst_tp, src_ep=64, dst_ep=128, world=128, num_layers=61, num_experts=384):
    """Synthetic gathered rosters for a collocated src->dst reshard (not timed, takes seconds)."""
    src_params = _param_list(src_tp, src_ep, num_layers, num_experts, HAS_ROSTER_API)
    dst_params = _param_list(dst_tp, dst_ep, num_layers, num_experts, HAS_ROSTER_API)
    cache: dict = {}
    pairs = []
    # Groups are plain lists, so ranks-of-group is the identity; only patched while building.
    with mock.patch.object(dist, "get_process_group_ranks", lambda g: g), \
         mock.patch.object(dist, "get_world_size", lambda *a, **k: world):
        for rank in range(world):
            spg = _PgCollection(_groups(rank, world, src_tp, src_ep), cache)
            dpg = _PgCollection(_groups(rank, world, dst_tp, dst_ep), cache)
            pairs.append((_rank_metadata(src_params, rank, spg, num_experts),
                          _rank_metadata(dst_params, rank, dpg, num_experts)))
    if HAS_ROSTER_API:
        dst_by_rank, src_by_name = _planner.index_metadata_rosters(pairs)
    else:  # same indexing build_centralized_reshard_plan does after its all_gather
        dst_by_rank = {r: {m.resolved_name: m for m in d} for r, (_, d) in enumerate(pairs)}
        src_by_name = {}
        for s, _ in pairs:
            for m in s:
                src_by_name.setdefault(m.resolved_name, []).append(m)
    desc = f"TP{src_tp}/EP{src_ep} -> TP{dst_tp}/EP{dst_ep}, world {world}, {num_layers} layers"
    return Rosters(dst_by_rank, src_by_name, world, num_layers, desc)


def _plan_centralized(ro: Rosters, dst_ranks):
    """0.16.x: the per-(dst rank, param) core of build_centralized_reshard_plan, roster-fed."""
    TransferOp, ReshardPlan = _utils.TransferOp, _utils.ReshardPlan
    plans = {r: ReshardPlan([], []) for r in range(ro.world)}
    task_id = 0
    for dst_rank in dst_ranks:
        for name, dst_meta in ro.dst_by_rank[dst_rank].items():
            candidates = ro.src_by_name.get(name)
            if not candidates:
                raise RuntimeError(f"{name} (dst rank {dst_rank}) missing in source rosters")
            src_meta = _utils.select_src_metadata_balanced(candidates, dst_meta, dst_rank)
            for src_rank, src_sl, dst_sl in _planner._determine_source_ranks_for_dst_param(
                name, src_meta, dst_meta, dst_rank
            ):
                plans[dst_rank].recv_ops.append(
                    TransferOp(dst_meta.name, src_rank, False, dst_sl, src_sl, task_id))
                plans[src_rank].send_ops.append(
                    TransferOp(src_meta.name, dst_rank, True, src_sl, dst_sl, task_id))
                task_id += 1
    return plans


def plan(ro: Rosters, dst_ranks, my_rank=None):
    """Plan the given destination ranks with whichever megatron API is installed."""
    dst_ranks = list(dst_ranks)
    if HAS_ROSTER_API:
        sub = {r: ro.dst_by_rank[r] for r in dst_ranks}
        me = dst_ranks[0] if my_rank is None else my_rank
        return _planner.build_plan_from_rosters(sub, ro.src_by_name, me)
    return _plan_centralized(ro, dst_ranks)


def _timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_rank_plan(rosters: Rosters, dst_rank: int = 0, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds to plan all parameters of ONE destination rank."""
    return _timed(lambda: plan(rosters, [dst_rank]), repeats)


def time_cluster_plan(rosters: Rosters, max_seconds: float = 60.0) -> tuple[float, bool]:
    """Seconds to plan every destination rank.  If a one-rank probe predicts more than
    `max_seconds`, an evenly spread subset of dst ranks is timed and scaled linearly
    (rosters are rank-symmetric); returns (seconds, extrapolated)."""
    world = rosters.world
    est = time_rank_plan(rosters, 0, repeats=1) * world
    if est <= max_seconds:
        return _timed(lambda: plan(rosters, range(world)), 1), False
    n = max(1, int(world * max_seconds / est / 2))  # aim to spend about half the budget
    subset = range(0, world, max(1, world // n))
    return _timed(lambda: plan(rosters, subset), 1) * world / len(subset), True


if __name__ == "__main__":
    t0 = time.perf_counter()
    ro = build_rosters(8, 4)
    n_src = sum(len(v) for v in ro.src_by_name.values())
    n_dst = sum(len(v) for v in ro.dst_by_rank.values())
    print(f"megatron-core {megatron_version()} ({'build_plan_from_rosters' if HAS_ROSTER_API else 'centralized loop'})")
    print(f"{ro.desc}: {n_src} src + {n_dst} dst metadata, built in {time.perf_counter() - t0:.1f}s")
    p = plan(ro, [0])
    ops = p[0].recv_ops if isinstance(p, dict) else p.recv_ops
    print(f"dst rank 0: {len(ro.dst_by_rank[0])} params, {len(ops)} recv ops")
    print(f"one rank : {time_rank_plan(ro, 0):.4f} s")
    secs, extrap = time_cluster_plan(ro)
    print(f"cluster  : {secs:.3f} s ({'extrapolated' if extrap else 'measured'}, {ro.world} dst ranks)")
