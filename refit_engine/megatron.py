"""megatron-core adapter: layouts from GPT models, and a drop-in `swap_model_weights`.

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

Switching from megatron-core's refit is one import:

    from refit_engine.megatron import swap_model_weights
    swap_model_weights(train_model, inference_model, refit_method="gloo")

It caches one plan per (source, target, group, options) and plans again, on every rank of the
group at once, whenever any rank's inputs differ or a plan became unusable; `clear_caches()`
drops the cached plans.
"""

from __future__ import annotations

import re

import torch.distributed as dist

from refit_engine.binding import stale_reason
from refit_engine.channel import Channel, group_ranks
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


def describe(model) -> ShardedTensors:
    """This rank's pieces of every parameter and persistent buffer of `model` (chunk or list)."""
    local = ShardedTensors()
    chunks = _chunks(model)
    for index, chunk in enumerate(chunks):
        pgc = _pg_collection(chunk)
        tp, expert_tp, ep = getattr(pgc, "tp", None), getattr(pgc, "expt_tp", None), getattr(pgc, "ep", None)
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
        for group in (tp, expert_tp, ep, getattr(pgc, "pp", None)):
            if group is not None:
                local.claimed_ranks.update(dist.get_process_group_ranks(group))
    return local


# -- the drop-in swap_model_weights and its plan cache -----------------------------------------
#
# Plans are cached per process, in buckets keyed by what this rank passed: the identity of its
# source and target chunks (None for a model it does not hold), the group and the plan options.
# Deciding to reuse is collective, because plan() is: every call gathers, over the group, the
# ids of the usable plans in each rank's bucket (plan ids are agreed by all ranks when a plan is
# built), and every rank takes the same decision from the same gathered ids: reuse the newest
# plan found in every rank's bucket, else plan again on every rank. A plan found in every
# rank's bucket was built when every rank passed what it passes now, so it is the plan that
# planning again would build; ranks holding neither model (whose key says nothing about the
# refit) thus reuse exactly when the ranks holding the models do. "Usable": not broken, no bound
# tensor replaced since (binding.stale_reason), every model still alive (weak references; a
# dead chunk's plans are dropped when it is collected). Cost per call: one all_gather of a few
# integers per rank, besides execute's own check.

MAX_PLANS_PER_KEY = 4  # ranks holding one side or none: partners they alternate between
_PLANS: dict[tuple, list] = {}  # key -> [_Cached], newest last


class _Cached:
    __slots__ = ("plan_id", "plan", "refs")

    def __init__(self, plan_id, plan, refs):
        self.plan_id, self.plan, self.refs = plan_id, plan, refs

    def usable(self, chunks) -> bool:
        if any(ref() is not chunk for ref, chunk in zip(self.refs, chunks)):
            return False
        plan = self.plan
        if getattr(plan, "broken", None):
            return False
        try:
            return stale_reason(plan) is None
        except Exception:  # noqa: BLE001 - cannot even be checked: plan again
            return False


def clear_caches() -> None:
    """Drop every plan cached by `swap_model_weights` on this rank (local, no collective: the
    next call on any rank whose cache was cleared makes every rank of its group plan again)."""
    _PLANS.clear()


def _model_key(model):
    """(chunks, key) of one side: the unwrapped chunks and their ids (None: not held here)."""
    chunks = _chunks(model) if model is not None else []
    if not chunks:
        return [], None
    return chunks, tuple(id(c) for c in chunks)


def _group_key(group) -> tuple:
    return id(group if group is not None else dist.group.WORLD), tuple(group_ranks(group))


def _options_key(plan_kwargs: dict) -> tuple:
    items = []
    for name, value in sorted(plan_kwargs.items()):
        try:
            hash(value)
        except TypeError:
            value = repr(value)
        items.append((name, value))
    return tuple(items)


# One channel per group for the cache's agreement (refit_engine.channel: bounded waits, the
# caller's groups never used), made again after a failure.
_AGREEMENT: dict = {}


def _agree_on_plan(candidates: list[int], group, timeout_s: float) -> int:
    """Collective over `group`: the newest plan id in every rank's `candidates` (0: none)."""
    key = _group_key(group)
    channel = _AGREEMENT.get(key)
    if channel is None or channel.broken:
        channel = _AGREEMENT[key] = Channel(group, timeout_s, what="swap_model_weights cache")
    everyone = channel.gather(candidates[-MAX_PLANS_PER_KEY:], "cached plans")
    common = set.intersection(*(set(ids) for ids in everyone))
    return max(common) if common else 0


_WATCHED: set[int] = set()  # ids of chunks whose collection drops their plans


def _forget_chunk(chunk_id: int) -> None:
    _WATCHED.discard(chunk_id)
    for key in [k for k in _PLANS if chunk_id in (k[0] or ()) or chunk_id in (k[1] or ())]:
        del _PLANS[key]


def cached_plan(src_model, target_model, group=None, **plan_kwargs):
    """The plan `swap_model_weights` executes: a cached one when every rank of `group` has it,
    else a new one (planned on every rank). Collective over `group`; see the cache's notes."""
    import weakref

    import refit_engine
    if not dist.is_initialized():
        raise RefitError("torch.distributed is not initialized: call init_process_group first")
    src_chunks, src_key = _model_key(src_model)
    dst_chunks, dst_key = _model_key(target_model)
    key = (src_key, dst_key, _group_key(group), _options_key(plan_kwargs))
    chunks = src_chunks + dst_chunks
    bucket = _PLANS.get(key, [])
    unusable = [c for c in bucket if not c.usable(chunks)]
    for cached in unusable:  # its own gloo group goes now, not at garbage collection
        cached.plan.close()
    bucket[:] = [c for c in bucket if c not in unusable]
    from refit_engine.refit import DEFAULT_TIMEOUT_S
    chosen = _agree_on_plan([c.plan_id for c in bucket], group,
                            plan_kwargs.get("timeout_s", DEFAULT_TIMEOUT_S))
    for cached in bucket:
        if cached.plan_id == chosen:
            bucket.remove(cached)
            bucket.append(cached)  # most recently used last
            return cached.plan
    plan = refit_engine.plan(src_model, target_model, group=group, **plan_kwargs)
    plan_id = plan.channel.number + 1  # the same on every rank: plans of a group are numbered
    if src_key is not None and dst_key is not None:
        for older in bucket:  # both models pin the key: an older plan is never chosen again
            older.plan.close()
        bucket.clear()
    bucket.append(_Cached(plan_id, plan, [weakref.ref(c) for c in chunks]))
    for evicted in bucket[:-MAX_PLANS_PER_KEY]:
        evicted.plan.close()
    del bucket[:-MAX_PLANS_PER_KEY]
    _PLANS[key] = bucket
    for chunk in chunks:
        if id(chunk) not in _WATCHED:
            weakref.finalize(chunk, _forget_chunk, id(chunk))
            _WATCHED.add(id(chunk))
    return plan


def swap_model_weights(src_model, target_model, refit_method="gloo", group=None, **plan_kwargs):
    """Drop-in for megatron-core's `swap_model_weights(src_model, target_model, refit_method)`.

    Every rank of `group` calls it, passing None for a model it lacks. The first call of a
    (source, target) pair plans; later calls execute the cached plan (`cached_plan`), which is
    planned again on every rank when any rank's models, group or options differ from when it
    was built, when a plan failed (`plan.broken`) or when a bound tensor was replaced since.
    A refit that raises drops its plan, so the next call plans again. `refit_method` is
    accepted for compatibility: the executor is chosen by where the tensors live (CPU -> gloo).
    `clear_caches()` drops every cached plan. Returns execute's statistics.
    """
    import refit_engine
    plan = cached_plan(src_model, target_model, group=group, **plan_kwargs)
    try:
        return refit_engine.execute(plan)
    except BaseException:
        plan.broken = plan.broken or "a refit of it raised"
        raise
