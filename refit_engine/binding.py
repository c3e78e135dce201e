"""Binding a plan to this rank's tensors, and re-checking them before every refit.

`bind` checks each local tensor against the layout (storage, size, contiguity) and records its
address for the executors, with a record of what its memory looked like (`record`);
`stale_reason` compares every record, cheaply, before every refit: a bound tensor replaced,
resized, reallocated or freed since (or another object put in its place in the
`ShardedTensors`) is refused on every rank before any byte moves, instead of being read from
or written to memory the plan no longer owns.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from refit_engine import arrays
from refit_engine.errors import RefitError
from refit_engine.layouts import BufferMeta, Layout
from refit_engine.local import ShardedTensors, checked_info
from refit_engine.transforms import SCALE_DTYPES, buffer_formats, scale_shape


def _owner_state(owner) -> tuple:
    """(address, shape, dtype, still the same object) of what a tensor's owner holds: a
    megatron Parameter (whose .data may be replaced), or an adapter's slot object with a
    `held()` method (a module attribute that may be assigned a new Parameter or buffer)."""
    held = owner.held() if hasattr(owner, "held") else owner
    if held is None:
        return 0, (), None, False
    return held.data_ptr(), held.shape, held.dtype, held is getattr(owner, "tensor", owner)


class Record(NamedTuple):
    """A bound local tensor and what `stale_reason` compares before every refit. A tuple: it
    is unpacked once per tensor and refit."""

    key: str
    local: ShardedTensors
    array: object
    probe: object              # arrays.probe_of(array)
    expected: tuple            # the probe's value at binding
    owner: object              # local.current[key], or None
    owned: tuple | None        # the owner's state at binding
    extra: tuple               # (side, ArrayInfo, kept): read only to explain or check overlaps


def record(meta, local: ShardedTensors, side: str) -> Record:
    """Local tensor `meta` (a layouts.BufferMeta) of `local`, checked, and recorded."""
    array = local.tensors[meta.key]
    info = checked_info(meta, array, side)
    probe = arrays.probe_of(array)
    owner = local.current.get(meta.key)
    owned = _owner_state(owner) if owner is not None else None
    # A NumPy array's probe holds id(base): keep the base alive so that id cannot be reused.
    kept = getattr(array, "base", None) if isinstance(array, np.ndarray) else None
    return Record(meta.key, local, array, probe, probe(array), owner, owned, (side, info, kept))


def bind(layout: Layout, local: ShardedTensors, rank: int, side: str):
    """Buffer index -> tensor for this rank's buffers, checked; the address table; devices;
    and {(side, buffer index): record} of every bound tensor, for `stale_reason`."""
    addresses = np.zeros(len(layout.buffers), dtype=np.int64)
    bound, devices, current = {}, {}, {}  # devices: device -> the first tensor on it
    for index in layout.buffers_of(rank):
        rec = record(layout.buffers[index], local, side)
        _, info, _ = rec.extra
        bound[index] = rec.array
        addresses[index] = info.address
        devices.setdefault(info.device, f"{side} '{rec.key}'")
        current[(side, index)] = rec
    return bound, addresses, devices, current


class _ScaleView(dict):
    """`ShardedTensors.scales` as `record` and `stale_reason` read a ShardedTensors' tensors:
    key "<key> (scale)" is scales[key], looked up in the caller's dict each time (a scale tensor
    replaced there after planning is seen)."""

    _SUFFIX = " (scale)"

    def __init__(self, scales: dict):
        super().__init__()
        self.scales = scales

    def get(self, key, default=None):
        return self.scales.get(key[:-len(self._SUFFIX)], default)

    def __getitem__(self, key):
        return self.scales[key[:-len(self._SUFFIX)]]


def bind_scales(layout: Layout, local: ShardedTensors, formats: dict, rank: int) -> dict:
    """{("scale", buffer index): record} of the scale tensors of this rank's quantized
    destination local tensors (`ShardedTensors.scales`), checked like the tensors."""
    view = ShardedTensors(tensors=_ScaleView(local.scales))
    out = {}
    for index, fmt in sorted(buffer_formats(layout, formats, rank).items()):
        if not fmt.quantized:
            continue
        meta = layout.buffers[index]
        if meta.key not in local.scales:
            raise RefitError(f"{fmt.dst} destination local tensor '{meta.key}' has no scale "
                             "tensor (ShardedTensors.add(..., format=...) gives it one)",
                             tensor=meta.key, ranks=[rank])
        scale = BufferMeta(rank, f"{meta.key} (scale)", scale_shape(meta.shape, fmt.dst),
                           SCALE_DTYPES[fmt.dst])
        out[("scale", index)] = record(scale, view, "destination")
    return out


def check_overlaps(rank: int, *currents: dict, same_ok=frozenset()) -> None:
    """Refuse local tensors of this rank that share memory where the refit writes: two
    destination tensors, or a destination and a source (sources may overlap each other: they
    are only read). currents: bind's records of each side. One sort of the byte intervals.
    same_ok: (source key, destination key) pairs whose memory may be the very same bytes (an
    aliased pair: alias=True writes nothing into that destination)."""
    spans = []
    for current in currents:
        for key, *_, (side, info, _) in current.values():
            if info.nbytes > 0:
                spans.append((info.device, info.address, info.address + info.nbytes,
                              side == "destination", side, key))
    if same_ok:
        sources = {(s[0], s[1], s[2]): s[5] for s in spans if not s[3]}
        spans = [s for s in spans
                 if not (s[3] and (sources.get((s[0], s[1], s[2])), s[5]) in same_ok)]
    spans.sort()
    device = reach = reach_dst = None  # the interval reaching furthest so far (a destination)
    for span in spans:
        if span[0] != device:
            device, reach, reach_dst = span[0], None, None
        _, start, end, is_dst = span[:4]
        hit = reach if is_dst else reach_dst  # whatever a destination overlaps is a conflict
        if hit is not None and hit[2] > start:
            (first, a), (second, b) = hit[4:], span[4:]
            raise RefitError(
                f"{first} local tensor '{a}' (bytes {hit[1]:#x}..{hit[2]:#x}) and {second} "
                f"local tensor '{b}' (bytes {start:#x}..{end:#x}) share memory on rank {rank}: "
                "the refit would overwrite bytes it reads or write them twice"
                if first != second else
                f"destination local tensors '{a}' and '{b}' share memory on rank {rank} (bytes "
                f"{hit[1]:#x}..{hit[2]:#x} and {start:#x}..{end:#x}): the refit would write "
                "them twice", tensor=a if a == b else f"{a}, {b}", ranks=[rank])
        if reach is None or end > reach[2]:
            reach = span
        if is_dst and (reach_dst is None or end > reach_dst[2]):
            reach_dst = span


def device_of(devices: dict, rank: int) -> str:
    """The one device all of this rank's tensors are on ("cpu" when it holds none); `devices`
    maps each device to a tensor on it, for the error."""
    if len(devices) > 1:
        seen = ", ".join(f"{tensor} on {device}" for device, tensor in sorted(devices.items()))
        raise RefitError(f"this rank's tensors are on several devices ({seen}); a refit moves "
                         "tensors of one device per rank: move the models to one device",
                         tensor=next(iter(devices.values())).split("'")[1], ranks=[rank])
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
            if not now[3]:
                return (f"{where} was replaced after planning: its module holds another "
                        f"{'tensor' if now[2] is not None else 'value (None)'} under that name "
                        f"now (a new Parameter or buffer assigned){tail}")
            return (f"{where} was replaced after planning (shape {tuple(owned[1])} {owned[2]} -> "
                    f"{tuple(now[1])} {now[2]}, address {owned[0]:#x} -> {now[0]:#x}){tail}")
        now = probe(array)
    except Exception as exc:  # noqa: BLE001
        return f"{where} can no longer be read after planning ({type(exc).__name__}: {exc}){tail}"
    address, shape, dtype, storage_bytes, storage, strides = now
    if (tuple(shape), dtype) != (tuple(expected[1]), expected[2]):
        return (f"{where} was resized or retyped after planning (shape {tuple(expected[1])} "
                f"{expected[2]} -> {tuple(shape)} {dtype}){tail}")
    if storage_bytes != expected[3]:
        return (f"{where}: its storage was resized or freed after planning ({expected[3]} -> "
                f"{storage_bytes} bytes){tail}")
    if address == expected[0] and tuple(strides) != tuple(expected[5]):
        return (f"{where} was restrided in place after planning (strides {tuple(expected[5])} "
                f"-> {tuple(strides)}, e.g. t_() or as_strided_()){tail}")
    return (f"{where} was replaced after planning (its data moved from {expected[0]:#x} to "
            f"{address:#x}){tail}")
