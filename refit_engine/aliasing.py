"""Aliased shards: destination local tensors that share the source's storage instead of a copy.

In a collocated refit whose expert layout does not change (same EP and expert TP on both
sides), every expert tensor of the inference model is, byte for byte, a tensor the same rank
already holds for training. `plan(..., alias=True)` then rebinds the destination tensor to the
source's storage once, at plan time (its own storage is released), and drops its copies from
the plan: every later refit moves nothing for it, and the inference model sees each training
update as soon as it is made.

A destination local tensor is aliased only when the plan fills it entirely from one source
local tensor of the same rank, byte for byte at the same offsets (same box, dtype and element
layout), both torch tensors on the same device with the same shape and strides. Everything else
(another dtype or layout, pieces of several tensors, a CuPy or NumPy array) is copied as before.

`aliasable_buffers` is the plan-level half (layouts only: the dry run and the memory planner
use it); `choose_aliases` adds the tensor-level checks; `apply_aliases` rebinds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from refit_engine import dtypes
from refit_engine.compiler import RankPlan, segment_bytes
from refit_engine.layouts import Layout
from refit_engine.tables import SEG


def aliasable_buffers(plan: RankPlan, src: Layout, dst: Layout) -> dict[int, int]:
    """{destination buffer: source buffer} of this rank whose plan is one identity copy: every
    byte of the destination comes from local copies out of one source buffer of the same
    dtype and size, at the same byte offsets, and nothing is received for it."""
    local = plan.local
    if not len(local):
        return {}
    received = set(plan.recv[:, SEG["dst_buffer"]].tolist()) if len(plan.recv) else set()
    out = {}
    order = np.argsort(local[:, SEG["dst_buffer"]], kind="stable")
    rows = local[order]
    starts = np.flatnonzero(np.diff(rows[:, SEG["dst_buffer"]], prepend=-1))
    for first, end in zip(starts, [*starts[1:], len(rows)]):
        segs = rows[first:end]
        d = int(segs[0, SEG["dst_buffer"]])
        sources = np.unique(segs[:, SEG["src_buffer"]])
        if d in received or len(sources) != 1:
            continue
        s = int(sources[0])
        a, b = src.buffers[s], dst.buffers[d]
        if a.dtype != b.dtype or a.numel != b.numel or tuple(a.shape) != tuple(b.shape):
            continue
        flat = (segs[:, SEG["rows"]] == 1) | (
            (segs[:, SEG["src_pitch"]] == segs[:, SEG["dst_pitch"]]))
        if not (np.all(flat) and np.array_equal(segs[:, SEG["src_offset"]],
                                                segs[:, SEG["dst_offset"]])):
            continue
        if segment_bytes(segs) == b.numel * dtypes.itemsize(b.dtype):
            out[d] = s
    return out


def aliased_bytes(plan: RankPlan, src: Layout, dst: Layout) -> int:
    """Destination bytes of this rank that `alias=True` would share with the source."""
    return sum(dst.buffers[d].numel * dtypes.itemsize(dst.buffers[d].dtype)
               for d in aliasable_buffers(plan, src, dst))


def without_buffers(plan: RankPlan, buffers) -> RankPlan:
    """`plan` without the local copies into destination `buffers` (they are aliased)."""
    if not buffers:
        return plan
    keep = ~np.isin(plan.local[:, SEG["dst_buffer"]], np.array(sorted(buffers), dtype=np.int64))
    return RankPlan(plan.rank, np.ascontiguousarray(plan.local[keep]), plan.send, plan.recv,
                    plan.send_messages, plan.recv_messages, plan.send_staging_bytes,
                    plan.recv_staging_bytes, plan.num_buckets)


@dataclass
class Alias:
    """One destination local tensor rebound to a source local tensor's storage."""

    dst_buffer: int
    src_buffer: int
    key: str  # the destination local tensor
    source_key: str
    nbytes: int


def _same_storage_shape(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())


def choose_aliases(plan: RankPlan, src: Layout, dst: Layout, src_tensors: dict,
                   dst_tensors: dict) -> tuple[list[Alias], dict[str, str]]:
    """The aliases this rank can make, and {destination key: why not} for the destination
    tensors the plan could alias but whose tensors do not allow it (e.g. CuPy arrays)."""
    aliases, refused = [], {}
    for d, s in sorted(aliasable_buffers(plan, src, dst).items()):
        key = dst.buffers[d].key
        a, b = src_tensors.get(s), dst_tensors.get(d)
        if not _same_storage_shape(a, b):
            refused[key] = ("not two torch tensors of one device, shape and strides "
                            f"({type(a).__name__} and {type(b).__name__}): copied")
            continue
        aliases.append(Alias(d, s, key, src.buffers[s].key,
                             dst.buffers[d].numel * dtypes.itemsize(dst.buffers[d].dtype)))
    return aliases, refused


def apply_aliases(aliases: list[Alias], src_tensors: dict, dst_tensors: dict, dst_local) -> None:
    """Rebinds each aliased destination tensor to its source's storage, in place: a megatron
    parameter or buffer (the module keeps the same object) or a ShardedTensors tensor."""
    for alias in aliases:
        source = src_tensors[alias.src_buffer]
        owner = dst_local.current.get(alias.key)
        target = getattr(owner, "tensor", None) if owner is not None else None
        if target is None:
            target = dst_tensors[alias.dst_buffer]
        with torch.no_grad():
            # NOTE: `.data =` keeps the object (modules, optimizers and the caller's dicts
            # still hold it) and drops its old storage once nothing else refers to it.
            target.data = source.detach()
        local_view = target.data if owner is not None else target
        dst_local.tensors[alias.key] = local_view
        dst_tensors[alias.dst_buffer] = local_view
