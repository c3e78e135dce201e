"""What one main-job configuration runs (`RunConfig`): the two layouts, where they live, how
many refits, the model. The main job's command line produces one; the sweep builds one per
configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from refit_engine.harness.models.kimi_k2 import KimiK2Config

DEFAULT_TOY = dict(num_layers=4, hidden=256, num_heads=8, q_lora_rank=64, kv_lora_rank=32,
                   qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, dense_ffn=512,
                   num_experts=16, moe_ffn=128, router_topk=2, shared_expert_ffn=128, vocab=4096)


def model_config(full_size: bool, overrides: dict) -> KimiK2Config:
    """Kimi K2 at published sizes (overrides may lower num_layers etc.), or the toy model."""
    if full_size:
        return KimiK2Config(**overrides)
    return KimiK2Config.toy(**{**DEFAULT_TOY, **overrides})


@dataclass(frozen=True)
class RunConfig:
    """One refit configuration. `src` / `dst`: layout sizes {"tp", "pp", "ep", "etp"} (as
    grid.parse_layout_spec gives them); `non_collocated`: the source on the first half of the
    ranks, the destination on the rest; `megatron`: also time megatron-core's refit;
    `model`: KimiK2Config overrides; `full_size`: published sizes, else the toy model."""

    src: dict
    dst: dict
    non_collocated: bool = False
    iters: int = 5
    warmup: int = 2
    bucket_mib: int = 64
    megatron: bool = True
    model: dict = field(default_factory=dict)
    full_size: bool = False

    def model_config(self) -> KimiK2Config:
        return model_config(self.full_size, self.model)

    @property
    def mode(self) -> str:
        return "non-collocated" if self.non_collocated else "collocated"
