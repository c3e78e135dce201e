"""megatron-core's refit test models (`tests/unit_tests/resharding/test_model_swap.py`): a small
GPT (GQA, dense or MoE, latent MoE, MTP, router expert bias) at any TP/PP/EP on any ranks.

The model facts follow megatron's test (main = core_r0.19.0): hidden 32, 8 heads, 4 query
groups, ffn 128, vocab 128, sequence 8, 2 layers (4 when either side of the pair is
pipelined), fp32, `moe_router_dtype="fp64"`, rope, untied embeddings; MoE: 4 experts,
`moe_ffn_hidden_size` = ffn, no linear biases; "latent": `moe_latent_size=16`, shared experts
of 64, SwiGLU; "latent_mtp": + one MTP layer; expert bias: sigmoid scores, experts of 64.
Expert TP equals TP there (its expert TP group is the TP group): `megatron_test_grid` builds
such a `ParallelGrid`.

Where this differs from megatron's test, and why:
- Spec: megatron's test uses the Transformer Engine spec with grouped experts (TEGroupedMLP,
  `experts.linear_fc{1,2}.weight<k>`). Without TE (or without CUDA) this builds megatron's
  local spec with SequentialMLP experts (`experts.local_experts.<k>.`); with TE and CUDA, the
  TE spec as megatron does.
- Rank order: megatron's test builds its groups with `HyperCommGrid([tp, cp, ep, pp, dp])`
  (pipeline before data parallel); `build_process_groups` uses megatron's default order
  "tp-cp-ep-dp-pp" (data parallel before pipeline). The sizes, not the order, are the case.
- Token dispatcher: alltoall as megatron, but allgather on CUDA-less hosts (alltoall creates a
  CUDA stream in its constructor; the dispatcher holds no weights).
- Weights: drawn per canonical tensor from a seed (`megatron_builder._canonical_init`), so
  both models of a pair hold known, distinct global weights and a check needs no forward pass.

Latent MoE needs Transformer Engine in megatron-core (0.16.1 through main build the latent
projections with `TELinear(parallel_mode="duplicated")`); without TE they are built as plain
duplicated linears by `megatron_builder._patch_megatron_for_cpu` (same names and shapes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
from dataclasses import dataclass

import torch

from refit_engine.harness.grid import ParallelGrid
from refit_engine.harness.models.megatron_builder import (
    _DTYPES,
    _canonical_init,
    _have_te,
    _patch_megatron_for_cpu,
    _pipeline_stage,
    gpt_model,
    megatron_version,
)

__all__ = ["GPTTestConfig", "build_gpt", "mamba_unavailable", "megatron_test_grid",
           "unsupported"]


@dataclass(frozen=True)
class GPTTestConfig:
    """One model of megatron's refit tests. `moe_mode`: None, "latent" or "latent_mtp"."""

    num_layers: int = 2
    hidden: int = 32
    heads: int = 8
    query_groups: int = 4
    ffn: int = 128
    vocab: int = 128
    seq_len: int = 8
    num_experts: int | None = None
    moe_ffn: int | None = None  # None: ffn (megatron's GPT cases)
    moe_mode: str | None = None
    expert_bias: bool = False
    dtype: str = "float32"

    @classmethod
    def swap_gpt(cls, num_experts=None, moe_mode=None, pipelined=False, dtype="float32"):
        """A `test_swap_gpt_parametrized` model (`pipelined`: either side has PP > 1)."""
        return cls(num_layers=4 if pipelined else 2, num_experts=num_experts, moe_mode=moe_mode,
                   dtype=dtype)

    @classmethod
    def expert_bias_moe(cls, dtype="float32"):
        """A `test_router_expert_bias_refit*` model."""
        return cls(num_experts=4, moe_ffn=64, expert_bias=True, dtype=dtype)

    @property
    def mtp_num_layers(self) -> int:
        return 1 if self.moe_mode == "latent_mtp" else 0


def megatron_test_grid(world: int, tp: int = 1, pp: int = 1, ep: int = 1,
                       offset: int = 0) -> ParallelGrid:
    """The layout of a megatron refit-test model: expert TP = TP (its expert TP group is the
    TP group)."""
    return ParallelGrid(world, tp=tp, pp=pp, ep=ep, etp=tp, offset=offset)


def _config_fields() -> set:
    # megatron-core (optional dependency): imported where a model is configured
    from megatron.core.transformer.transformer_config import TransformerConfig
    return {f.name for f in dataclasses.fields(TransformerConfig)}


def unsupported(cfg: GPTTestConfig, layout: ParallelGrid | None = None) -> str | None:
    """Why the installed megatron-core cannot build `cfg` at `layout` here (None: it can)."""
    fields = _config_fields()
    needed = []
    if cfg.moe_mode in ("latent", "latent_mtp"):
        needed.append("moe_latent_size")
    if cfg.mtp_num_layers:
        needed.append("mtp_num_layers")
    if cfg.expert_bias:
        needed.append("moe_router_enable_expert_bias")
    missing = [name for name in needed if name not in fields]
    if missing:
        return (f"megatron-core {megatron_version()} has no TransformerConfig field "
                f"{', '.join(missing)}")
    if cfg.mtp_num_layers and layout is not None and layout.pp > 1 \
            and not torch.cuda.is_available():
        return ("MTP with pp > 1 needs CUDA: megatron-core all-reduces the last stage's copy "
                "of the word embedding on the GPU")
    return None


def mamba_unavailable() -> str | None:
    """Why megatron's hybrid Mamba models cannot be built here (None: they can, but this
    module has no builder for them yet)."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return ("mamba_ssm is not importable (it needs a CUDA build); megatron-core's Mamba "
                "mixer requires it")
    return ("mamba_ssm is importable, but refit_engine.harness.models.megatron_gpt has no "
            "HybridModel builder yet")


def make_gpt_config(cfg: GPTTestConfig, layout: ParallelGrid, **overrides):
    """The megatron `TransformerConfig` of `cfg` at `layout`."""
    # megatron-core (optional dependency): imported where a model is configured
    from megatron.core.transformer.transformer_config import TransformerConfig

    reason = unsupported(cfg, layout)
    if reason:
        raise NotImplementedError(reason)
    dtype = _DTYPES[cfg.dtype]
    kwargs = {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden,
        "num_attention_heads": cfg.heads,
        "num_query_groups": cfg.query_groups,
        "ffn_hidden_size": cfg.ffn,
        "use_cpu_initialization": True,
        "perform_initialization": True,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype is torch.bfloat16,
        "fp16": dtype is torch.float16,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "moe_router_dtype": "fp64",
        "moe_token_dispatcher_type": "alltoall" if torch.cuda.is_available() else "allgather",
        "tensor_model_parallel_size": layout.tp,
        "pipeline_model_parallel_size": layout.pp,
        "expert_model_parallel_size": layout.ep,
        "expert_tensor_parallel_size": layout.etp,
        "sequence_parallel": False,
        # no fused kernels (CPU)
        "gradient_accumulation_fusion": False,
        "masked_softmax_fusion": False,
        "bias_dropout_fusion": False,
        "bias_activation_fusion": False,
        "persist_layer_norm": False,
    }
    if cfg.num_experts:
        if cfg.num_experts % layout.ep:
            raise ValueError(f"{cfg.num_experts} experts do not divide by ep {layout.ep}")
        kwargs.update(num_moe_experts=cfg.num_experts,
                      moe_ffn_hidden_size=cfg.moe_ffn or cfg.ffn,
                      moe_grouped_gemm=False,  # set by build_gpt for the TE spec
                      add_bias_linear=False)
    if cfg.moe_mode in ("latent", "latent_mtp"):
        kwargs.update(moe_latent_size=16, moe_shared_expert_intermediate_size=64,
                      activation_func=torch.nn.functional.silu, gated_linear_unit=True)
    if cfg.mtp_num_layers:
        kwargs["mtp_num_layers"] = cfg.mtp_num_layers
    if cfg.expert_bias:
        kwargs.update(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _layer_spec(cfg: GPTTestConfig, use_te: bool):
    # megatron-core (optional dependency): imported where a model is built
    from megatron.core.models.gpt import gpt_layer_specs as specs
    if use_te:  # megatron's test: TE spec, grouped experts
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=cfg.num_experts, moe_grouped_gemm=bool(cfg.num_experts))
    return specs.get_gpt_layer_local_spec(num_experts=cfg.num_experts, moe_grouped_gemm=False)


def build_gpt(cfg: GPTTestConfig, layout: ParallelGrid, pg_collection, seed: int = 1234,
              device="cpu", use_transformer_engine: bool | None = None,
              **config_overrides) -> list:
    """`cfg` as megatron-core GPTModel chunks at `layout` ([] off the layout).

    `pg_collection` comes from `megatron_builder.build_process_groups(layout)` on this rank.
    Every parameter and persistent buffer is drawn from (seed, canonical name): the same global
    weights at every layout. `use_transformer_engine` None: TE when it is installed and CUDA is
    available (megatron's test spec), else the local spec with SequentialMLP experts. Extra
    keyword arguments override `TransformerConfig` fields.
    """
    if pg_collection is None:
        return []
    # megatron-core (optional dependency): imported where a model is built

    if use_transformer_engine is None:
        use_transformer_engine = _have_te() and torch.cuda.is_available()
    if not use_transformer_engine or not torch.cuda.is_available():
        _patch_megatron_for_cpu()
    if use_transformer_engine and cfg.num_experts:
        config_overrides.setdefault("moe_grouped_gemm", True)
    config = make_gpt_config(cfg, layout, **config_overrides)
    pp_rank = pg_collection.pp.rank()
    spec = _layer_spec(cfg, use_transformer_engine)

    def mtp_context(context):  # MTP placement and groups (see each); nothing else changes
        return context if cfg.mtp_num_layers else contextlib.nullcontext()

    mtp_block_spec = None
    if cfg.mtp_num_layers:
        # megatron-core: only with MTP layers
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
        accepted = inspect.signature(get_gpt_mtp_block_spec).parameters
        extra = {"pp_rank": pp_rank} if "pp_rank" in accepted else {}
        with _pipeline_stage(pg_collection.pp):
            mtp_block_spec = get_gpt_mtp_block_spec(
                config, spec, use_transformer_engine=use_transformer_engine, **extra)

    model = gpt_model(config, spec, mtp_block_spec, pg_collection, layout, cfg.dtype, seed,
                      vocab_size=cfg.vocab, max_sequence_length=cfg.seq_len,
                      parallel_output=False, rotary_percent=1.0)
    _canonical_init([model], seed)
    return [model.to(device)]
