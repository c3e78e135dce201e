"""megatron-core adapter: a drop-in `swap_model_weights`, and the layouts it plans from.

Switching from megatron-core's refit (`megatron.core.resharding.refit`, 0.19 / main) is one
import; the signature and the semantics are the same:

    from refit_engine.megatron import swap_model_weights
    swap_model_weights(train_model, inference_model, refit_method="nccl")

- `refit_method` is required and checked as megatron-core checks it (an unknown name raises
  ValueError, another type TypeError), but it selects nothing: see `REFIT_METHODS`.
- `src_rank_offset` / `dst_rank_offset`, `num_dst_pools` / `dst_pool_index`,
  `prepare_swap_model_weights` and `clear_all_caches` / `clear_plan_cache` /
  `clear_service_cache` behave as megatron-core's; a `transform` (MXFP8) is refused: ask for
  FP8 with `formats=` instead (below).
- Persistent buffers (the router's `expert_bias`) whose dtype differs between the models take
  the source's dtype on the destination before planning, as in megatron-core; parameters of
  different dtypes are refused, naming both dtypes.
- Returns None; pass `stats={}` for execute's statistics. Our plan and execute options are
  keyword-only extras.
- `formats=` (issue 16): per-parameter destination formats by rules on canonical names
  ("kimi_k2": `quantize.KIMI_K2_FORMATS`). A parameter whose rule is a quantized format is
  refit into FP8 outputs beside the model (`quantized_weights`), not into the parameter;
  `cast=True` lets a destination dtype differ from its source's (`plan(cast=True)`).

Plans are cached per (source, target, group, options, offsets, pool) and planned again, on
every rank of the group at once, whenever any rank's inputs differ or a plan became unusable.
`describe` and `Naming` (which piece of which global tensor each parameter holds) live in
`refit_engine.megatron_layout` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import weakref

import torch
import torch.distributed as dist

import refit_engine  # its plan and execute, looked up per call (tests count the plans)
from refit_engine import quantize, refit, transforms
from refit_engine.binding import stale_reason
from refit_engine.channel import Channel, group_ranks
from refit_engine.compiler import DEFAULT_BUCKET_BYTES
from refit_engine.dtypes import dtype_name
from refit_engine.errors import RefitError
from refit_engine.local import ShardedTensors
from refit_engine.megatron_layout import (
    GROUPED_EXPERT,
    Naming,
    _chunks,
    describe,
    persistent_buffers,
)

__all__ = ["FORMAT_PRESETS", "GROUPED_EXPERT", "REFIT_METHODS", "Naming", "cached_plan",
           "clear_all_caches", "clear_caches", "clear_plan_cache", "clear_service_cache",
           "describe", "prepare_swap_model_weights", "quantized_weights", "swap_model_weights"]

# megatron-core's backend names (`RefitBackendName`). Each is accepted for compatibility; none
# selects anything: the executor is chosen by where the tensors are, on every rank alike.
REFIT_METHODS = {
    "nccl": "CUDA tensors: the CUDA executor over NCCL; CPU tensors: gloo",
    "gloo": "CPU tensors: the CPU executor over gloo; CUDA tensors: NCCL (not a CPU detour)",
    "nvshmem": "as nccl (no NVSHMEM transport: NCCL for CUDA tensors)",
    "nixl": "as nccl (no NIXL transport: NCCL for CUDA tensors)",
}


@functools.cache
def _copy_service_class():
    """megatron-core's CopyService, or None without megatron-core (then duck-typed)."""
    try:  # optional: megatron-core (0.16 and 0.19 keep it here)
        from megatron.core.resharding.copy_services.base import CopyService
    except ImportError:
        return None
    return CopyService


def _is_copy_service(value) -> bool:
    cls = _copy_service_class()
    if cls is not None:
        return isinstance(value, cls)
    return all(callable(getattr(value, m, None)) for m in ("submit_send", "submit_recv", "run"))


def _check_refit_method(refit_method) -> None:
    """megatron-core's check, its exception types and words (a local check: each rank raises
    by itself, before any collective)."""
    if isinstance(refit_method, str):
        if refit_method not in REFIT_METHODS:
            raise ValueError(f"Unknown backend '{refit_method}'")
    elif not _is_copy_service(refit_method):
        raise TypeError("refit_method must be a str backend name or a CopyService instance")


class UnsupportedTransformError(RefitError, NotImplementedError):
    """A megatron-core `ReshardTransform` (MXFP8) was asked for: not supported yet. Both a
    RefitError and a NotImplementedError."""


def _check_call(transform, num_dst_pools, dst_pool_index, src_rank_offset, dst_rank_offset,
                stats) -> None:
    """Our local checks of the megatron-core arguments (each rank raises by itself)."""
    me = [dist.get_rank()] if dist.is_initialized() else []
    if transform is not None:
        raise UnsupportedTransformError(
            f"transform={type(transform).__name__}: refit_engine does not apply megatron-core "
            "ReshardTransforms; pass transform=None, and for FP8 destinations formats= (e.g. "
            "formats='kimi_k2', or rules such as [(r'\\.linear_\\w+\\.weight$', 'mxfp8'), "
            "...]): the refit then quantizes into FP8 outputs beside the model "
            "(refit_engine.megatron.quantized_weights)", ranks=me)

    def integer(value):
        return isinstance(value, int) and not isinstance(value, bool)

    if not integer(num_dst_pools) or num_dst_pools < 1:
        raise RefitError(f"num_dst_pools must be an integer >= 1, not {num_dst_pools!r}",
                         ranks=me)
    if not integer(dst_pool_index) or not 0 <= dst_pool_index < num_dst_pools:
        raise RefitError(f"dst_pool_index must be an integer in [0, {num_dst_pools}), not "
                         f"{dst_pool_index!r}", ranks=me)
    for what, value in (("src_rank_offset", src_rank_offset),
                        ("dst_rank_offset", dst_rank_offset)):
        if not integer(value):
            raise RefitError(f"{what} must be an integer, not {value!r}", ranks=me)
    if stats is not None and not isinstance(stats, dict):
        raise RefitError(f"stats must be None or a dict to fill, not {type(stats).__name__}",
                         ranks=me)


# -- the plan cache -----------------------------------------------------------------------------
#
# Plans are cached per process, in buckets keyed by what this rank passed: the identity of its
# source and target chunks (None for a model it does not hold), the group, the plan options,
# the rank offsets and the destination pool. Deciding to reuse is collective, because plan()
# is: every call gathers, over the group, the ids of the usable plans in each rank's bucket
# (plan ids are agreed by all ranks when a plan is built), and every rank takes the same
# decision from the same gathered ids: reuse the newest plan found in every rank's bucket, else
# plan again on every rank. A plan found in every rank's bucket was built when every rank
# passed what it passes now, so it is the plan that planning again would build; ranks holding
# neither model (whose key says nothing about the refit) thus reuse exactly when the ranks
# holding the models do. The pool is in the key for the same reason as in megatron-core: a
# source-only rank passes the same models on every pool's pass, and must not reuse pool 0's
# plan while pool 1's destinations plan. "Usable": not broken, no bound tensor replaced since
# (binding.stale_reason), every model still alive (weak references; a dead chunk's plans are
# dropped when it is collected). Cost per call: one all_gather of a few integers per rank,
# besides execute's own check.

MAX_PLANS_PER_KEY = 4  # ranks holding one side or none: partners they alternate between
_PLANS: dict[tuple, list] = {}  # key -> [_Cached], newest last


class _Cached:
    __slots__ = ("plan", "plan_id", "refs")

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


def clear_plan_cache() -> None:
    """Drop (and close) every plan cached by `swap_model_weights` on this rank. Local, no
    collective, as in megatron-core: the next call on any rank whose cache was cleared makes
    every rank of its group plan again."""
    plans = [cached.plan for bucket in _PLANS.values() for cached in bucket]
    _PLANS.clear()
    failures = []
    for plan in plans:  # every plan is closed, even after one failed to
        try:
            plan.close()
        except Exception as exc:  # noqa: BLE001 - reported below, after the others
            failures.append(f"{type(exc).__name__}: {exc}")
    if failures:
        raise RefitError(f"clearing the plan cache: {len(failures)} plan(s) failed to close: "
                         + "; ".join(failures[:4]),
                         ranks=[dist.get_rank()] if dist.is_initialized() else [])


def clear_service_cache() -> None:
    """megatron-core closes its cached copy services here. refit_engine caches none (each plan
    owns its executor and channel, released by `clear_plan_cache`): nothing to do. Local."""


def clear_all_caches() -> None:
    """`clear_plan_cache()` and `clear_service_cache()`, as megatron-core's. Local."""
    clear_plan_cache()
    clear_service_cache()


clear_caches = clear_all_caches  # the earlier name


def _model_key(model):
    """(chunks, key) of one side: the unwrapped chunks and their ids (None: not held here)."""
    chunks = _chunks(model) if model is not None else []
    if not chunks:
        return [], None
    return chunks, tuple(id(c) for c in chunks)


def _group_key(group) -> tuple:
    return id(group if group is not None else dist.group.WORLD), tuple(group_ranks(group))


# plan()'s options and their defaults: a call that leaves one out and a call that passes its
# default share a plan.
_PLAN_OPTIONS = {name: p.default for name, p in inspect.signature(refit.plan).parameters.items()
                 if p.default is not inspect.Parameter.empty and name != "group"}


def _plan_options(plan_kwargs: dict) -> dict:
    unknown = sorted(set(plan_kwargs) - set(_PLAN_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected plan options {unknown}; plan() takes "
                        f"{sorted(_PLAN_OPTIONS)}")
    return {**_PLAN_OPTIONS, **plan_kwargs}


def _options_key(options: dict) -> tuple:
    items = []
    for name, value in sorted(options.items()):
        try:
            hash(value)
        except TypeError:
            value = repr(value)
        items.append((name, value))
    return tuple(items)


# One channel per group for the cache's agreement and the dtype exchange before planning
# (refit_engine.channel: bounded waits, the caller's groups never used), made again after a
# failure.
_AGREEMENT: dict = {}


def _agreement_channel(group, timeout_s: float) -> Channel:
    key = _group_key(group)
    channel = _AGREEMENT.get(key)
    if channel is None or channel.broken:
        channel = _AGREEMENT[key] = Channel(group, timeout_s, what="swap_model_weights cache")
    return channel


def _agree_on_plan(candidates: list[int], group, timeout_s: float, pools=(0, 1)) -> int:
    """Collective over `group`: the newest plan id in every rank's `candidates` (0: none).
    pools: this pass's (pool index, number of pools); every rank raises if ranks differ."""
    channel = _agreement_channel(group, timeout_s)
    everyone = channel.gather((candidates[-MAX_PLANS_PER_KEY:], tuple(pools)), "cached plans")
    passes = {}
    for rank, (_, pass_of) in zip(channel.ranks, everyone):
        passes.setdefault(pass_of, []).append(rank)
    if len(passes) > 1:
        seen = "; ".join(f"ranks {ranks}: pool {p} of {n}"
                         for (p, n), ranks in sorted(passes.items()))
        raise RefitError(f"ranks are at different destination-pool passes ({seen}): every rank "
                         "must pass the same num_dst_pools", ranks=channel.ranks)
    common = set.intersection(*(set(ids) for ids, _ in everyone))
    return max(common) if common else 0


_WATCHED: set[int] = set()  # ids of chunks whose collection drops their plans


def _forget_chunk(chunk_id: int) -> None:
    _WATCHED.discard(chunk_id)
    for key in [k for k in _PLANS if chunk_id in (k[0] or ()) or chunk_id in (k[1] or ())]:
        del _PLANS[key]


# -- dtype harmonization and describing, before planning -------------------------------------

def _source_buffer_dtypes(channel: Channel, src_model) -> dict:
    """Collective: {canonical name: dtype name} of the source's persistent buffers, gathered
    from every rank, so that destination-only ranks learn them (the first rank naming a buffer
    wins; ranks disagreeing on one are refused by the plan)."""
    mine = {}
    if src_model is not None and not isinstance(src_model, ShardedTensors):
        try:
            for name, _, _, tensor in persistent_buffers(src_model):
                mine[name] = dtype_name(tensor.dtype)
        except (RefitError, ValueError):  # bad names or dtypes: describe() reports them
            pass
    dtypes: dict = {}
    for theirs in channel.gather(mine, "source buffer dtypes"):
        for name, dtype in theirs.items():
            dtypes.setdefault(name, dtype)
    return dtypes


def _harmonize_buffer_dtypes(target_model, dtypes: dict) -> None:
    """Every destination persistent buffer whose dtype differs from the source's is replaced
    on its module by a copy in the source's dtype: megatron-core's rule (an inference model's
    bf16 `expert_bias` becomes fp32 like the trainer's). Parameters are never converted.
    Done before describing, so the plan binds the new tensors; the refit fills them."""
    if target_model is None or isinstance(target_model, ShardedTensors) or not dtypes:
        return
    with torch.no_grad():
        for name, table, attr, tensor in list(persistent_buffers(target_model)):
            want = dtypes.get(name)
            if want is not None and dtype_name(tensor.dtype) != want:
                table[attr] = tensor.to(getattr(torch, want))


# -- destination formats (formats=): FP8 outputs beside the model --------------------------------
#
# A parameter whose rule is a quantized format is refit into two tensors of this module's own:
# float8_e4m3fn data of the parameter's (local) shape and its scales (transforms.scale_shape),
# allocated on the parameter's device by the first plan that quantizes it and reused by every
# later plan of the same format, so that a cached plan stays bound to them (stale_reason) and
# `quantized_weights` keeps handing out the same tensors. The parameter itself is not written.

FORMAT_PRESETS = {"kimi_k2": quantize.KIMI_K2_FORMATS}
_FP8 = "float8_e4m3fn"


def _format_rules(formats) -> tuple | None:
    """`formats` as a tuple of (expression, canonical format) rules, or None (no formats).
    A local check of the argument (each rank raises by itself, before any collective)."""
    me = [dist.get_rank()] if dist.is_initialized() else []
    if formats is None:
        return None
    if isinstance(formats, str):
        if formats not in FORMAT_PRESETS:
            raise RefitError(f"formats={formats!r}: presets are {sorted(FORMAT_PRESETS)}; else "
                             "give a sequence of (regular expression, format) rules", ranks=me)
        formats = FORMAT_PRESETS[formats]
    try:
        rules = [tuple(rule) for rule in formats]
    except TypeError:
        rules = None
    if rules is None or not all(len(r) == 2 and all(isinstance(x, str) for x in r)
                                for r in rules):
        raise RefitError(f"formats must be None, a preset name ({sorted(FORMAT_PRESETS)}) or a "
                         "sequence of (regular expression, format) string pairs, not "
                         f"{formats!r}", ranks=me)
    out = []
    for pattern, fmt in rules:
        try:
            re.compile(pattern)
            out.append((pattern, quantize.format_name(fmt)))
        except (re.error, ValueError) as exc:
            raise RefitError(f"formats rule ({pattern!r}, {fmt!r}): {exc} (formats: "
                             f"{', '.join(quantize.FORMATS)})", ranks=me) from None
    return tuple(out)


class _Outputs:
    """One parameter's FP8 outputs: its weak reference, format, data and scales."""

    __slots__ = ("data", "fmt", "ref", "scale")

    def __init__(self, param, fmt: str):
        self.ref, self.fmt = weakref.ref(param), fmt
        self.data = torch.empty(param.shape, dtype=torch.float8_e4m3fn, device=param.device)
        self.scale = transforms.new_scale(self.data, fmt)


# id(parameter) -> its outputs; an entry goes when its parameter is collected (the plans that
# write the outputs hold them themselves).
_OUTPUTS: dict[int, _Outputs] = {}


def _drop_outputs(param_id: int, ref) -> None:
    outputs = _OUTPUTS.get(param_id)
    if outputs is not None and outputs.ref is ref:
        del _OUTPUTS[param_id]


def _outputs_of(param, fmt: str) -> _Outputs:
    """The parameter's outputs in `fmt`: the earlier ones when they still fit, else new ones."""
    earlier = _OUTPUTS.get(id(param))
    mine = earlier is not None and earlier.ref() is param
    if (mine and earlier.fmt == fmt and earlier.data.shape == param.shape
            and earlier.data.device == param.device):
        return earlier
    outputs = _OUTPUTS[id(param)] = _Outputs(param, fmt)
    if not mine:  # one finalizer per parameter (weakref.ref(param) is the same object)
        weakref.finalize(param, _drop_outputs, id(param), outputs.ref)
    return outputs


class _QuantizedSlot:
    """The owner of a parameter's FP8 outputs in a plan's ShardedTensors (`current`): holds the
    outputs while the module still holds the parameter (same object, same shape) and the
    parameter's outputs are still these; `binding.stale_reason` re-checks it before every
    refit, so a replaced parameter or reallocated outputs make the cache plan again."""

    __slots__ = ("outputs", "slot", "tensor")

    def __init__(self, slot, outputs: _Outputs):
        self.slot, self.outputs, self.tensor = slot, outputs, outputs.data

    def held(self):
        param = self.slot.tensor
        if (self.slot.held() is param and _OUTPUTS.get(id(param)) is self.outputs
                and param.shape == self.tensor.shape):
            return self.tensor
        return None


def _apply_formats(local: ShardedTensors, rules: tuple) -> None:
    """Rewrites a described target for `rules`: the local tensors of quantized parameters
    become their FP8 outputs (entries in float8_e4m3fn with the format, scales given); plain
    rules must be the tensor's own dtype. Problems go to `local.errors` (plan() raises the
    first on every rank)."""
    decided: dict[str, str | None] = {}  # key -> quantized format, or None (as described)
    for e in local.entries:
        if e.key in decided:
            continue
        decided[e.key] = None
        try:
            fmt = quantize.format_for(e.name, rules)
        except ValueError:
            local.errors.append(RefitError(
                f"formats: no rule matches this destination tensor's canonical name ({len(rules)} "
                "rules); add a rule for it in front, e.g. (r'<expression>', 'keep' or 'bf16')",
                tensor=e.name, ranks=[dist.get_rank()]))
            continue
        if fmt == quantize.KEEP:
            continue
        if fmt in quantize.PLAIN:
            if transforms.dtype_of(fmt) != e.dtype:
                local.errors.append(RefitError(
                    f"formats: the rule gives {fmt}, but this destination tensor is {e.dtype}: a "
                    "plain format is the destination's own dtype (cast=True casts from the "
                    "source's dtype into it); match the rule to the model, or use 'keep'",
                    tensor=e.name, ranks=[dist.get_rank()]))
            continue
        slot = local.current.get(e.key)
        param = getattr(slot, "tensor", None)
        if not isinstance(param, torch.nn.Parameter):
            local.errors.append(RefitError(
                f"formats: the rule gives {fmt}, but this is a buffer; quantized formats apply "
                "to parameters", tensor=e.name, ranks=[dist.get_rank()]))
        elif len(e.global_shape) != 2:
            local.errors.append(RefitError(
                f"formats: {fmt} quantizes 2-D weights; this tensor has shape "
                f"{tuple(e.global_shape)}", tensor=e.name, ranks=[dist.get_rank()]))
        else:
            outputs = _outputs_of(param, fmt)
            local.tensors[e.key], local.scales[e.key] = outputs.data, outputs.scale
            local.current[e.key] = _QuantizedSlot(slot, outputs)
            decided[e.key] = fmt
    local.entries[:] = [e if decided.get(e.key) is None else
                        dataclasses.replace(e, dtype=_FP8, format=decided[e.key])
                        for e in local.entries]


def quantized_weights(target_model) -> dict:
    """{parameter name: (float8_e4m3fn tensor, scale tensor)} of the target's parameters that
    a swap (or prepare) with `formats=` quantizes: what an FP8 server takes. Names are the
    module's `named_parameters()` names (a list of several chunks: "{chunk index}.{name}").
    Each tensor is this rank's local shard (the parameter's shape) on the parameter's device;
    scales are float32 [ceil(R/128), ceil(C/128)] (fp8_block128) or e8m0 bits uint8
    [R, ceil(C/32)] (mxfp8). The same tensors every swap (the refit writes them in place)
    until the parameter is replaced or quantized to another format; a swap without `formats=`
    writes the parameters and leaves these as they were. Local, no collective."""
    chunks = _chunks(target_model) if target_model is not None else []
    out = {}
    for index, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            outputs = _OUTPUTS.get(id(param))
            if outputs is not None and outputs.ref() is param:
                out[f"{index}.{name}" if len(chunks) > 1 else name] = (outputs.data,
                                                                      outputs.scale)
    return out


def _mxfp8_target(target_model) -> bool:
    """A target megatron-core's prepare_swap_model_weights would quantize to MXFP8."""
    for chunk in _chunks(target_model) if target_model is not None else []:
        config = getattr(chunk, "config", None)
        if (getattr(config, "transformer_impl", None) == "inference_optimized"
                and getattr(config, "fp8_recipe", None) == "mxfp8"):
            return True
    return False


def _describe_side(model, rank_offset: int, group, problem: Exception | None = None,
                   rules: tuple | None = None):
    """This rank's ShardedTensors of one side for plan(); a problem found here is kept in its
    `errors`, so plan() raises it on every rank. rules: the target's formats (None: none)."""
    if model is None and problem is None:
        return None
    local = ShardedTensors()
    try:
        if problem is not None:
            raise problem
        if isinstance(model, ShardedTensors):
            if rank_offset:
                raise RefitError("rank offsets apply to megatron-core models, not to a "
                                 "ShardedTensors (whose claimed ranks are global ranks)",
                                 ranks=[dist.get_rank()])
            if rules is not None:
                raise RefitError("formats= applies to megatron-core models; a ShardedTensors "
                                 "declares its formats itself (ShardedTensors.add(..., "
                                 "format=))", ranks=[dist.get_rank()])
            return model
        local = describe(model, rank_offset=rank_offset, group=group)
        if rules is not None and not local.errors:
            _apply_formats(local, rules)
    except Exception as exc:  # noqa: BLE001 - raised by plan() on every rank
        local.errors.insert(0, exc)
    return local


def cached_plan(src_model, target_model, group=None, *, src_rank_offset: int = 0,
                dst_rank_offset: int = 0, pool_index: int = 0, num_pools: int = 1,
                mxfp8_check: bool = False, formats=None, **plan_kwargs):
    """The plan `swap_model_weights` executes: a cached one when every rank of `group` has it,
    else a new one (persistent-buffer dtypes harmonized, then planned on every rank).
    Collective over `group`; see the cache's notes. plan_kwargs: refit_engine.plan()'s
    options. pool_index / num_pools: the destination-pool pass (keys the cache). formats: the
    target's formats (see swap_model_weights; keys the cache)."""
    rules = _format_rules(formats)
    if not dist.is_initialized():
        raise RefitError("torch.distributed is not initialized: call init_process_group first")
    options = _plan_options(plan_kwargs)
    src_chunks, src_key = _model_key(src_model)
    dst_chunks, dst_key = _model_key(target_model)
    key = (src_key, dst_key, _group_key(group), _options_key(options),
           (int(src_rank_offset), int(dst_rank_offset)), int(pool_index), rules)
    chunks = src_chunks + dst_chunks
    bucket = _PLANS.get(key, [])
    unusable = [c for c in bucket if not c.usable(chunks)]
    for cached in unusable:  # its own gloo group goes now, not at garbage collection
        cached.plan.close()
    bucket[:] = [c for c in bucket if c not in unusable]
    timeout_s = options["timeout_s"]
    chosen = _agree_on_plan([c.plan_id for c in bucket], group, timeout_s,
                            (int(pool_index), int(num_pools)))
    for cached in bucket:
        if cached.plan_id == chosen:
            bucket.remove(cached)
            bucket.append(cached)  # most recently used last
            return cached.plan
    # NOTE: every rank plans (the agreement above is the same everywhere), so every rank
    # takes part in the dtype exchange too. Local problems wait for plan() to raise them on
    # every rank.
    problem = None
    if mxfp8_check and rules is None and _mxfp8_target(target_model):
        problem = UnsupportedTransformError(
            "the target is an inference_optimized MXFP8 model, which megatron-core's "
            "prepare_swap_model_weights quantizes through an MXFP8ReshardTransform into the "
            "model: refit_engine does not; pass formats= (e.g. [(r'\\.linear_\\w+\\.weight$', "
            "'mxfp8'), ...] + the rest) to refit FP8 outputs beside the model instead "
            "(refit_engine.megatron.quantized_weights)", ranks=[dist.get_rank()])
    dtypes = _source_buffer_dtypes(_agreement_channel(group, timeout_s), src_model)
    try:
        _harmonize_buffer_dtypes(target_model, dtypes)
    except Exception as exc:  # noqa: BLE001 - raised by plan() on every rank
        problem = problem or exc
    plan = refit_engine.plan(_describe_side(src_model, src_rank_offset, group),
                             _describe_side(target_model, dst_rank_offset, group, problem,
                                            rules),
                             group=group, **options)
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


# -- the drop-in -------------------------------------------------------------------------------

@functools.cache
def _megatron_module_class():
    try:  # optional: megatron-core
        from megatron.core.transformer.module import MegatronModule
    except ImportError:
        return None
    return MegatronModule


def _refresh_module_caches(target_model) -> bool:
    """megatron-core main's step after a refit: `refresh_cache()` on every MegatronModule of
    the destination that has one (Mamba refills its decode cache; 0.19.2 has no such hook).
    Whether a module's own (not the base class's no-op) hook ran."""
    base = _megatron_module_class()
    if base is None:
        return False
    base_hook = getattr(base, "refresh_cache", None)
    ran = False
    for chunk in _chunks(target_model):
        if not isinstance(chunk, torch.nn.Module):
            continue
        for module in chunk.modules():
            hook = getattr(module, "refresh_cache", None) if isinstance(module, base) else None
            if callable(hook):
                hook()
                ran = ran or "refresh_cache" in vars(module) or \
                    getattr(type(module), "refresh_cache", None) is not base_hook
    return ran


def _total(passes: list[dict]) -> dict:
    """execute()'s statistics summed over the pool passes, each pass's kept under "passes"."""
    total = {"rank": passes[0]["rank"], "per_peer": {}}
    for stats in passes:
        for name, value in stats.items():
            if name == "per_peer":
                for peer, moved in value.items():
                    mine = total["per_peer"].setdefault(peer, {})
                    for kind, nbytes in moved.items():
                        mine[kind] = mine.get(kind, 0) + nbytes
            elif name != "rank":
                total[name] = total.get(name, 0) + value
    total["passes"] = passes
    return total


def _passes(src_model, target_model, num_dst_pools, dst_pool_index):
    """megatron-core's pool passes: (pool, source, target) with the target on its pool's pass
    only, the source on every pass."""
    for pool in range(num_dst_pools):
        yield pool, src_model, (target_model if pool == dst_pool_index else None)


def prepare_swap_model_weights(src_model, target_model, group=None, src_rank_offset: int = 0,
                               dst_rank_offset: int = 0, *, num_dst_pools: int = 1,
                               dst_pool_index: int = 0, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                               timeout_s: float = refit.DEFAULT_TIMEOUT_S,
                               threads: int | None = None, mode: str = "auto",
                               ranks_per_node: int | None = None, name: str = "plan",
                               transport: str = "auto", ipc_sync: str = "device",
                               alias: bool = False, formats=None, cast: bool = False) -> None:
    """megatron-core's `prepare_swap_model_weights`: plan and cache the refit ahead of the
    first `swap_model_weights`, moving no bytes. Collective over `group`.

    The same arguments as that later call (offsets, and the keyword-only plan options,
    formats and cast included) make it reuse the plan; a first prepare with `formats=`
    allocates the FP8 outputs (`quantized_weights`, unwritten until the swap). Extras:
    num_dst_pools / dst_pool_index plan every pool's pass (megatron-core prepares pool 0
    only). A target megatron-core would quantize to MXFP8 (inference_optimized, fp8_recipe
    "mxfp8") raises RefitError on every rank unless `formats=` is given (we never write
    megatron-core's own MXFP8 parameters: formats= refits FP8 outputs beside the model).
    """
    _check_call(None, num_dst_pools, dst_pool_index, src_rank_offset, dst_rank_offset, None)
    _format_rules(formats)
    options = {"bucket_bytes": bucket_bytes, "timeout_s": timeout_s, "threads": threads,
               "mode": mode, "ranks_per_node": ranks_per_node, "name": name,
               "transport": transport, "ipc_sync": ipc_sync, "alias": alias, "cast": cast}
    for pool, src, target in _passes(src_model, target_model, num_dst_pools, dst_pool_index):
        cached_plan(src, target, group, src_rank_offset=src_rank_offset,
                    dst_rank_offset=dst_rank_offset, pool_index=pool, num_pools=num_dst_pools,
                    mxfp8_check=True, formats=formats, **options)


def swap_model_weights(src_model, target_model, refit_method, group=None,
                       src_rank_offset: int = 0, dst_rank_offset: int = 0, transform=None,
                       num_dst_pools: int = 1, dst_pool_index: int = 0, *,
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                       timeout_s: float = refit.DEFAULT_TIMEOUT_S, threads: int | None = None,
                       mode: str = "auto", ranks_per_node: int | None = None, name: str = "plan",
                       transport: str = "auto", ipc_sync: str = "device", alias: bool = False,
                       formats=None, cast: bool = False, graph: bool = False, stream=None,
                       sync: bool = True, verify: bool = False, check: bool = True,
                       stats: dict | None = None) -> None:
    """Drop-in for megatron-core's `swap_model_weights` (0.19 / main): copy `src_model`'s
    weights into `target_model`, resharded. Every rank of `group` (default: the world) calls
    it, passing None for a model it lacks. Returns None.

    megatron-core's arguments, same meaning:
    - refit_method: "nccl", "gloo", "nvshmem", "nixl" or a CopyService instance; checked like
      megatron-core's (ValueError, TypeError), before any collective, and otherwise unused:
      the executor follows where the tensors are (`REFIT_METHODS`).
    - src_rank_offset / dst_rank_offset: each side's process-group ranks plus its offset are
      ranks of `group` (megatron-core's rule); 0: they are global ranks (`megatron_layout.
      _claimed`). A mismatch raises RefitError on every rank before any byte moves.
    - transform: must be None (a ReshardTransform raises UnsupportedTransformError; FP8
      destinations come with `formats=`).
    - num_dst_pools / dst_pool_index: one planned and executed pass per pool; the target is
      passed on its pool's pass only, the source on every pass. Every rank passes the same
      num_dst_pools (refused on every rank otherwise).

    Also as megatron-core: persistent buffers of the target whose dtype differs from the
    source's take the source's dtype first; after the data is in place, `refresh_cache()` runs
    on every destination MegatronModule that has it (megatron-core main).

    Extras, keyword-only: refit_engine.plan()'s options (bucket_bytes, timeout_s, threads, mode,
    ranks_per_node, name, transport, ipc_sync, alias, cast) and execute()'s (graph, stream,
    sync, verify, check); `stats`: a dict cleared and filled with execute()'s statistics
    (summed over the pool passes, each pass under "passes").

    Destination formats (issue 16, refit_engine.transforms):
    - cast=True: a destination whose float dtype (float32, bfloat16, float16) differs from its
      source's is cast while it is copied (`plan(cast=True)`); refused otherwise.
    - formats: None (every tensor as the target model holds it), "kimi_k2"
      (`quantize.KIMI_K2_FORMATS`: linear weights fp8_block128; norms, embeddings, output
      layer and router weight bf16; router expert_bias fp32) or a sequence of (regular
      expression, format) rules, searched in each target tensor's canonical name
      (`megatron_layout`: global layer and expert indices), the first match winning
      (`quantize.format_for`). A tensor no rule matches is refused on every rank, naming it.
      A quantized rule ("fp8_block128", "mxfp8") on a 2-D parameter: the refit writes this
      rank's shard, quantized, into FP8 outputs (float8_e4m3fn data of the parameter's shape,
      and its scales) that `quantized_weights(target_model)` returns: allocated once per
      parameter on its device, reused by every later swap. The parameter itself is NOT
      written: the BF16 inference model keeps what it held for those weights; the FP8
      outputs are what an FP8 server takes. A destination shard that cuts a quantization
      block (128 x 128, or 32 along a row) is refused on every rank by plan(). A plain rule
      ("bf16", "fp16", "fp32") must be the target tensor's own dtype (refused otherwise,
      cast=True or not: the rule says what the destination holds, cast only lets the source
      differ from it); "keep": the tensor as it is. Formats key the plan cache.

    Caching: the first call of a (source, target) pair plans; later calls reuse the plan
    (`cached_plan`) unless any rank's models, group, options, offsets or pool differ from when
    it was built, a plan failed (`plan.broken`) or a bound tensor was replaced since. A refit
    that raises drops its plan, so the next call plans again. `clear_all_caches()` drops every
    cached plan on this rank.
    """
    _check_refit_method(refit_method)
    _check_call(transform, num_dst_pools, dst_pool_index, src_rank_offset, dst_rank_offset,
                stats)
    _format_rules(formats)
    options = {"bucket_bytes": bucket_bytes, "timeout_s": timeout_s, "threads": threads,
               "mode": mode, "ranks_per_node": ranks_per_node, "name": name,
               "transport": transport, "ipc_sync": ipc_sync, "alias": alias, "cast": cast}
    passes = []
    for pool, src, target in _passes(src_model, target_model, num_dst_pools, dst_pool_index):
        plan = cached_plan(src, target, group, src_rank_offset=src_rank_offset,
                           dst_rank_offset=dst_rank_offset, pool_index=pool,
                           num_pools=num_dst_pools, formats=formats, **options)
        try:
            passes.append(refit_engine.execute(plan, graph=graph, stream=stream, sync=sync,
                                               verify=verify, check=check))
        except BaseException:
            plan.broken = plan.broken or "a refit of it raised"
            raise
        # NOTE: after the data is in place (sync) or queued on the caller's stream (sync=False:
        # the hooks' own work queues after it), as megatron-core: transfer, sync, refresh, sync.
        if target is not None and _refresh_module_caches(target) and sync \
                and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    if stats is not None:
        stats.clear()
        stats.update(_total(passes))
