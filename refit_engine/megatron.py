"""megatron-core adapter: a drop-in `swap_model_weights`, and the layouts it plans from.

Switching from megatron-core's refit is one import:

    from refit_engine.megatron import swap_model_weights
    swap_model_weights(train_model, inference_model, refit_method="gloo")

It caches one plan per (source, target, group, options) and plans again, on every rank of the
group at once, whenever any rank's inputs differ or a plan became unusable; `clear_caches()`
drops the cached plans. `describe` and `Naming` (which piece of which global tensor each
parameter holds) live in `refit_engine.megatron_layout` and are re-exported here.
"""

from __future__ import annotations

import weakref

import torch.distributed as dist

import refit_engine  # its plan and execute, looked up per call (tests count the plans)
from refit_engine.binding import stale_reason
from refit_engine.channel import Channel, group_ranks
from refit_engine.errors import RefitError
from refit_engine.megatron_layout import GROUPED_EXPERT, Naming, _chunks, describe

__all__ = ["GROUPED_EXPERT", "Naming", "cached_plan", "clear_caches", "describe",
           "swap_model_weights"]


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
    chosen = _agree_on_plan([c.plan_id for c in bucket], group,
                            plan_kwargs.get("timeout_s", refit_engine.DEFAULT_TIMEOUT_S))
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
    plan = cached_plan(src_model, target_model, group=group, **plan_kwargs)
    try:
        return refit_engine.execute(plan)
    except BaseException:
        plan.broken = plan.broken or "a refit of it raised"
        raise
