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


def kind_of(array) -> str:
    """"torch", "numpy" or "cupy"; TypeError for anything else."""
    module = type(array).__module__.split(".")[0]
    if module == "torch":
        return "torch"
    if module == "cupy":
        return "cupy"
    if isinstance(array, np.ndarray):
        return "numpy"
    raise TypeError(f"unsupported array type {type(array).__name__} (torch, numpy or cupy)")


def _torch_unsupported(t) -> str | None:
    """Why a torch tensor cannot be refit as its bytes (it has no plain storage, or its bytes
    are not its values), else None."""
    if getattr(t, "is_nested", False):
        return "nested tensors are not supported"
    if str(t.layout) != "torch.strided":
        return f"layout {t.layout} is not supported; only dense (strided) tensors can be refit"
    if t.is_quantized:
        return f"quantized tensors ({t.dtype}) are not supported"
    if t.is_conj():
        return ("lazy conjugate views are not supported (their bytes are not their values): "
                "resolve_conj() first")
    if t.is_neg():
        return ("lazy negative views are not supported (their bytes are not their values): "
                "resolve_neg() first")
    return None


def info(array) -> ArrayInfo:
    """Raises TypeError for arrays that cannot be refit (unsupported kinds and layouts) and
    ValueError for unsupported dtypes."""
    kind = kind_of(array)
    try:
        return _info(kind, array)
    except (TypeError, ValueError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the library raises, said as a TypeError
        raise TypeError(f"{type(array).__name__} cannot be inspected "
                        f"({type(exc).__name__}: {exc})") from exc


def _info(kind: str, array) -> ArrayInfo:
    if kind == "torch":
        problem = _torch_unsupported(array)
        if problem:
            raise TypeError(problem)
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


# -- what an array's memory looks like, for the per-refit check -----------------------------
#
# A probe returns (address, shape, dtype, storage bytes, storage id, strides): taken when a plan binds
# the array and compared before every refit, so a tensor replaced, resized, reallocated or
# freed since is refused before any byte is copied into or out of memory it no longer owns.
# (The byte size follows from shape and dtype.) Kept to a few attribute reads: it runs for
# every bound tensor on every refit.


def _probe_torch(t):
    storage = t.untyped_storage()
    # Strides too: an in-place t_() or as_strided_() keeps address, shape and storage.
    return t.data_ptr(), t.shape, t.dtype, storage.nbytes(), storage.data_ptr(), t.stride()


def _probe_numpy(a):
    # NumPy frees or moves memory only through resize(refcheck=False) (a new address) or a
    # different base; the shape can be reassigned in place.
    return a.ctypes.data, a.shape, a.dtype, a.nbytes, id(a.base), a.strides


def _probe_cupy(a):  # CuPy arrays cannot get new memory in place; their shape can change
    return a.data.ptr, a.shape, a.dtype, a.nbytes, 0, a.strides


def probe_of(array):
    """The probe function for `array`'s kind (see above)."""
    return {"torch": _probe_torch, "numpy": _probe_numpy, "cupy": _probe_cupy}[kind_of(array)]
