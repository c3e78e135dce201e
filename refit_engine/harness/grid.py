"""Megatron-core's rank order for a parallel layout, as plain rank arithmetic.

Dense parameters use the decoder grid (tp fastest, then dp, then pp: megatron's default order
"tp-cp-ep-dp-pp" with cp = 1, where ep is folded into dp for dense parameters); expert
parameters use the expert grid (etp fastest, then ep, then expert-dp, then pp). `offset` shifts
every rank, which is how a non-collocated model lives on ranks of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from refit_engine.errors import RefitError


@dataclass(frozen=True)
class ParallelGrid:
    world: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    offset: int = 0

    def __post_init__(self):
        for name in ("world", "tp", "pp", "ep", "etp"):
            if getattr(self, name) < 1:
                raise RefitError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.world % (self.tp * self.pp):
            raise RefitError(f"world size {self.world} is not divisible by tp*pp = "
                             f"{self.tp}*{self.pp}", ranks=self.ranks)
        if self.world % (self.ep * self.etp * self.pp):
            raise RefitError(f"world size {self.world} is not divisible by ep*etp*pp = "
                             f"{self.ep}*{self.etp}*{self.pp}", ranks=self.ranks)

    @property
    def ranks(self) -> list[int]:
        return list(range(self.offset, self.offset + self.world))

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        """Expert data parallel size: replicas of each expert shard."""
        return self.world // (self.ep * self.etp * self.pp)

    def dense_holders(self, stage: int = 0) -> list[tuple[int, int]]:
        """(rank, tp index) of every rank of pipeline stage `stage`, DP replicas included."""
        per_stage = self.tp * self.dp
        return [(self.offset + stage * per_stage + dp * self.tp + tp, tp)
                for dp in range(self.dp) for tp in range(self.tp)]

    def expert_holders(self, expert: int, num_experts: int, stage: int = 0) -> list[tuple[int, int, int]]:
        """(rank, etp index, local expert index) of every holder of global expert `expert`."""
        if num_experts % self.ep:
            raise RefitError(f"{num_experts} experts do not divide over ep = {self.ep}",
                             ranks=self.ranks)
        per_rank = num_experts // self.ep
        ep_index, local = divmod(expert, per_rank)
        per_stage = self.etp * self.ep * self.edp
        return [(self.offset + stage * per_stage + (edp * self.ep + ep_index) * self.etp + etp, etp, local)
                for edp in range(self.edp) for etp in range(self.etp)]

    def stage_of_layer(self, num_layers: int, layer: int) -> int:
        """The pipeline stage holding global layer `layer` (inverse of `stage_layers`)."""
        base, extra = divmod(num_layers, self.pp)
        boundary = extra * (base + 1)  # the first `extra` stages hold one layer more
        if layer < boundary:
            return layer // (base + 1)
        return extra + (layer - boundary) // base

    def stage_layers(self, num_layers: int, stage: int) -> range:
        """Global layer indices held by pipeline stage `stage` (as even as possible, earlier
        stages take the remainder)."""
        base, extra = divmod(num_layers, self.pp)
        first = stage * base + min(stage, extra)
        return range(first, first + base + (1 if stage < extra else 0))


def parse_overrides(text: str) -> dict[str, int]:
    """"num_layers=8,hidden=512" -> {"num_layers": 8, "hidden": 512}."""
    return {k: int(v) for k, _, v in (item.partition("=") for item in text.split(",") if item)}


def parse_layout_spec(text: str) -> dict:
    """"tp=2,ep=4,etp=1,pp=1" -> {"tp": 2, "pp": 1, "ep": 4, "etp": 1} (unnamed sizes are 1)."""
    out = {"tp": 1, "pp": 1, "ep": 1, "etp": 1}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in out:
            raise SystemExit(f"unknown layout key '{key}' in '{text}' (tp, pp, ep, etp)")
        out[key] = int(value)
    return out
