"""Bit-exact check of a refit against the global (unsharded) source tensors.

Every rank contributes its source tensors; each rank rebuilds the global tensors (checking
that replicas agree) and compares its destination tensors with what they must hold. This moves
every source byte to every rank: meant for tests and toy-size benchmarks, not for production.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from refit_engine import arrays, dtypes, quantize, transforms
from refit_engine.errors import RefitError
from refit_engine.executors.reference import assemble, materialize
from refit_engine.tables import SEG


def _as_bits(tensor, dtype: str) -> np.ndarray:
    """A host NumPy copy of a torch, NumPy or CuPy array, as unsigned ints of its element size."""
    bits = dtypes.numpy_bits_dtype(dtype)
    kind = arrays.kind_of(tensor)
    if kind == "torch":
        t = tensor.detach().cpu().contiguous()
        flat = t.reshape(-1).view(torch.uint8).numpy()
    elif kind == "cupy":
        import cupy  # optional: only a CuPy array's owner has it
        flat = cupy.asnumpy(cupy.ascontiguousarray(tensor).reshape(-1).view(cupy.uint8))
    else:
        flat = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
    return flat.view(bits).reshape(tuple(tensor.shape)).copy()


def check_exact(plan) -> list[str]:
    """Names of this rank's destination tensors that differ from the source (empty: exact).
    A transformed destination (refit_engine.transforms) must hold exactly what
    refit_engine.quantize makes of the source, scales included. Collective over the plan's
    group."""
    src, dst = plan.src_layout, plan.carrier_layout or plan.dst_layout
    mine = {src.buffers[i].key: _as_bits(t, src.buffers[i].dtype)
            for i, t in plan.src_tensors.items()}
    gathered = plan.channel.gather((plan.rank, mine), "exact check")
    buffers = {(rank, key): array for rank, arrays in gathered for key, array in arrays.items()}
    globals_ = assemble(src, buffers)
    expected = materialize(dst, globals_, ranks={plan.rank})
    targets = plan.transforms.targets if plan.transforms else {}
    wrong = []
    for index, tensor in plan.dst_tensors.items():
        meta = plan.dst_layout.buffers[index]
        want = expected[(meta.rank, meta.key)]
        if index in targets:
            if not transformed_exact(targets[index].fmt, want, tensor,
                                     plan.dst_scales.get(meta.key)):
                wrong.append(meta.key)
        elif not np.array_equal(_as_bits(tensor, meta.dtype), want):
            wrong.append(meta.key)
    return wrong


def transformed_exact(fmt, carrier_bits: np.ndarray, tensor, scale) -> bool:
    """Whether `tensor` (and its `scale`) hold exactly what quantize.transform makes of the
    source bits `carrier_bits` of the same local tensor, matrix by matrix."""
    got = _as_bits(tensor, "uint8" if fmt.quantized else transforms.dtype_of(fmt.dst))
    if not fmt.quantized:
        return np.array_equal(got, quantize.cast(carrier_bits, fmt.src, fmt.dst))
    r, c = carrier_bits.shape[-2:]
    data = carrier_bits.reshape(-1, r, c)
    got = got.reshape(data.shape)
    got_scale = np.ascontiguousarray(_as_bits(scale, transforms.SCALE_DTYPES[fmt.dst]))
    got_scale = got_scale.view(np.uint8).reshape(data.shape[0], -1)
    for m in range(data.shape[0]):
        q, scales = quantize.transform(data[m], fmt.src, fmt.dst)
        if not (np.array_equal(got[m], q) and np.array_equal(
                got_scale[m], np.ascontiguousarray(scales).view(np.uint8).reshape(-1))):
            return False
    return True


# -- verification mode: checksums of what was sent against what landed ----------------------

def _torch_region(tensor, offset: int, pitch: int, rows: int, row_bytes: int):
    """A pitched byte region of a torch tensor, `offset` bytes from its first element."""
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    # NOTE: as_strided's offset counts from the storage's start: a bound tensor is often a
    # view into a larger buffer (megatron's parameter buffer), so add the view's own.
    return flat.as_strided((rows, row_bytes), (pitch, 1), flat.storage_offset() + offset)


def segment_checksum(tensor, offset: int, pitch: int, rows: int, row_bytes: int) -> int:
    """Position-weighted sum of a pitched byte region (wrapping int64: any order, same result).

    A changed byte at position i changes the sum by delta * (i + 1), never zero, so a single
    corrupted byte is always caught; moved bytes change it too. Torch tensors, NumPy and CuPy
    arrays give the same sum for the same bytes (int64 arithmetic wraps the same way in all
    three), so ranks holding different kinds compare.
    """
    if arrays.kind_of(tensor) == "torch":
        region = _torch_region(tensor, offset, pitch, rows, row_bytes).reshape(-1)
        region = region.to(torch.int64)
        weights = torch.arange(1, region.numel() + 1, dtype=torch.int64, device=region.device)
        return int((region * weights).sum().item())
    if isinstance(tensor, np.ndarray):
        xp = np
    else:
        import cupy as xp  # optional: only a CuPy array's owner has it
    flat = xp.ascontiguousarray(tensor).reshape(-1).view(xp.uint8)
    region = xp.lib.stride_tricks.as_strided(flat[offset:], (rows, row_bytes), (pitch, 1))
    region = region.reshape(-1).astype(xp.int64)
    weights = xp.arange(1, region.size + 1, dtype=xp.int64)
    with np.errstate(over="ignore"):
        return int((region * weights).sum())


def checksums(rank_plan, src_tensors: dict, dst_tensors: dict, fused=None) -> tuple[dict, dict]:
    """(sent, landed): {(peer, tensor index): [checksum per segment, in plan order]} for what
    this rank sent and what landed in its destination tensors; local copies appear in both
    under peer = this rank. fused: {"send" | "recv" | "local": boolean mask} of segments left
    out, those into fused transformed destinations (what lands is not what was sent:
    `transformed_checksums` covers them)."""
    sent, landed = {}, {}
    fused = fused or {}

    def add(out, seg, peer, tensors, side):
        buffer = int(seg[SEG[f"{side}_buffer"]])
        value = segment_checksum(tensors[buffer], int(seg[SEG[f"{side}_offset"]]),
                                 int(seg[SEG[f"{side}_pitch"]]), int(seg[SEG["rows"]]),
                                 int(seg[SEG["row_bytes"]]))
        out.setdefault((peer, int(seg[SEG["tensor"]])), []).append(value)

    def kept(which):
        segments = getattr(rank_plan, which)
        mask = fused.get(which)
        return segments if mask is None else segments[~mask]

    for seg in kept("send"):
        add(sent, seg, int(seg[SEG["peer"]]), src_tensors, "src")
    for seg in kept("recv"):
        add(landed, seg, int(seg[SEG["peer"]]), dst_tensors, "dst")
    for seg in kept("local"):
        add(sent, seg, rank_plan.rank, src_tensors, "src")
        add(landed, seg, rank_plan.rank, dst_tensors, "dst")
    return sent, landed


# A fused transformed destination is checked in its own format: each sender transforms what it
# sent with refit_engine.quantize (it holds whole elements and blocks) and both sides sum the
# destination bytes (and scale bytes) weighted by their position in the local tensor. The
# sums do not depend on how the pieces are cut into rectangles, so sender and receiver may cut
# them differently (the rectangles follow each side's pitches).

_WRAP = 1 << 64


def _weighted(region: np.ndarray, base: int, pitch: int) -> int:
    """Sum of region[i, j] * (base + i * pitch + j + 1): bytes weighted by their position."""
    rows, width = region.shape
    weights = (base + 1 + np.arange(rows, dtype=np.int64)[:, None] * pitch
               + np.arange(width, dtype=np.int64)[None, :])
    with np.errstate(over="ignore"):
        return int((region.astype(np.int64) * weights).sum()) % _WRAP


def _region(tensor, offset: int, pitch: int, rows: int, row_bytes: int) -> np.ndarray:
    """A host copy of a pitched byte region of a torch, NumPy or CuPy array, (rows, row_bytes)."""
    if rows == 0 or row_bytes == 0:
        return np.zeros((rows, row_bytes), dtype=np.uint8)
    if arrays.kind_of(tensor) == "torch":
        return _torch_region(tensor, offset, pitch, rows, row_bytes).cpu().numpy()
    if isinstance(tensor, np.ndarray):
        flat = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
        return np.lib.stride_tricks.as_strided(flat[offset:], (rows, row_bytes),
                                               (pitch, 1)).copy()
    import cupy  # optional: only a CuPy array's owner has it
    flat = cupy.ascontiguousarray(tensor).reshape(-1).view(cupy.uint8)
    return cupy.asnumpy(cupy.lib.stride_tricks.as_strided(flat[offset:], (rows, row_bytes),
                                                          (pitch, 1)))


def _scale_region(t: transforms.Target, b: int, r0: int, c0: int, rows: int, cols: int):
    """(offset, pitch, rows, row bytes) of the scales of a whole-block rectangle."""
    br, bc = transforms.BLOCK[t.fmt.dst]
    offset, pitch = t.scale_at(b, r0, c0)
    ssize = dtypes.itemsize(transforms.SCALE_DTYPES[t.fmt.dst])
    return offset, pitch, -(-rows // br), -(-cols // bc) * ssize


def _sums(t: transforms.Target, seg, read) -> tuple[int, int]:
    """Position-weighted sums of what one segment puts in a fused destination and its scales,
    rectangle by rectangle; read(source offset, source pitch, rectangle, its first byte in
    the destination, its scale region or None) -> (its destination bytes, its scale bytes or
    None)."""
    mr, mc = t.matrix
    data = scales = 0
    for offset, pitch, rect in transforms.rectangles(seg, t.matrix, t.in_size):
        b, r0, c0, rows, cols = rect
        base = ((b * mr + r0) * mc + c0) * t.out_size
        region = _scale_region(t, b, r0, c0, rows, cols) if t.fmt.quantized else None
        q, s = read(offset, pitch, rect, base, region)
        data += _weighted(q, base, mc * t.out_size)
        if region is not None:
            scales += _weighted(s, region[0], region[1])
    return data % _WRAP, scales % _WRAP


def _landed_sums(t: transforms.Target, seg, tensor, scale) -> tuple[int, int]:
    """`_sums` of the destination (and scale) bytes one segment filled."""
    _, mc = t.matrix

    def read(_offset, _pitch, rect, base, region):
        rows, cols = rect[3], rect[4]
        q = _region(tensor, base, mc * t.out_size, rows, cols * t.out_size)
        return q, (_region(scale, *region) if region is not None else None)
    return _sums(t, seg, read)


def _sent_sums(t: transforms.Target, seg, source) -> tuple[int, int]:
    """What `_landed_sums` must find for a segment whose source side is this rank's (`seg`:
    the sender's source fields, the receiver's destination fields), from the source bytes
    transformed here."""
    src_bits = dtypes.numpy_bits_dtype(transforms.dtype_of(t.fmt.src))

    def read(offset, pitch, rect, _base, region):
        rows, cols = rect[3], rect[4]
        raw = _region(source, int(seg[SEG["src_offset"]]) + offset, pitch, rows, cols * t.in_size)
        q, s = quantize.transform(np.ascontiguousarray(raw).view(src_bits), t.fmt.src, t.fmt.dst)
        q = np.ascontiguousarray(q).view(np.uint8).reshape(rows, cols * t.out_size)
        if region is None:
            return q, None
        return q, np.ascontiguousarray(s).view(np.uint8).reshape(region[2], region[3])
    return _sums(t, seg, read)


def fused_geometry(plan) -> tuple[dict, dict]:
    """What senders need to transform what they send into this rank's fused destinations:
    (its fused Targets by buffer, {(sender, tensor index): [(dst offset, dst pitch, dst
    buffer) of each segment of that tensor from that sender, in plan order]})."""
    rt = plan.transforms
    targets = {b: t for b, t in rt.targets.items() if t.carrier is None} if rt else {}
    tensors = {int(s[SEG["tensor"]]) for s in plan.rank_plan.recv
               if int(s[SEG["dst_buffer"]]) in targets}
    fields = {}
    for seg in plan.rank_plan.recv:
        if int(seg[SEG["tensor"]]) in tensors:
            fields.setdefault((int(seg[SEG["peer"]]), int(seg[SEG["tensor"]])), []).append(
                tuple(int(seg[SEG[f]]) for f in ("dst_offset", "dst_pitch", "dst_buffer")))
    return targets, fields


def transformed_checksums(plan, geometry: dict) -> tuple[dict, dict, dict]:
    """(sent, landed, fused): sent / landed {(sender, receiver, tensor index): [data sum,
    scale sum]} over the segments into fused transformed destinations, and which of this
    rank's segments those are (`checksums`' fused masks). geometry: receiver -> its
    `fused_geometry` (every rank's, gathered)."""
    sent, landed = {}, {}
    rp, me = plan.rank_plan, plan.rank
    masks = {w: np.zeros(len(getattr(rp, w)), dtype=bool) for w in ("send", "recv", "local")}

    def add(out, key, sums):
        old = out.get(key, (0, 0))
        out[key] = [(old[0] + sums[0]) % _WRAP, (old[1] + sums[1]) % _WRAP]

    # A send pairs with the receiver's receive from this rank of the same tensor, in plan
    # order: the receiver's destination fields say where (and whether fused) it lands.
    taken = {}
    for i, seg in enumerate(rp.send):
        peer, tensor = int(seg[SEG["peer"]]), int(seg[SEG["tensor"]])
        targets, fields = geometry[peer]
        if (me, tensor) not in fields:
            continue
        n = taken.get((peer, tensor), 0)
        taken[(peer, tensor)] = n + 1
        dst_offset, dst_pitch, dst_buffer = fields[(me, tensor)][n]
        if dst_buffer not in targets:
            continue
        masks["send"][i] = True
        hybrid = seg.copy()
        hybrid[SEG["dst_offset"]], hybrid[SEG["dst_pitch"]] = dst_offset, dst_pitch
        add(sent, (me, peer, tensor), _sent_sums(targets[dst_buffer], hybrid,
                                                 plan.src_tensors[int(seg[SEG["src_buffer"]])]))
    mine = geometry[me][0]
    for which in ("recv", "local"):
        for i, seg in enumerate(getattr(rp, which)):
            t = mine.get(int(seg[SEG["dst_buffer"]]))
            if t is None:
                continue
            masks[which][i] = True
            peer = int(seg[SEG["peer"]]) if which == "recv" else me
            key = (peer, me, int(seg[SEG["tensor"]]))
            add(landed, key, _landed_sums(t, seg, plan.dst_tensors[t.buffer],
                                          plan.dst_scales.get(t.key)))
            if which == "local":
                add(sent, key, _sent_sums(t, seg,
                                          plan.src_tensors[int(seg[SEG["src_buffer"]])]))
    return sent, landed, masks


def assembled_wrong(plan) -> list[str]:
    """This rank's assembled destinations (their pieces landed in a source-dtype carrier,
    checked as plain bytes) whose final format is not exactly what quantize makes of the
    carrier: the finish step's check."""
    rt = plan.transforms
    wrong = []
    for t in (rt.targets.values() if rt else ()):
        if t.carrier is None:
            continue
        n = math.prod(t.shape) * t.in_size
        bits = _as_bits(t.carrier, "uint8").reshape(-1)[:n]
        bits = bits.view(dtypes.numpy_bits_dtype(transforms.dtype_of(t.fmt.src))).reshape(t.shape)
        if not transformed_exact(t.fmt, bits, plan.dst_tensors[t.buffer],
                                 plan.dst_scales.get(t.key)):
            wrong.append(t.key)
    return wrong


def compare_checksums(gathered, dst_names) -> list[tuple[str, int, int]]:
    """gathered: [(rank, sent, landed)] from every rank. Returns (tensor, sender, receiver) for
    every piece whose landed bytes differ from the sent bytes, sorted."""
    sent_by = {}
    for rank, sent, _ in gathered:
        for (peer, tensor), values in sent.items():
            sent_by[(rank, peer, tensor)] = values
    bad = set()
    for rank, _, landed in gathered:
        for (peer, tensor), values in landed.items():
            if sent_by.get((peer, rank, tensor)) != values:
                bad.add((dst_names[tensor], peer, rank))
    return sorted(bad)


def verify_checksums(plan) -> None:
    """Checksums of every piece of a refit as sent and as landed, compared on every rank;
    raises RefitError naming the tensors whose bytes differ. Collective over the plan's group.

    Transformed destinations are checked too: an assembled one's pieces as the plain bytes in
    its carrier, then its transform of the carrier; a fused one's pieces in its own format,
    each sender transforming what it sent (`transformed_checksums`)."""
    names = [t.name for t in plan.dst_layout.tensors]
    landed_into = dict(plan.dst_tensors)
    t_sent, t_landed, fused, finish = {}, {}, None, []
    if plan.formats:
        for b, t in plan.transforms.targets.items():
            if t.carrier is not None:
                landed_into[b] = t.carrier  # the plain bytes of an assembled tensor land here
        geometry = dict(plan.channel.gather((plan.rank, fused_geometry(plan)), "verify layout"))
        t_sent, t_landed, fused = transformed_checksums(plan, geometry)
        finish = assembled_wrong(plan)
    sent, landed = checksums(plan.rank_plan, plan.src_tensors, landed_into, fused)
    gathered = plan.channel.gather((plan.rank, sent, landed, t_sent, t_landed, finish), "verify")
    bad = compare_checksums([g[:3] for g in gathered], names)
    sent_all = {k: v for g in gathered for k, v in g[3].items()}
    for g in gathered:
        for (sender, receiver, tensor), sums in g[4].items():
            if sent_all.get((sender, receiver, tensor)) != sums:
                bad.append((names[tensor], sender, receiver))
    wrong = {(key, g[0]) for g in gathered for key in g[5]}
    if bad or wrong:
        bad = sorted(set(bad))
        tensors = sorted({name for name, _, _ in bad} | {key for key, _ in wrong})
        parts = []
        if bad:
            parts.append("what landed differs from what was sent (a transformed destination: "
                         "from the sender's transform of it; sender->receiver: "
                         + ", ".join(f"{s}->{r}" for _, s, r in bad[:8]) + ")")
        if wrong:
            parts.append("an assembled destination differs from the transform of what landed "
                         "(" + ", ".join(f"{k} on rank {r}" for k, r in sorted(wrong)[:8]) + ")")
        raise RefitError(f"verification failed for {len(tensors)} tensor(s): "
                         + "; ".join(parts), tensor=", ".join(tensors[:8]),
                         ranks={r for _, s, r in bad} | {s for _, s, _ in bad}
                         | {r for _, r in wrong})
