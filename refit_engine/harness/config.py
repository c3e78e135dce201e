"""What one main-job configuration runs (`RunConfig`): the two layouts, where they live, how
many refits, the model. The main job's command line produces one; the sweep builds one per
configuration. `check_layouts` refuses one that cannot be built, before any process starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from refit_engine.errors import RefitError
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


def check_layouts(cfg, src: dict, dst: dict, world: int, non_collocated: bool) -> None:
    """Refuse (RefitError, one reason) a source / destination layout that cannot be built on
    `world` ranks (half of them each when non-collocated): sizes that do not divide the ranks
    or the model's dimensions. Cheap: called before any process starts, and by every rank."""
    if world < 1:
        raise RefitError(f"the world needs at least one rank, not {world}")
    if non_collocated and (world < 2 or world % 2):
        raise RefitError(f"non-collocated runs put the source on one half of the ranks and the "
                         f"destination on the other: the world must be even, not {world}")
    side = world // 2 if non_collocated else world
    where = f"{side} ranks" + (" (half of the world, non-collocated)" if non_collocated else "")
    for name, spec in (("source", src), ("destination", dst)):
        text = ",".join(f"{k}={v}" for k, v in spec.items())
        for key, value in spec.items():
            if value < 1:
                raise RefitError(f"{name} layout {text}: {key} must be >= 1, not {value}")
        tp, pp, ep, etp = spec["tp"], spec["pp"], spec["ep"], spec["etp"]
        if side % (tp * pp):
            raise RefitError(f"{name} layout {text}: TP {tp} x PP {pp} = {tp * pp} does not "
                             f"divide {where}")
        if side % (ep * etp * pp):
            raise RefitError(f"{name} layout {text}: EP {ep} x ETP {etp} x PP {pp} = "
                             f"{ep * etp * pp} does not divide {where}")
        dims = [("attention heads", cfg.num_heads, tp, "TP"), ("vocab", cfg.vocab, tp, "TP"),
                ("dense FFN size", cfg.dense_ffn, tp, "TP"),
                ("shared-expert FFN size", cfg.shared_expert_ffn, tp, "TP"),
                ("experts", cfg.num_experts, ep, "EP"), ("expert FFN size", cfg.moe_ffn, etp, "ETP")]
        for what, size, parts, label in dims:
            if size % parts:
                raise RefitError(f"{name} layout {text}: the model's {size} {what} do not "
                                 f"divide by {label} {parts}")
        if cfg.num_layers < pp:
            raise RefitError(f"{name} layout {text}: {cfg.num_layers} layers cannot fill "
                             f"{pp} pipeline stages")
        base, extra = divmod(cfg.num_layers, pp)
        if extra not in (0, 1, pp - 1):  # megatron_builder._uneven_pipeline's rule
            raise RefitError(f"{name} layout {text}: megatron cannot split {cfg.num_layers} "
                             f"layers over {pp} stages (only the first or last stage may differ)")
