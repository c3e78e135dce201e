"""Build megatron-core `GPTModel`s of a (toy) Kimi K2 at any parallel layout (megatron-core's
own refit between two of them: `refit_engine.harness.baselines.megatron_refit`).

Two models of different layouts live in the same processes (collocated: both layouts span the
same ranks) or on disjoint ranks (non-collocated: `ParallelGrid.offset`). Every model gets its
own `ProcessGroupCollection`, so nothing here touches megatron's global `parallel_state`.

A model's layout is a `refit_engine.harness.grid.ParallelGrid` (sizes, and the first of its
contiguous ranks); rank order inside it is megatron's default "tp-cp-ep-dp-pp", the grid's own:
for the dense part TP is fastest, then DP, then PP; for the expert part expert-TP is fastest,
then EP, then expert-DP, then PP. The `i`-th rank of a layout is `grid.ranks[i]`.

Uneven pipelines follow `ParallelGrid.stage_layers` (earlier stages take the remainder); megatron
can express that with `num_layers_in_{first,last}_pipeline_stage` whenever the remainder sits on
the first stage only or on all but the last (always for pp <= 3); other splits raise.

Naming on CPU (local spec, no Transformer Engine) differs from the TE naming of
`kimi_k2.kimi_k2_parameters`: the q/kv norms are `self_attention.{q,kv}_layernorm.weight`, the
dense MLP norm is `pre_mlp_layernorm.weight`, and routed experts are SequentialMLP
`mlp.experts.local_experts.{local}.linear_fc{1,2}.weight` (local index; global =
ep_rank * num_experts // ep + local). By default the two MLA down projections are made
non-TP-split (plain duplicated linears), as Transformer Engine's spec does; pass
`duplicated_down_proj=False` for megatron's stock local spec (TP-split ColumnParallelLinear).

Weights are by default drawn per canonical tensor (`init="canonical"`): the same global
weights at every layout, every routed expert distinct (through `refit_engine.megatron.describe`,
the same description of local tensors that a refit uses).

`mtp_num_layers=` adds multi-token-prediction layers (`mtp.layers.{i}.`), whose routed experts
are named by global index like the decoder's.

All work-arounds for running megatron-core on a host without CUDA / Transformer Engine live in
`_patch_megatron_for_cpu()` and nowhere else; those for building MTP layers from this model's
process groups rather than megatron's global `parallel_state` in `_pipeline_stage()` and
`_mtp_process_groups()`, both scoped to one model's construction.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from refit_engine.harness.grid import ParallelGrid
from refit_engine.harness.models.kimi_k2 import KimiK2Config
from refit_engine.megatron import describe

try:  # ProcessGroupCollection from 0.15 (0.14: ModelCommProcessGroups); HyperCommGrid.get_rank_enum
    # from 0.16; both unchanged through 0.19
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from megatron.core.process_groups_config import ProcessGroupCollection
except ImportError as exc:  # pragma: no cover - depends on the installed megatron-core
    raise ImportError(
        "refit_engine.harness.models.megatron_builder needs megatron-core >= 0.16 "
        "(megatron.core.hyper_comm_grid.HyperCommGrid and "
        f"megatron.core.process_groups_config.ProcessGroupCollection): {exc}") from exc

__all__ = [
    "build_kimi_k2",
    "build_process_groups",
    "make_transformer_config",
    "megatron_version",
]


def megatron_version() -> str:
    try:
        from megatron.core import __version__
        return str(__version__)
    except ImportError:  # pragma: no cover
        from megatron.core.package_info import __version__
        return str(__version__)


# --------------------------------------------------------------------------------------------
# Layout and process groups
# --------------------------------------------------------------------------------------------


def _enumerate_new_groups(enum: list[list[int]]):
    group, _ = dist.new_subgroups_by_enumeration(enum)
    return group


def build_process_groups(grid: ParallelGrid) -> ProcessGroupCollection | None:
    """Process groups of one model at `grid` (dense and expert groups) on its ranks
    `grid.ranks`.

    Collective: call on EVERY rank of the default world, in the same order on all ranks.
    Returns the collection on ranks in the grid, None elsewhere.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_process_groups needs torch.distributed initialized")
    ranks = grid.ranks
    if ranks[-1] >= dist.get_world_size():
        raise ValueError(f"{grid}: rank {ranks[-1]} outside world of {dist.get_world_size()}")
    tp, pp, ep, etp, dp, edp = grid.tp, grid.pp, grid.ep, grid.etp, grid.dp, grid.edp

    # megatron's order "tp-cp-ep-dp-pp": dims listed fastest first.
    dense = HyperCommGrid([tp, 1, dp, pp], ["tp", "cp", "dp", "pp"], rank_offset=grid.offset)
    expert = HyperCommGrid([etp, ep, edp, pp], ["tp", "ep", "dp", "pp"], rank_offset=grid.offset)

    make = HyperCommGrid.create_pg
    g: dict[str, Any] = {}
    g["tp"] = make(dense, "tp")
    g["cp"] = make(dense, "cp")
    g["dp"] = make(dense, "dp")
    g["pp"] = make(dense, "pp")
    g["tp_cp"] = make(dense, ["tp", "cp"])
    g["dp_cp"] = make(dense, ["cp", "dp"])
    g["tp_dp_cp"] = make(dense, ["tp", "cp", "dp"])
    g["mp"] = make(dense, ["tp", "cp", "pp"])
    g["ep"] = make(expert, "ep")
    g["expt_tp"] = make(expert, "tp")
    g["expt_dp"] = make(expert, "dp")
    g["tp_ep"] = make(expert, ["tp", "ep"])
    g["tp_ep_pp"] = make(expert, ["tp", "ep", "pp"])

    # Embedding groups: first and last stage of every pipeline (position embedding: first).
    pp_enum = dense.get_rank_enum("pp")  # global ranks (the grid's rank_offset included)
    g["embd"] = _enumerate_new_groups([grp if len(grp) == 1 else [grp[0], grp[-1]]
                                       for grp in pp_enum])
    g["pos_embd"] = _enumerate_new_groups([[grp[0]] for grp in pp_enum])

    me = dist.get_rank()
    if me not in ranks:
        return None
    pgs = ProcessGroupCollection(**g)
    # Single optimizer instance: the partial groups are the full ones.
    pgs.intra_dp_cp = g["dp_cp"]
    pgs.intra_expt_dp = g["expt_dp"]
    return pgs


# --------------------------------------------------------------------------------------------
# CPU work-arounds (the only place that touches megatron-core internals)
# --------------------------------------------------------------------------------------------

_PATCHED = False


def _have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@contextlib.contextmanager
def _cuda_device_reads_cpu():
    """While active, `torch.cuda.current_device()` returns "cpu" (only used on CUDA-less hosts)."""
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.current_device = original  # type: ignore[assignment]


class _NoStream:
    """A CUDA stream / event stand-in whose every operation does nothing (CUDA-less hosts)."""

    def synchronize(self):
        pass

    def record(self, stream=None):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass


@contextlib.contextmanager
def _cuda_free_refit():
    """While active (CUDA-less hosts only): `torch.cuda.Stream()` / `Event()` are None / a no-op
    event, `torch.cuda.stream(...)` a null context, `torch.cuda.current_stream()` a no-op stream,
    `torch.cuda.synchronize()` / `empty_cache()` no-ops, and `torch.empty(..., pin_memory=True)`
    allocates unpinned memory (there is no pinned allocator without an accelerator)."""
    cuda = torch.cuda
    names = ("Stream", "Event", "stream", "current_stream", "synchronize", "empty_cache")
    saved = {name: getattr(cuda, name) for name in names}
    empty = torch.empty

    def unpinned_empty(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return empty(*args, **kwargs)

    cuda.Stream = lambda *a, **k: None
    cuda.Event = lambda *a, **k: _NoStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.current_stream = lambda *a, **k: _NoStream()
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    torch.empty = unpinned_empty
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(cuda, name, value)
        torch.empty = empty


def _wrap_method(cls, name: str, context_factory=None, drop_kwargs: Sequence[str] = ()):
    """Wrap `cls.<name>` once: run it under `context_factory()` and/or without `drop_kwargs`."""
    method = cls.__dict__.get(name)
    if method is None or getattr(method, "_refit_engine_wrapped", False):
        return

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        for key in drop_kwargs:
            kwargs.pop(key, None)
        with (context_factory() if context_factory else contextlib.nullcontext()):
            return method(self, *args, **kwargs)

    wrapped._refit_engine_wrapped = True  # type: ignore[attr-defined]
    setattr(cls, name, wrapped)


def _wrap_init(cls, context_factory=None, drop_kwargs: Sequence[str] = ()):
    _wrap_method(cls, "__init__", context_factory, drop_kwargs)


def _with_context(function, context_factory):
    """`function` run under `context_factory()` (idempotent: a wrapped function stays as is)."""
    if getattr(function, "_refit_engine_wrapped", False):
        return function

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with context_factory():
            return function(*args, **kwargs)

    wrapped._refit_engine_wrapped = True  # type: ignore[attr-defined]
    return wrapped


_DUPLICATED_LINEAR = None


def _duplicated_linear():
    """A stand-in for `TELinear(parallel_mode="duplicated")`: megatron's plain `Linear` (weight
    (out, in), not TP-split), accepting TELinear's keywords."""
    global _DUPLICATED_LINEAR
    if _DUPLICATED_LINEAR is None:
        # megatron-core: only for latent-MoE projections without TE
        from megatron.core.post_training.modelopt.layers import Linear

        class DuplicatedLinear(Linear):
            def __init__(self, input_size, output_size, *, parallel_mode=None, config,
                         init_method, bias=True, skip_bias_add=False,
                         skip_weight_param_allocation=False, is_expert=False, **_unused):
                if parallel_mode != "duplicated":
                    raise NotImplementedError(
                        f"TELinear stand-in: parallel_mode {parallel_mode!r} (only 'duplicated')")
                super().__init__(input_size, output_size, config=config,
                                 init_method=init_method, bias=bias, skip_bias_add=skip_bias_add,
                                 skip_weight_param_allocation=skip_weight_param_allocation,
                                 is_expert=is_expert)

        _DUPLICATED_LINEAR = DuplicatedLinear
    return _DUPLICATED_LINEAR


@contextlib.contextmanager
def _latent_projections_without_te():
    """While active, megatron's MoE layer module believes TE is there and builds `TELinear`
    as a plain duplicated linear (hosts without TE only)."""
    # megatron-core: only while an MoE layer is built without TE
    from megatron.core.transformer.moe import moe_layer
    saved = (getattr(moe_layer, "HAVE_TE", False), getattr(moe_layer, "TELinear", None))
    moe_layer.HAVE_TE, moe_layer.TELinear = True, _duplicated_linear()
    try:
        yield
    finally:
        moe_layer.HAVE_TE, moe_layer.TELinear = saved


def _patch_megatron_for_cpu() -> None:
    """Make megatron-core build Kimi K2 models and run its gloo refit without CUDA / TE.

    Called for every model built without TE and for every refit on a CUDA-less host; each item
    below applies only under its stated condition; idempotent. Each stand-in is
    scoped to one constructor or one refit call, so code outside them sees torch and megatron
    unchanged. Models built this way are for reading/writing weights; forward passes are not
    supported.

    1. `RotaryEmbedding.__init__` (MLA creates it without `use_cpu_initialization`, so it asks
       `torch.cuda.current_device()`) and `TopKRouter.__init__` (allocates `expert_bias` and
       `local_tokens_per_expert` on `torch.cuda.current_device()`): run with
       `torch.cuda.current_device()` answering "cpu". No CUDA only.
    2. `multi_latent_attention.HAVE_TE`: megatron's `extensions.transformer_engine` imports
       without TE and leaves MagicMock placeholders, so MLA believes TE is present and
       `isinstance(self.linear_proj, TELinear)` raises (TELinear is not a type). Set to False
       when `transformer_engine` cannot be imported. No TE only. Megatron >= 0.17 instead
       leaves `multi_latent_attention.Linear` None without TE, so MLA would reject the plain
       duplicated down-projection linear (`duplicated_down_proj`): it is set to modelopt's
       `Linear` (what 0.16 has there).
    3. Local `DotProductAttention.__init__` (0.16.1 and 0.19.2) does not accept the
       `k_channels` / `v_channels` MLA passes; they are dropped (it sizes itself from
       `kv_channels`, which only matters for a forward pass). Only if its signature lacks them.
    4. megatron-core's refit assumes CUDA: `GlooCopyService.__init__` creates a
       `torch.cuda.Stream()` (0.16.1 then skips its stream wait when it is None), and from 0.17
       on the copy service stages through pinned buffers and CUDA streams while
       `execute_reshard_plan` calls `torch.cuda.synchronize()`. `GlooCopyService.__init__` and
       `resharding.refit.reshard_model_weights` (which `swap_model_weights` calls for every
       transfer) run under `_cuda_free_refit()`, where those CUDA calls are no-ops and pinned
       allocations unpinned. No CUDA only.
    5. `MoELayer.__init__` builds latent-MoE projections (`moe_latent_size`) only with TE
       (`assert HAVE_TE`, then `TELinear(parallel_mode="duplicated")`; 0.16.1 through 0.19):
       without TE it runs with `HAVE_TE` True and `TELinear` a plain duplicated linear of the
       same names and shapes (`_duplicated_linear`). No TE only.
    """
    global _PATCHED
    if _PATCHED:
        return
    no_cuda = not torch.cuda.is_available()

    # megatron-core (optional dependency) internals: imported where they are patched, once
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.transformer.moe import router

    if no_cuda:
        for cls in (rotary_pos_embedding.RotaryEmbedding, router.TopKRouter):
            _wrap_init(cls, context_factory=_cuda_device_reads_cpu)
        yarn = getattr(rotary_pos_embedding, "YarnRotaryEmbedding", None)
        if yarn is not None and "__init__" in vars(yarn):
            _wrap_init(yarn, context_factory=_cuda_device_reads_cpu)

    if not _have_te():
        # megatron-core: only without Transformer Engine
        from megatron.core.transformer import multi_latent_attention as mla
        if getattr(mla, "HAVE_TE", False):
            mla.HAVE_TE = False
        if hasattr(mla, "Linear") and mla.Linear is None:
            from megatron.core.post_training.modelopt.layers import Linear
            mla.Linear = Linear
        from megatron.core.transformer.moe import moe_layer
        _wrap_init(moe_layer.MoELayer, context_factory=_latent_projections_without_te)

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    accepted = inspect.signature(DotProductAttention.__init__).parameters
    dropped = [k for k in ("k_channels", "v_channels") if k not in accepted]
    if dropped:
        _wrap_init(DotProductAttention, drop_kwargs=dropped)

    if no_cuda:
        try:
            # megatron-core's refit internals: only on CUDA-less hosts
            from megatron.core.resharding import refit as mc_refit
            from megatron.core.resharding.copy_services.gloo_copy_service import GlooCopyService
        except ImportError:  # megatron-core without resharding: nothing to patch
            mc_refit = GlooCopyService = None
        if GlooCopyService is not None:
            _wrap_init(GlooCopyService, context_factory=_cuda_free_refit)
            wrapped = _with_context(mc_refit.reshard_model_weights, _cuda_free_refit)
            mc_refit.reshard_model_weights = wrapped

    _PATCHED = True


def _init_parameters(spec) -> set:
    """Named parameters of the constructor a megatron `build_module(spec, ...)` call runs (empty
    when it cannot be told, or when it takes **kwargs)."""
    cls = spec if isinstance(spec, type) else getattr(spec, "module", None)
    if not isinstance(cls, type):
        return set()
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set()
    return set(params)


@contextlib.contextmanager
def _mtp_process_groups(pg_collection):
    """While active, MTP modules are built with this model's process groups.

    megatron-core 0.16.1's GPTModel builds `MultiTokenPredictionBlock` without its
    `pg_collection`, and `MultiTokenPredictionLayer` builds its `transformer_layer` without
    `pg_collection` and its `eh_proj` without `tp_group`: they fall back to megatron's global
    `parallel_state` groups (absent here, and wrong for a second model of another layout in the
    same processes). Here the block gets `pg_collection` when not given one, and every
    `build_module` call of `multi_token_prediction` gets `pg_collection` / `tp_group`
    (= pg_collection.tp) wherever the built class accepts them and the call leaves them out.
    Releases that pass them (0.19: `pg_collection` to the block and to `mtp_model_layer`,
    `tp_group` to `eh_proj`) build exactly as without this. Scoped to one model's construction.
    """
    # megatron-core: only while an MTP model is built
    from megatron.core.transformer import multi_token_prediction as mtp

    block = getattr(mtp, "MultiTokenPredictionBlock", None)
    block_init = block.__dict__.get("__init__") if block is not None else None
    build = getattr(mtp, "build_module", None)
    if block_init is None or build is None:  # another structure: nothing to give groups to
        yield
        return
    takes_groups = "pg_collection" in inspect.signature(block_init).parameters

    @functools.wraps(block_init)
    def init_with_groups(self, *args, **kwargs):
        if takes_groups and kwargs.get("pg_collection") is None:
            kwargs["pg_collection"] = pg_collection
        return block_init(self, *args, **kwargs)

    def build_with_groups(spec, *args, **kwargs):
        accepted = _init_parameters(spec)
        if "pg_collection" in accepted and kwargs.get("pg_collection") is None:
            kwargs["pg_collection"] = pg_collection
        if "tp_group" in accepted and kwargs.get("tp_group") is None:
            kwargs["tp_group"] = pg_collection.tp
        return build(spec, *args, **kwargs)

    block.__init__, mtp.build_module = init_with_groups, build_with_groups
    try:
        yield
    finally:
        block.__init__, mtp.build_module = block_init, build


@contextlib.contextmanager
def _pipeline_stage(pp_group):
    """While active, megatron's `parallel_state` reports this model's pipeline rank and size.

    MTP placement reads them from there, not from the model's process groups: which stage
    builds MTP layers (`get_mtp_num_layers_to_build`, 0.16.1 and 0.19), `mtp_on_this_rank`
    (GPTModel, 0.19) and the MTP layer's transformer-layer offset (0.16.1). megatron's own
    override (`set_pipeline_model_parallel_rank` / `_world_size`) is set and then restored."""
    # megatron-core's global state: only while an MTP model is built
    from megatron.core import parallel_state as ps
    saved = (getattr(ps, "_MPU_PIPELINE_MODEL_PARALLEL_RANK", None),
             getattr(ps, "_MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE", None))
    ps.set_pipeline_model_parallel_rank(pp_group.rank())
    ps.set_pipeline_model_parallel_world_size(pp_group.size())
    try:
        yield
    finally:
        ps.set_pipeline_model_parallel_rank(saved[0])
        ps.set_pipeline_model_parallel_world_size(saved[1])


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _uneven_pipeline(num_layers: int, pp: int) -> dict:
    """megatron config fields splitting `num_layers` like `ParallelGrid.stage_layers`."""
    if pp == 1 or num_layers % pp == 0:
        return {}
    base, extra = divmod(num_layers, pp)
    if base == 0:
        raise ValueError(f"{num_layers} layers cannot fill {pp} pipeline stages")
    if extra == 1:  # only the first stage holds one more
        return {"num_layers_in_first_pipeline_stage": base + 1}
    if extra == pp - 1:  # all but the last hold one more
        return {"num_layers_in_last_pipeline_stage": base}
    raise ValueError(f"megatron cannot split {num_layers} layers over {pp} stages as "
                     f"{[base + (s < extra) for s in range(pp)]} (only the first and last stage "
                     "may differ from the others)")


def make_transformer_config(cfg: KimiK2Config, layout: ParallelGrid, **overrides):
    """The megatron `MLATransformerConfig` of Kimi K2 `cfg` at `layout`."""
    # megatron-core (optional dependency): imported where a model is configured
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    dtype = _DTYPES[cfg.dtype]
    moe_layers = [0] * cfg.first_dense_layers + [1] * (cfg.num_layers - cfg.first_dense_layers)
    if cfg.vocab % layout.tp:
        raise ValueError(f"vocab {cfg.vocab} does not divide by tp {layout.tp}")
    if cfg.num_experts % layout.ep:
        raise ValueError(f"{cfg.num_experts} experts do not divide by ep {layout.ep}")
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden,
        num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.dense_ffn,
        # MLA
        multi_latent_attention=True,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_nope_head_dim,
        qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        qk_layernorm=True,
        rope_type="rope",
        apply_rope_fusion=False,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        # MLP: SwiGLU, no biases
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        # MoE
        num_moe_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_ffn,
        moe_router_topk=cfg.router_topk,
        moe_shared_expert_intermediate_size=cfg.shared_expert_ffn,
        moe_layer_freq=moe_layers,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1e-4,
        moe_router_dtype="fp32",
        # alltoall (Kimi's) creates a torch.cuda.Stream in its constructor; the dispatcher holds
        # no weights, so CUDA-less hosts use allgather.
        moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
        moe_grouped_gemm=False,
        # parallelism
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        # The local spec's torch norms refuse sequence parallel (megatron only warns that MoE
        # training with TP and EP wants it); TE builds pass sequence_parallel=True explicitly.
        sequence_parallel=False,
        pipeline_dtype=dtype,
        # dtype and init
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        use_cpu_initialization=True,
        perform_initialization=True,
        init_method_std=0.02,
        # no fused kernels (CPU)
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kwargs.update(_uneven_pipeline(cfg.num_layers, layout.pp))
    kwargs.update(overrides)
    return MLATransformerConfig(**kwargs)


def _duplicate_down_projections(block_spec):
    """MLA down projections as non-TP-split linears (what TE's spec does with
    `parallel_mode='duplicated'`), on a copy of the local block spec."""
    # megatron-core: only for the local spec's duplicated down projections
    from megatron.core.post_training.modelopt.layers import Linear

    block_spec = copy.copy(block_spec)
    block_spec.layer_specs = [copy.deepcopy(spec) for spec in block_spec.layer_specs]
    for spec in block_spec.layer_specs:
        attn = spec.submodules.self_attention.submodules
        attn.linear_q_down_proj = Linear
        attn.linear_kv_down_proj = Linear
    return block_spec


# --------------------------------------------------------------------------------------------
# Canonical names and shards (layout-independent view of a built model)
# --------------------------------------------------------------------------------------------

def _canonical_values(canonical: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{canonical}".encode()))
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    if canonical.endswith("expert_bias"):
        return values * 0.01
    if len(shape) == 1:  # norm weights
        return 1.0 + 0.1 * values
    return values * 0.02


def _canonical_init(chunks, seed: int) -> None:
    """Every parameter and persistent buffer from (seed, canonical name): the same global
    weights at every layout, distinct for every expert and layer. Where each local tensor sits
    in its canonical tensor comes from the layout adapter (`refit_engine.megatron.describe`),
    so the model is initialized through exactly the description a refit uses."""
    local = describe(chunks)
    with torch.no_grad():
        full, name = None, None
        for e in sorted(local.entries, key=lambda e: e.name):
            if e.name != name:
                name, full = e.name, _canonical_values(e.name, e.global_shape, seed)
            tensor = local.tensors[e.key]
            view = tensor.as_strided(e.extent, e.local_strides,
                                     tensor.storage_offset() + e.local_offset)
            index = tuple(slice(s, s + n) for s, n in zip(e.start, e.extent))
            view.copy_(full[index].to(tensor.dtype))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def gpt_model(config, layer_spec, mtp_block_spec, pg_collection, layout: ParallelGrid,
              dtype: str, seed: int, **gpt_kwargs):
    """megatron's GPTModel of this rank's pipeline stage (untied embeddings, rope), seeded,
    with MTP placement and groups when `mtp_block_spec` is given and every parameter in
    `dtype` (the local spec's torch norms ignore params_dtype; TE's would not). Buffers
    (router.expert_bias: float32) are left alone. Shared by the Kimi K2 and GPT builders."""
    # megatron-core (optional dependency): imported where a model is built
    from megatron.core.models.gpt.gpt_model import GPTModel

    def mtp_context(context):  # MTP placement and groups (see each); nothing else changes
        return context if mtp_block_spec is not None else contextlib.nullcontext()

    pp_rank = pg_collection.pp.rank()
    torch.manual_seed(seed)
    with mtp_context(_pipeline_stage(pg_collection.pp)), \
            mtp_context(_mtp_process_groups(pg_collection)):
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            pre_process=pp_rank == 0,
            post_process=pp_rank == layout.pp - 1,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope",
            pg_collection=pg_collection,
            **({"mtp_block_spec": mtp_block_spec} if mtp_block_spec is not None else {}),
            **gpt_kwargs,
        )
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype != _DTYPES[dtype] and param.is_floating_point():
                param.data = param.data.to(_DTYPES[dtype])
    return model


def build_kimi_k2(cfg: KimiK2Config, layout: ParallelGrid, pg_collection, device="cpu",
                  seed: int = 1234, use_transformer_engine: bool | None = None,
                  duplicated_down_proj: bool = True, max_sequence_length: int = 4096,
                  init: str = "canonical", mtp_num_layers: int = 0, **config_overrides) -> list:
    """Kimi K2 `cfg` as megatron-core GPTModel chunks at `layout` ([] off the layout).

    `pg_collection` comes from `build_process_groups(layout)` on this rank. Weights are
    initialized on CPU in `cfg.dtype`, then moved to `device`. `init`:
    - "canonical" (default): every tensor drawn from (seed, canonical name), so the global
      weights are identical at every layout and every expert / layer differs (generates each
      full tensor on every holder: for toy sizes);
    - "megatron": megatron's own CPU init after `torch.manual_seed(seed)` (deterministic per
      layout; routed experts with the same local index are equal on every EP rank, which hides
      expert misrouting from a refit check).
    `use_transformer_engine` None: TE when it is installed and `device` is CUDA.
    `mtp_num_layers` > 0 adds that many multi-token-prediction layers (DeepSeek-V3 / Kimi K2
    MTP; the last pipeline stage holds them, with a copy of the word embedding when pp > 1: a
    CUDA host is then needed, as megatron all-reduces that copy on the GPU); each is a
    transformer layer like the last decoder layer (MoE), under `mtp.layers.{i}.`
    (`transformer_layer.` in 0.16.1, `mtp_model_layer.` in 0.19).
    Extra keyword arguments override `MLATransformerConfig` fields.
    """
    if pg_collection is None:
        return []
    if init not in ("canonical", "megatron"):
        raise ValueError(f"init must be 'canonical' or 'megatron', not {init!r}")
    # megatron-core (optional dependency): imported where a model is built
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    device = torch.device(device)
    if use_transformer_engine is None:
        use_transformer_engine = device.type == "cuda" and _have_te()
    if not use_transformer_engine or not torch.cuda.is_available():
        _patch_megatron_for_cpu()

    if use_transformer_engine:
        config_overrides.setdefault("sequence_parallel", layout.tp > 1)
    if mtp_num_layers:
        if layout.pp > 1 and not torch.cuda.is_available():
            raise ValueError("MTP layers with pp > 1 need CUDA: megatron-core all-reduces the "
                             "last stage's copy of the word embedding on the GPU")
        config_overrides["mtp_num_layers"] = int(mtp_num_layers)
    config = make_transformer_config(cfg, layout, **config_overrides)
    pp_rank = pg_collection.pp.rank()
    spec_kwargs = {}
    if "pp_rank" in inspect.signature(get_gpt_decoder_block_spec).parameters:
        spec_kwargs["pp_rank"] = pp_rank
    def mtp_context(context):  # MTP placement and groups (see each); nothing else changes
        return context if mtp_num_layers else contextlib.nullcontext()

    with mtp_context(_pipeline_stage(pg_collection.pp)):
        block_spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_transformer_engine, **spec_kwargs)
        if duplicated_down_proj and not use_transformer_engine:
            block_spec = _duplicate_down_projections(block_spec)
        mtp_block_spec = None
        if mtp_num_layers:
            # megatron-core: only with MTP layers
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
            mtp_kwargs = {k: v for k, v in spec_kwargs.items()
                          if k in inspect.signature(get_gpt_mtp_block_spec).parameters}
            mtp_block_spec = get_gpt_mtp_block_spec(
                config, block_spec, use_transformer_engine=use_transformer_engine, **mtp_kwargs)

    model = gpt_model(config, block_spec, mtp_block_spec, pg_collection, layout, cfg.dtype, seed,
                      vocab_size=cfg.vocab, max_sequence_length=max_sequence_length)
    if init == "canonical":
        _canonical_init([model], seed)
    # Always: on a machine with CUDA, megatron allocates some buffers (the router's expert_bias
    # and token counts, rotary tables) on torch.cuda.current_device() even for a CPU model.
    model = model.to(device)
    return [model]
