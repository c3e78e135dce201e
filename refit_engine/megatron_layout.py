"""megatron-core adapter, layouts: which piece of which global tensor each parameter holds.

`describe(model)` reads this rank's parameters (and persistent buffers such as the router's
expert bias) of megatron-core model chunks and says which piece of which global tensor each
holds, from megatron's own parameter attributes and process groups:

- `tensor_model_parallel`, `partition_dim`, `partition_stride` give the TP split (stride 2 on
  SwiGLU fc1, its experts and shared experts); routed-expert parameters split over the
  expert-TP group, all others over the TP group; everything else is replicated;
- canonical names use global layer numbers (`layer_number` of each decoder and MTP layer, so
  PP stages agree) and global expert indices (each MoE layer's `local_expert_indices`, in
  decoder and MTP layers alike), for both SequentialMLP (`experts.local_experts.{k}.`) and
  TEGroupedMLP (`experts.linear_fc1.weight{k}`): see `Naming`.

`refit.plan` describes megatron models with it; `refit_engine.megatron` (the drop-in
`swap_model_weights`) re-exports it. Nothing here imports refit.py, so both can import it.
"""

from __future__ import annotations

import re

import torch.distributed as dist

from refit_engine.channel import group_ranks
from refit_engine.errors import RefitError
from refit_engine.layouts import Split
from refit_engine.local import ShardedTensors

# TE grouped expert weights (`linear_fc1.weight3`): the only expert names megatron-core's own
# refit maps to global experts.
GROUPED_EXPERT = re.compile(r"\.experts\.(?P<fc>linear_fc[12])\.(?P<kind>weight|bias)(?P<k>\d+)$")
_SEQUENTIAL_TAIL = re.compile(r"^local_experts\.(?P<k>\d+)\.(?P<rest>.+)$")
_GROUPED_TAIL = re.compile(r"^(?P<fc>linear_fc[12])\.(?P<kind>weight|bias)(?P<k>\d+)$")


def _chunks(model) -> list:
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = []
    for chunk in chunks:
        while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
            chunk = chunk.module  # DDP / Float16Module wrappers
        out.append(chunk)
    return out


def _pg_collection(chunk):
    """The chunk's process groups: `pg_collection` (megatron-core >= 0.15; from 0.19 a
    collection answers None for groups it was not given), `model_comm_pgs` (0.14), else
    megatron's global `parallel_state` groups."""
    pgc = getattr(chunk, "pg_collection", None)
    if pgc is None:
        pgc = getattr(chunk, "model_comm_pgs", None)
    if pgc is None:
        # optional: megatron-core is needed only for models without their own groups
        from megatron.core.process_groups_config import ProcessGroupCollection
        pgc = ProcessGroupCollection.use_mpu_process_groups()
    return pgc


def _group_part(group) -> tuple[int, int]:
    """(size, this rank's index) of a process group (1, 0 when absent)."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _this_rank() -> list[int]:
    return [dist.get_rank()] if dist.is_initialized() else []


class Naming:
    """Local -> canonical names of one model chunk, read from its modules.

    - Layers: every `ModuleList` named `layers` whose modules carry a `layer_number` (decoder
      layers: global and 1-based, so pipeline stages agree; MTP layers: 1-based after the MTP
      layers of earlier stages) is renumbered `layer_number - 1`.
    - Experts: every module with `local_expert_indices` and an `experts` child (MoELayer, in
      decoder and MTP layers alike) maps its experts' local index to the global one; an
      `...experts` module without such a parent maps local k to ep_rank * num_local_experts + k.
      SequentialMLP `experts.local_experts.{k}.{rest}` and TEGroupedMLP
      `experts.linear_fc{1,2}.{weight,bias}{k}` both become `experts.{global}.{...}`.
    """

    def __init__(self, chunk):
        self.layers: dict[str, dict[int, int]] = {}  # "<path>.layers." -> {local: global}
        self.experts: dict[str, list[int]] = {}  # "<path>.experts." -> global index of local k
        modules = list(chunk.named_modules())
        for name, module in modules:
            dot = f"{name}." if name else ""
            if name.rsplit(".", 1)[-1] == "layers" and hasattr(module, "__iter__"):
                try:
                    numbers = [int(getattr(layer, "layer_number")) for layer in module]
                except (AttributeError, TypeError, ValueError):
                    numbers = []
                if numbers and len(set(numbers)) == len(numbers):
                    self.layers[dot] = {i: n - 1 for i, n in enumerate(numbers)}
            indices = getattr(module, "local_expert_indices", None)
            if indices is not None and getattr(module, "experts", None) is not None:
                self.experts[f"{dot}experts."] = [int(e) for e in indices]
        for name, module in modules:  # experts modules no MoE layer above lists
            prefix = f"{name}."
            if name.rsplit(".", 1)[-1] != "experts" or prefix in self.experts:
                continue
            local, ep = getattr(module, "num_local_experts", None), getattr(module, "ep_group", None)
            if local is not None:
                size, rank = _group_part(ep)
                self.experts[prefix] = [rank * int(local) + k for k in range(int(local))]
        # Innermost first: an inner prefix still holds the outer local index.
        self._experts = sorted(self.experts.items(), key=lambda kv: -len(kv[0]))
        self._layers = sorted(self.layers.items(), key=lambda kv: -len(kv[0]))

    def expert_prefix(self, name: str) -> str | None:
        """The experts module prefix `name` lies under (None: not a routed expert tensor)."""
        for prefix, _ in self._experts:
            if name.startswith(prefix):
                return prefix
        return None

    def canonical(self, name: str, is_param: bool = True) -> str:
        """Global layer and expert indices in place of this rank's local ones."""
        prefix = self.expert_prefix(name)
        if prefix is not None:
            indices, tail = self.experts[prefix], name[len(prefix):]
            m = _SEQUENTIAL_TAIL.match(tail)
            g = None if m else _GROUPED_TAIL.match(tail)
            if m or g:
                k = int((m or g)["k"])
                if k >= len(indices):
                    raise RefitError(f"local expert {k} of a module with {len(indices)} local "
                                     "experts", tensor=name, ranks=_this_rank())
                rest = m["rest"] if m else f"{g['fc']}.{g['kind']}"
                name = f"{prefix}{indices[k]}.{rest}"
            elif is_param:
                kind = ("legacy GroupedMLP weights (experts stored transposed in one matrix)"
                        if re.fullmatch(r"weight[12]", tail) else
                        "expert weights stored as one grouped parameter (e.g. "
                        "moe_single_grouped_weight)")
                raise RefitError(f"{kind} are not supported; use SequentialMLP or TEGroupedMLP "
                                 "with one parameter per expert", tensor=name,
                                 ranks=_this_rank())
        for prefix, mapping in self._layers:
            if name.startswith(prefix):
                index, dot, rest = name[len(prefix):].partition(".")
                if dot and index.isdigit() and int(index) in mapping:
                    name = f"{prefix}{mapping[int(index)]}.{rest}"
        return name


class _Slot:
    """Where a module holds a parameter or buffer: a plan re-checks, before every refit, that
    the module still holds this very tensor (`module.weight = nn.Parameter(...)` or
    `load_state_dict(assign=True)` would leave the plan writing into an orphan)."""

    __slots__ = ("table", "attr", "tensor")

    def __init__(self, table: dict, attr: str, tensor):
        self.table, self.attr, self.tensor = table, attr, tensor

    def held(self):
        return self.table.get(self.attr)


def _tensors(chunk):
    """(local name, tensor, is_parameter, slot) for parameters and persistent buffers."""
    slots = {}
    for module in chunk.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                slots.setdefault(id(param), _Slot(module._parameters, attr, param))
    for name, param in chunk.named_parameters():
        yield name, param, True, slots[id(param)]
    for module_name, module in chunk.named_modules():
        for buf_name, buf in module._buffers.items():
            if buf is None or buf_name in module._non_persistent_buffers_set:
                continue
            yield ((f"{module_name}.{buf_name}" if module_name else buf_name), buf, False,
                   _Slot(module._buffers, buf_name, buf))


def persistent_buffers(model):
    """(canonical name, module buffer table, attribute, tensor) of every persistent buffer of
    `model` (chunk or list), e.g. the router's `expert_bias`: what dtype harmonization reads on
    the source and replaces on the destination."""
    for chunk in _chunks(model):
        naming = Naming(chunk)
        for name, tensor, is_param, slot in _tensors(chunk):
            if not is_param:
                yield naming.canonical(name, is_param), slot.table, slot.attr, tensor


def _claimed(what: str, group, rank_offset: int, refit_group) -> list[int]:
    """Global ranks of one of the model's process groups.

    rank_offset 0: the group's own (global) ranks, as always. Otherwise megatron-core's rule
    (`swap_model_weights(..., src_rank_offset=, dst_rank_offset=)`): the group's ranks plus
    the offset are ranks of `refit_group`, mapped here to the global ranks the plan uses; an
    offset that maps them outside `refit_group`, or not onto this very rank, is refused."""
    ranks = [int(r) for r in dist.get_process_group_ranks(group)]
    if not rank_offset:
        return ranks
    members = group_ranks(refit_group)
    me = dist.get_rank()
    shifted = [r + rank_offset for r in ranks]
    where = (f"its {what} process group's ranks {ranks} + rank offset {rank_offset} = "
             f"{shifted}")
    if any(not 0 <= r < len(members) for r in shifted):
        raise RefitError(f"rank-offset mismatch: {where} fall outside the refit group's ranks "
                         f"0..{len(members) - 1}", ranks=[me, *ranks])
    if members.index(me) not in shifted:
        raise RefitError(f"rank-offset mismatch: {where}, which leaves out this rank (rank "
                         f"{members.index(me)} of the refit group)", ranks=[me, *ranks])
    return [members[r] for r in shifted]


def describe(model, rank_offset: int = 0, group=None) -> ShardedTensors:
    """This rank's pieces of every parameter and persistent buffer of `model` (chunk or list).

    rank_offset, group: megatron-core's rank offset of this side and the refit's group (None:
    the default group); see `_claimed`. They change only which global ranks the model's
    process groups are taken to span (checked by `refit.plan` against the group), never which
    piece a rank holds."""
    local = ShardedTensors()
    chunks = _chunks(model)
    for index, chunk in enumerate(chunks):
        pgc = _pg_collection(chunk)
        tp, expert_tp = getattr(pgc, "tp", None), getattr(pgc, "expt_tp", None)
        naming = Naming(chunk)
        for name, tensor, is_param, slot in _tensors(chunk):
            canonical = naming.canonical(name, is_param)
            data = tensor.data if is_param else tensor
            split, part = None, 0
            if is_param and getattr(tensor, "tensor_model_parallel", False):
                # Routed experts split over the expert-TP group. Known by their module: megatron
                # marks them allreduce=False only when EP > 1.
                is_expert = naming.expert_prefix(name) is not None
                parts, part = _group_part(expert_tp if is_expert else tp)
                if parts > 1:
                    split = Split(int(tensor.partition_dim), parts,
                                  stride=int(getattr(tensor, "partition_stride", 1)))
            shape = list(data.shape)
            if split:
                shape[split.dim] *= split.parts
            key = f"{index}.{name}" if len(chunks) > 1 else name
            local.add(canonical, data, shape, split, part, key=key)
            local.current[key] = slot  # re-checked before every refit (binding.stale_reason)
        # The groups megatron-core's refit offsets (dp only where the collection has one).
        for what in ("tp", "expt_tp", "ep", "pp", "dp"):
            group_of = getattr(pgc, what, None)
            if group_of is not None:
                local.claimed_ranks.update(_claimed(what, group_of, rank_offset, group))
    return local
