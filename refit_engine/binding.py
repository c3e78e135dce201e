"""Binding a plan to this rank's tensors, and re-checking them before every refit.

`bind` checks each local tensor against the layout (storage, size, contiguity) and records its
address for the executors, with a record of what its memory looked like (`record`);
`stale_reason` compares every record, cheaply, before every refit: a bound tensor replaced,
resized, reallocated or freed since (or another object put in its place in the
`ShardedTensors`) is refused on every rank before any byte moves, instead of being read from
or written to memory the plan no longer owns.
"""

from __future__ import annotations

import numpy as np

from refit_engine import arrays
from refit_engine.errors import RefitError
from refit_engine.layouts import Layout
from refit_engine.local import ShardedTensors, checked_info


def _owner_state(owner) -> tuple:
    """What a tensor's owner (a megatron Parameter, whose .data may be replaced) points at."""
    return owner.data_ptr(), owner.shape, owner.dtype


def record(meta, local: ShardedTensors, side: str) -> tuple:
    """Local tensor `meta` (a layouts.BufferMeta) of `local`, checked, and what `stale_reason`
    compares before every refit: (key, local, array, probe, probe's value now, owner, owner's
    state now, (side, ArrayInfo, kept)). A plain tuple: it is unpacked once per tensor and
    refit."""
    array = local.tensors[meta.key]
    info = checked_info(meta, array, side)
    probe = arrays.probe_of(array)
    owner = local.current.get(meta.key)
    owned = _owner_state(owner) if owner is not None else None
    # A NumPy array's probe holds id(base): keep the base alive so that id cannot be reused.
    kept = getattr(array, "base", None) if isinstance(array, np.ndarray) else None
    return (meta.key, local, array, probe, probe(array), owner, owned, (side, info, kept))


def bind(layout: Layout, local: ShardedTensors, rank: int, side: str):
    """Buffer index -> tensor for this rank's buffers, checked; the address table; devices;
    and {(side, buffer index): record} of every bound tensor, for `stale_reason`."""
    addresses = np.zeros(len(layout.buffers), dtype=np.int64)
    bound, devices, current = {}, set(), {}
    for index in layout.buffers_of(rank):
        rec = record(layout.buffers[index], local, side)
        info = rec[7][1]
        bound[index] = rec[2]
        addresses[index] = info.address
        devices.add(info.device)
        current[(side, index)] = rec
    return bound, addresses, devices, current


def device_of(devices: set, rank: int) -> str:
    """The one device all of this rank's tensors are on ("cpu" when it holds none)."""
    if len(devices) > 1:
        raise RefitError(f"this rank's tensors are on several devices {sorted(devices)}; a refit "
                         "moves tensors of one device per rank", ranks=[rank])
    return next(iter(devices), "cpu")


def stale_reason(plan) -> tuple[str, str] | None:
    """(local tensor, why) if any tensor bound by the plan changed since planning, else None.

    Cheap: per bound tensor, one probe (address, shape, dtype, storage size and pointer)
    compared with its value at binding, one dict lookup, and the owner's pointer for
    megatron parameters."""
    for key, local, array, probe, expected, owner, owned, extra in plan.current.values():
        try:
            if (probe(array) == expected and local.tensors.get(key) is array
                    and (owner is None or _owner_state(owner) == owned)):
                continue
        except Exception:  # noqa: BLE001 - cannot even be inspected: stale, said below
            pass
        return key, _what_changed(extra[0], key, local, array, probe, expected, owner, owned)
    return None


def _what_changed(side, key, local, array, probe, expected, owner, owned) -> str:
    where = f"{side} tensor '{key}'"
    tail = "; build a new plan"
    if local.tensors.get(key) is not array:
        return (f"{where} was replaced after planning: its ShardedTensors holds another object "
                f"under '{key}' now{tail}")
    try:
        if owner is not None and _owner_state(owner) != owned:
            now = _owner_state(owner)
            return (f"{where} was replaced after planning (shape {tuple(owned[1])} {owned[2]} -> "
                    f"{tuple(now[1])} {now[2]}, address {owned[0]:#x} -> {now[0]:#x}){tail}")
        now = probe(array)
    except Exception as exc:  # noqa: BLE001
        return f"{where} can no longer be read after planning ({type(exc).__name__}: {exc}){tail}"
    address, shape, dtype, storage_bytes, storage = now
    if (tuple(shape), dtype) != (tuple(expected[1]), expected[2]):
        return (f"{where} was resized or retyped after planning (shape {tuple(expected[1])} "
                f"{expected[2]} -> {tuple(shape)} {dtype}){tail}")
    if storage_bytes != expected[3]:
        return (f"{where}: its storage was resized or freed after planning ({expected[3]} -> "
                f"{storage_bytes} bytes){tail}")
    return (f"{where} was replaced after planning (its data moved from {expected[0]:#x} to "
            f"{address:#x}){tail}")
