"""Kimi K2 (DeepSeek-V3 family): the published architecture, scale knobs for toy sizes, its
parameter list with megatron-core's names and tensor-parallel attributes, and synthetic layouts
of it at any parallel layout (for planner benchmarks and tests without building the model).

Parameter names and TP attributes follow megatron-core's GPT model with the Transformer Engine
spec and MLA (q/kv layer norms fused into the up projections as `layer_norm_weight`; the
down projections duplicated on every TP rank; SwiGLU fc1 with partition stride 2). Routed
experts use the canonical name `decoder.layers.{layer}.mlp.experts.{global expert}.{fc}.weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from refit_engine import dtypes
from refit_engine.harness.grid import ParallelGrid
from refit_engine.layouts import Layout, Split, part_pieces, row_major_strides
from refit_engine.tables import (BUFFER, BUFFER_FIELDS, PIECE, PIECE_FIELDS, TENSOR,
                                 TENSOR_FIELDS, LayoutTables, span)


@dataclass(frozen=True)
class KimiK2Config:
    num_layers: int = 61
    first_dense_layers: int = 1
    hidden: int = 7168
    num_heads: int = 64
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    dense_ffn: int = 18432
    num_experts: int = 384
    moe_ffn: int = 2048
    router_topk: int = 8
    shared_expert_ffn: int = 2048
    vocab: int = 163840
    dtype: str = "bfloat16"

    @classmethod
    def toy(cls, **changes) -> "KimiK2Config":
        """A tiny Kimi K2 of the same structure, for tests."""
        base = dict(num_layers=3, hidden=64, num_heads=4, q_lora_rank=32, kv_lora_rank=16,
                    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, dense_ffn=96,
                    num_experts=8, moe_ffn=32, router_topk=2, shared_expert_ffn=32, vocab=256)
        base.update(changes)
        return cls(**base)


class Param(NamedTuple):
    """One parameter: where TP or expert-TP splits it (`split` None: replicated)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    split: tuple[int, int] | None  # (dim, partition stride)
    layer: int | None  # global layer (None: embedding, output layer, final norm)
    expert: int | None  # global expert index for routed experts


def kimi_k2_parameters(cfg: KimiK2Config) -> Iterator[Param]:
    h, dt = cfg.hidden, cfg.dtype
    yield Param("embedding.word_embeddings.weight", (cfg.vocab, h), dt, (0, 1), None, None)
    for layer in range(cfg.num_layers):
        p = f"decoder.layers.{layer}."
        a = p + "self_attention."
        yield Param(p + "input_layernorm.weight", (h,), dt, None, layer, None)
        yield Param(a + "linear_q_down_proj.weight", (cfg.q_lora_rank, h), dt, None, layer, None)
        yield Param(a + "linear_q_up_proj.layer_norm_weight", (cfg.q_lora_rank,), dt, None, layer, None)
        q_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        yield Param(a + "linear_q_up_proj.weight", (cfg.num_heads * q_head, cfg.q_lora_rank), dt,
                    (0, 1), layer, None)
        yield Param(a + "linear_kv_down_proj.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h),
                    dt, None, layer, None)
        yield Param(a + "linear_kv_up_proj.layer_norm_weight", (cfg.kv_lora_rank,), dt, None, layer, None)
        kv_head = cfg.qk_nope_head_dim + cfg.v_head_dim
        yield Param(a + "linear_kv_up_proj.weight", (cfg.num_heads * kv_head, cfg.kv_lora_rank), dt,
                    (0, 1), layer, None)
        yield Param(a + "linear_proj.weight", (h, cfg.num_heads * cfg.v_head_dim), dt, (1, 1), layer, None)
        m = p + "mlp."
        if layer < cfg.first_dense_layers:
            yield Param(m + "linear_fc1.layer_norm_weight", (h,), dt, None, layer, None)
            yield Param(m + "linear_fc1.weight", (2 * cfg.dense_ffn, h), dt, (0, 2), layer, None)
            yield Param(m + "linear_fc2.weight", (h, cfg.dense_ffn), dt, (1, 1), layer, None)
            continue
        yield Param(p + "pre_mlp_layernorm.weight", (h,), dt, None, layer, None)
        yield Param(m + "router.weight", (cfg.num_experts, h), dt, None, layer, None)
        yield Param(m + "router.expert_bias", (cfg.num_experts,), "float32", None, layer, None)
        s = m + "shared_experts."
        yield Param(s + "linear_fc1.weight", (2 * cfg.shared_expert_ffn, h), dt, (0, 2), layer, None)
        yield Param(s + "linear_fc2.weight", (h, cfg.shared_expert_ffn), dt, (1, 1), layer, None)
        for e in range(cfg.num_experts):
            x = f"{m}experts.{e}."
            yield Param(x + "linear_fc1.weight", (2 * cfg.moe_ffn, h), dt, (0, 2), layer, e)
            yield Param(x + "linear_fc2.weight", (h, cfg.moe_ffn), dt, (1, 1), layer, e)
    yield Param("decoder.final_layernorm.weight", (h,), dt, None, None, None)
    yield Param("output_layer.weight", (cfg.vocab, h), dt, (0, 1), None, None)


def parameter_count(cfg: KimiK2Config) -> int:
    return sum(math.prod(p.shape) for p in kimi_k2_parameters(cfg))


def stage_of(cfg: KimiK2Config, grid: ParallelGrid, param: Param) -> int:
    """The pipeline stage holding `param`: its layer's, the first for the embedding, the last
    for the final norm and the output layer."""
    if param.layer is not None:
        return grid.stage_of_layer(cfg.num_layers, param.layer)
    return 0 if param.name.startswith("embedding") else grid.pp - 1


def kimi_k2_layout(cfg: KimiK2Config, grid: ParallelGrid, grouped_experts: bool = False) -> Layout:
    """Where every Kimi K2 parameter lives under `grid` (megatron-core's placement).

    Dense parameters: TP over `grid.tp` on their split dim, DP replicas. Routed experts: EP over
    `grid.ep`, expert TP over `grid.etp`, expert-DP replicas; `grouped_experts` stores each
    layer's local experts in one buffer per rank (TEGroupedMLP-like) instead of one each.
    """
    layout = Layout()
    dense_holders = [grid.dense_holders(stage) for stage in range(grid.pp)]
    per_rank = cfg.num_experts // grid.ep if cfg.num_experts % grid.ep == 0 else 0
    for param in kimi_k2_parameters(cfg):
        stage = stage_of(cfg, grid, param)
        if param.expert is None:
            parts = grid.tp
            split = Split(param.split[0], parts, stride=param.split[1]) \
                if param.split and parts > 1 else None
            layout.place(param.name, param.shape, param.dtype, dense_holders[stage], split)
            continue
        split = Split(param.split[0], grid.etp, stride=param.split[1]) if grid.etp > 1 else None
        holders = grid.expert_holders(param.expert, cfg.num_experts, stage)
        if not grouped_experts:
            layout.place(param.name, param.shape, param.dtype, [(r, part) for r, part, _ in holders], split)
            continue
        local_shape = split.local_shape(param.name, param.shape) if split else param.shape
        numel = math.prod(local_shape)
        fc = param.name.rsplit(".", 2)[-2]
        key = f"decoder.layers.{param.layer}.mlp.experts.{fc}"
        for rank, part, local in holders:
            layout.place(param.name, param.shape, param.dtype, [(rank, part)], split, key=key,
                         offset=local * numel, buffer_shape=(per_rank,) + tuple(local_shape))
    return layout


def loopback_pair(layers: int, experts: int) -> tuple[Layout, Layout]:
    """The loopback benchmarks' refit (bench/loopback.py, bench/loopback_fp8.py): Kimi K2 at
    full width and expert size with `layers` layers and `experts` experts, TP8/EP8 -> TP4/EP4
    on the same 8 ranks."""
    cfg = KimiK2Config(num_layers=layers, num_experts=experts)
    return (kimi_k2_layout(cfg, ParallelGrid(8, tp=8, ep=8)),
            kimi_k2_layout(cfg, ParallelGrid(8, tp=4, ep=4)))


def kimi_k2_tables(cfg: KimiK2Config, grid: ParallelGrid):
    """The plan compiler's tables (a `tables.LayoutTables`: names, tensors, buffers, pieces,
    holders, columns by their names in refit_engine.tables) of
    `kimi_k2_layout(cfg, grid)` with one local tensor per parameter, built with NumPy per
    parameter instead of per placement: for cluster-scale plans (2048 ranks: millions of
    placements) where a Layout object would be slow and large. The blocks of one part share
    one run of holders. tests/test_kimi_k2.py checks it describes the Layout's placements."""
    names, tensor_rows, buffer_parts, piece_rows, holder_parts = [], [], [], [], []
    next_buffer = next_holder = 0
    dense = [np.array(grid.dense_holders(s), dtype=np.int64).reshape(-1, 2) for s in range(grid.pp)]
    shape_cols = span(TENSOR, "shape")
    start_cols, extent_cols, stride_cols = (span(PIECE, "start"), span(PIECE, "extent"),
                                            span(PIECE, "stride"))
    for t, param in enumerate(kimi_k2_parameters(cfg)):
        names.append(param.name)
        ndim, itemsize = len(param.shape), dtypes.itemsize(param.dtype)
        tensor = np.zeros(len(TENSOR_FIELDS), dtype=np.int64)
        tensor[TENSOR["ndim"]], tensor[TENSOR["itemsize"]] = ndim, itemsize
        tensor[TENSOR["dtype_code"]] = dtypes.dtype_code(param.dtype)
        tensor[shape_cols.start:shape_cols.start + ndim] = param.shape
        tensor_rows.append(tensor)
        stage = stage_of(cfg, grid, param)
        if param.expert is None:
            holders, parts_n = dense[stage], grid.tp
        else:
            h = grid.expert_holders(param.expert, cfg.num_experts, stage)
            holders, parts_n = np.array([(r, p) for r, p, _ in h], dtype=np.int64), grid.etp
        split = Split(param.split[0], parts_n, stride=param.split[1]) \
            if param.split and parts_n > 1 else None
        local_shape = split.local_shape(param.name, param.shape) if split else param.shape
        n = len(holders)
        buffers = np.arange(next_buffer, next_buffer + n, dtype=np.int64)
        next_buffer += n
        part_buffers = np.zeros((n, len(BUFFER_FIELDS)), dtype=np.int64)
        part_buffers[:, BUFFER["rank"]] = holders[:, 0]
        part_buffers[:, BUFFER["numel"]] = int(np.prod(local_shape))
        part_buffers[:, BUFFER["itemsize"]] = itemsize
        buffer_parts.append(part_buffers)
        strides = row_major_strides(local_shape)
        base = np.zeros(len(PIECE_FIELDS), dtype=np.int64)
        base[PIECE["tensor"]] = t
        base[extent_cols.start:extent_cols.start + ndim] = param.shape
        base[stride_cols.start:stride_cols.start + ndim] = strides
        for part in range(parts_n if split else 1):
            mine = np.flatnonzero(holders[:, 1] == part) if split else np.arange(n)
            mine = mine[np.argsort(holders[mine, 0], kind="stable")]  # ascending rank
            holder_parts.append(buffers[mine])
            base[PIECE["holders_first"]], base[PIECE["holders_count"]] = next_holder, len(mine)
            next_holder += len(mine)
            if split is None:
                piece_rows.append(base.copy())
                continue
            for start, extent, local_offset in part_pieces(param.name, param.shape, split, part,
                                                           strides):
                row = base.copy()
                row[PIECE["local_offset"]] = local_offset
                row[start_cols.start:start_cols.start + ndim] = start
                row[extent_cols.start:extent_cols.start + ndim] = extent
                piece_rows.append(row)
    return LayoutTables(names, np.array(tensor_rows, dtype=np.int64).reshape(-1, len(TENSOR_FIELDS)),
                        np.concatenate(buffer_parts),
                        np.array(piece_rows, dtype=np.int64).reshape(-1, len(PIECE_FIELDS)),
                        np.concatenate(holder_parts))
