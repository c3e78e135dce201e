"""Bit-exact check of a refit against the global (unsharded) source tensors.

Every rank contributes its source tensors; each rank rebuilds the global tensors (checking
that replicas agree) and compares its destination tensors with what they must hold. This moves
every source byte to every rank: meant for tests and toy-size benchmarks, not for production.
"""

from __future__ import annotations

import numpy as np

from refit_engine import dtypes
from refit_engine.reference import assemble, materialize


def _as_bits(tensor, dtype: str) -> np.ndarray:
    import torch
    t = tensor.detach().cpu().contiguous()
    bits = dtypes.numpy_bits_dtype(dtype)
    return t.view(torch.uint8).numpy().view(bits).reshape(tuple(t.shape)).copy()


def check_exact(plan) -> list[str]:
    """Names of this rank's destination tensors that differ from the source (empty: exact).
    Collective over the plan's group."""
    import torch.distributed as dist
    src, dst = plan.src_layout, plan.dst_layout
    mine = {src.buffers[i].key: _as_bits(t, src.buffers[i].dtype)
            for i, t in plan.src_tensors.items()}
    gathered = [None] * dist.get_world_size(plan.group)
    dist.all_gather_object(gathered, (plan.rank, mine), group=plan.group)
    buffers = {(rank, key): array for rank, arrays in gathered for key, array in arrays.items()}
    globals_ = assemble(src, buffers)
    expected = materialize(dst, globals_, ranks={plan.rank})
    wrong = []
    for index, tensor in plan.dst_tensors.items():
        meta = dst.buffers[index]
        if not np.array_equal(_as_bits(tensor, meta.dtype), expected[(meta.rank, meta.key)]):
            wrong.append(meta.key)
    return wrong
