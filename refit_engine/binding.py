"""Binding a plan to this rank's tensors, and re-checking them before every refit.

`bind` checks each local tensor against the layout (storage, size, contiguity) and records its
address for the executors; `stale_reason` tells, cheaply, whether any bound tensor changed
since (replaced, resized, freed) so that `execute` refuses before any byte moves.
"""

from __future__ import annotations

import numpy as np

from refit_engine.errors import RefitError
from refit_engine.layouts import Layout
from refit_engine.local import ShardedTensors, checked_info


def bind(layout: Layout, local: ShardedTensors, rank: int, side: str):
    """Buffer index -> tensor for this rank's buffers, checked; the address table; devices;
    and what each owned tensor looked like, for `stale_reason`."""
    addresses = np.zeros(len(layout.buffers), dtype=np.int64)
    bound, devices, current = {}, set(), {}
    for index in layout.buffers_of(rank):
        key = layout.buffers[index].key
        info = checked_info(layout.buffers[index], local.tensors[key], side)
        bound[index] = local.tensors[key]
        addresses[index] = info.address
        devices.add(info.device)
        owner = local.current.get(key)
        if owner is not None:
            current[(side, index)] = (owner, info.address, tuple(info.shape), owner.dtype)
    return bound, addresses, devices, current


def device_of(devices: set, rank: int) -> str:
    """The one device all of this rank's tensors are on ("cpu" when it holds none)."""
    if len(devices) > 1:
        raise RefitError(f"this rank's tensors are on several devices {sorted(devices)}; a refit "
                         "moves tensors of one device per rank", ranks=[rank])
    return next(iter(devices), "cpu")


def stale_reason(plan) -> tuple[str, str] | None:
    """(local tensor, why) if the plan no longer matches the models' tensors, else None. Cheap:
    one pointer, shape and dtype comparison per owned tensor."""
    for (side, index), (owner, address, shape, dtype) in plan.current.items():
        if owner.data_ptr() == address and tuple(owner.shape) == shape and owner.dtype == dtype:
            continue
        key = (plan.src_layout if side == "source" else plan.dst_layout).buffers[index].key
        return key, (f"{side} tensor '{key}' was replaced after planning (shape {shape} {dtype} "
                     f"-> {tuple(owner.shape)} {owner.dtype}); build a new plan")
    return None
