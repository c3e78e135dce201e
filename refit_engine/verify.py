"""Bit-exact check of a refit against the global (unsharded) source tensors.

Every rank contributes its source tensors; each rank rebuilds the global tensors (checking
that replicas agree) and compares its destination tensors with what they must hold. This moves
every source byte to every rank: meant for tests and toy-size benchmarks, not for production.
"""

from __future__ import annotations

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

def segment_checksum(tensor, offset: int, pitch: int, rows: int, row_bytes: int) -> int:
    """Position-weighted sum of a pitched byte region (wrapping int64: any order, same result).

    A changed byte at position i changes the sum by delta * (i + 1), never zero, so a single
    corrupted byte is always caught; moved bytes change it too. Torch tensors, NumPy and CuPy
    arrays give the same sum for the same bytes (int64 arithmetic wraps the same way in all
    three), so ranks holding different kinds compare.
    """
    if arrays.kind_of(tensor) == "torch":
        flat = tensor.detach().reshape(-1).view(torch.uint8)
        region = flat.as_strided((rows, row_bytes), (pitch, 1), offset).reshape(-1)
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


def checksums(rank_plan, src_tensors: dict, dst_tensors: dict,
              skip=frozenset()) -> tuple[dict, dict]:
    """(sent, landed): {(peer, tensor index): [checksum per segment, in plan order]} for what
    this rank sent and what landed in its destination tensors; local copies appear in both
    under peer = this rank. skip: tensor indices left out (transformed destinations: what
    lands is not what was sent; `check_exact` checks them)."""
    sent, landed = {}, {}

    def add(out, seg, peer, tensors, side):
        if int(seg[SEG["tensor"]]) in skip:
            return
        buffer = int(seg[SEG[f"{side}_buffer"]])
        value = segment_checksum(tensors[buffer], int(seg[SEG[f"{side}_offset"]]),
                                 int(seg[SEG[f"{side}_pitch"]]), int(seg[SEG["rows"]]),
                                 int(seg[SEG["row_bytes"]]))
        out.setdefault((peer, int(seg[SEG["tensor"]])), []).append(value)

    for seg in rank_plan.send:
        add(sent, seg, int(seg[SEG["peer"]]), src_tensors, "src")
    for seg in rank_plan.recv:
        add(landed, seg, int(seg[SEG["peer"]]), dst_tensors, "dst")
    for seg in rank_plan.local:
        add(sent, seg, rank_plan.rank, src_tensors, "src")
        add(landed, seg, rank_plan.rank, dst_tensors, "dst")
    return sent, landed


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
    raises RefitError naming the tensors whose bytes differ. Collective over the plan's group."""
    skip = {i for i, t in enumerate(plan.dst_layout.tensors) if t.name in plan.formats}
    sent, landed = checksums(plan.rank_plan, plan.src_tensors, plan.dst_tensors, skip)
    bad = compare_checksums(plan.channel.gather((plan.rank, sent, landed), "verify"),
                            [t.name for t in plan.dst_layout.tensors])
    if bad:
        names = sorted({name for name, _, _ in bad})
        pairs = ", ".join(f"{s}->{r}" for _, s, r in bad[:8])
        raise RefitError(f"verification failed: bytes that landed differ from bytes sent for "
                         f"{len(names)} tensor(s) (sender->receiver: {pairs})",
                         tensor=", ".join(names[:8]),
                         ranks={r for _, s, r in bad} | {s for _, s, _ in bad})
