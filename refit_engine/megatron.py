"""megatron-core adapter: layouts from GPT models, and a drop-in `swap_model_weights`.

`describe(model)` reads this rank's parameters (and persistent buffers such as the router's
expert bias) of megatron-core model chunks and says which piece of which global tensor each
holds, from megatron's own parameter attributes and process groups:

- `tensor_model_parallel`, `partition_dim`, `partition_stride` give the TP split (stride 2 on
  SwiGLU fc1, its experts and shared experts); routed-expert parameters split over the
  expert-TP group, all others over the TP group; everything else is replicated;
- canonical names use global layer numbers (`layer_number` of each transformer layer, so PP
  stages agree) and global expert indices (each MoE layer's `local_expert_indices`), for both
  SequentialMLP (`experts.local_experts.{k}.`) and TEGroupedMLP (`experts.linear_fc1.weight{k}`).

Switching from megatron-core's refit is one import:

    from refit_engine.megatron import swap_model_weights
    swap_model_weights(train_model, inference_model, refit_method="gloo")
"""

from __future__ import annotations

import re

import torch.distributed as dist

from refit_engine.errors import RefitError
from refit_engine.layouts import Split
from refit_engine.local import ShardedTensors

_LAYER = re.compile(r"^(?P<pre>(?:.*\.)?decoder\.layers\.)(?P<i>\d+)\.")
_SEQUENTIAL_EXPERT = re.compile(r"\.experts\.local_experts\.(?P<k>\d+)\.")
# TE grouped expert weights (`linear_fc1.weight3`): the only expert names megatron-core's own
# refit maps to global experts.
GROUPED_EXPERT = re.compile(r"\.experts\.(?P<fc>linear_fc[12])\.(?P<kind>weight|bias)(?P<k>\d+)$")
_LEGACY_GROUPED = re.compile(r"\.experts\.weight[12]$")


def _chunks(model) -> list:
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = []
    for chunk in chunks:
        while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
            chunk = chunk.module  # DDP / Float16Module wrappers
        out.append(chunk)
    return out


def _pg_collection(chunk):
    pgc = getattr(chunk, "pg_collection", None)
    if pgc is None:
        from megatron.core.process_groups_config import ProcessGroupCollection
        pgc = ProcessGroupCollection.use_mpu_process_groups()
    return pgc


def _group_part(group) -> tuple[int, int]:
    """(size, this rank's index) of a process group (1, 0 when absent)."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _layers(chunk) -> dict[int, tuple[int, list[int]]]:
    """Local layer index in the module names -> (global layer index, global index of each
    local expert). megatron names layers per pipeline stage but numbers them globally
    (`layer_number`, 1-based), and each MoE layer lists its experts' global indices."""
    layers = getattr(getattr(chunk, "decoder", None), "layers", None) or []
    return {i: (int(layer.layer_number) - 1,
                [int(e) for e in getattr(getattr(layer, "mlp", None), "local_expert_indices", [])])
            for i, layer in enumerate(layers)}


def canonical_name(name: str, layers: dict[int, tuple[int, list[int]]]) -> str:
    """Global layer and expert indices in place of this rank's local ones."""
    m = _LAYER.match(name)
    if not m:
        return name
    layer, experts = layers.get(int(m["i"]), (int(m["i"]), []))
    name = f"{m['pre']}{layer}." + name[m.end():]
    e = _SEQUENTIAL_EXPERT.search(name) or GROUPED_EXPERT.search(name)
    if e:
        expert = experts[int(e["k"])]
        tail = name[e.end():] if "fc" not in e.groupdict() else f"{e['fc']}.{e['kind']}"
        return f"{name[:e.start()]}.experts.{expert}.{tail}"
    return name


def _tensors(chunk):
    """(local name, tensor, is_parameter) for parameters and persistent buffers."""
    for name, param in chunk.named_parameters():
        yield name, param, True
    for module_name, module in chunk.named_modules():
        for buf_name, buf in module._buffers.items():
            if buf is None or buf_name in module._non_persistent_buffers_set:
                continue
            yield (f"{module_name}.{buf_name}" if module_name else buf_name), buf, False


def describe(model) -> ShardedTensors:
    """This rank's pieces of every parameter and persistent buffer of `model` (chunk or list)."""
    local = ShardedTensors()
    chunks = _chunks(model)
    for index, chunk in enumerate(chunks):
        pgc = _pg_collection(chunk)
        tp, expert_tp, ep = getattr(pgc, "tp", None), getattr(pgc, "expt_tp", None), getattr(pgc, "ep", None)
        layers = _layers(chunk)
        for name, tensor, is_param in _tensors(chunk):
            if _LEGACY_GROUPED.search(name):
                raise RefitError("legacy GroupedMLP weights (experts stored transposed in one "
                                 "matrix) are not supported; use SequentialMLP or TEGroupedMLP",
                                 tensor=name, ranks=[dist.get_rank()])
            canonical = canonical_name(name, layers)
            data = tensor.data if is_param else tensor
            split, part = None, 0
            if is_param and getattr(tensor, "tensor_model_parallel", False):
                # Routed experts split over the expert-TP group. Known by name: megatron marks
                # them allreduce=False only when EP > 1.
                is_expert = bool(_SEQUENTIAL_EXPERT.search(name) or GROUPED_EXPERT.search(name))
                parts, part = _group_part(expert_tp if is_expert else tp)
                if parts > 1:
                    split = Split(int(tensor.partition_dim), parts,
                                  stride=int(getattr(tensor, "partition_stride", 1)))
            shape = list(data.shape)
            if split:
                shape[split.dim] *= split.parts
            key = f"{index}.{name}" if len(chunks) > 1 else name
            local.add(canonical, data, shape, split, part, key=key)
            if is_param:  # the parameter may get a new .data later: plans re-check it
                local.current[key] = tensor
        for group in (tp, expert_tp, ep, getattr(pgc, "pp", None)):
            if group is not None:
                local.claimed_ranks.update(dist.get_process_group_ranks(group))
    return local


def swap_model_weights(src_model, target_model, refit_method="gloo", group=None, **plan_kwargs):
    """Drop-in for megatron-core's `swap_model_weights(src_model, target_model, refit_method)`.

    The first call on a target model plans (one collective over `group`) and caches the plan on
    it; later calls only execute. `refit_method` is accepted for compatibility: the executor is
    chosen by where the tensors live (CPU -> gloo). Pass None for a model this rank lacks.
    """
    import refit_engine
    present = target_model if target_model is not None else src_model
    holder = _chunks(present)[0] if present is not None else _no_target
    plan = getattr(holder, "_refit_engine_plan", None)
    if plan is None:
        plan = refit_engine.plan(src_model, target_model, group=group, **plan_kwargs)
        holder._refit_engine_plan = plan
    return refit_engine.execute(plan)


class _NoTarget:
    """Where ranks without a target model cache their plan."""


_no_target = _NoTarget()
