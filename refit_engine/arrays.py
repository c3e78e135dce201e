"""What the executors need to know about an array, for torch tensors, NumPy and CuPy arrays.

Executors only take addresses, sizes and devices; this is the one place that looks inside the
array libraries (none of them is imported here unless the caller already uses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refit_engine import dtypes


@dataclass(frozen=True)
class ArrayInfo:
    address: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    device: str  # "cpu", "cuda:N" or "meta"
    contiguous: bool


def _kind(array) -> str:
    module = type(array).__module__.split(".")[0]
    if module == "torch":
        return "torch"
    if module == "cupy":
        return "cupy"
    if isinstance(array, np.ndarray):
        return "numpy"
    raise TypeError(f"unsupported array type {type(array).__name__} (torch, numpy or cupy)")


def info(array) -> ArrayInfo:
    kind = _kind(array)
    if kind == "torch":
        device = "meta" if array.is_meta else str(array.device)
        if device == "cuda":
            device = f"cuda:{array.device.index}"
        address = 0 if array.is_meta else array.data_ptr()
        return ArrayInfo(address, array.numel() * array.element_size(), tuple(array.shape),
                         dtypes.dtype_name(array.dtype), device, array.is_contiguous())
    if kind == "cupy":
        return ArrayInfo(int(array.data.ptr), int(array.nbytes), tuple(array.shape),
                         dtypes.dtype_name(array.dtype), f"cuda:{array.device.id}",
                         bool(array.flags.c_contiguous))
    return ArrayInfo(int(array.ctypes.data), int(array.nbytes), tuple(array.shape),
                     dtypes.dtype_name(array.dtype), "cpu", bool(array.flags.c_contiguous))
