"""Dtype names shared by layouts, the plan compiler and the executors.

Layouts name dtypes by string so the plan compiler needs neither torch nor NumPy dtypes; torch and
NumPy dtypes are accepted and normalized here. The codes are assigned here; the plan
compiler's messages name dtypes from its own table by code (`_core.DTYPE_NAMES`), checked
against this one at import.
"""

from __future__ import annotations

import numpy as np

from refit_engine import _core

# name -> (code, itemsize). Codes are stable: they cross into the plan compiler.
_DTYPES = {
    "bool": (0, 1),
    "uint8": (1, 1),
    "int8": (2, 1),
    "int16": (3, 2),
    "int32": (4, 4),
    "int64": (5, 8),
    "float16": (6, 2),
    "bfloat16": (7, 2),
    "float32": (8, 4),
    "float64": (9, 8),
    "float8_e4m3fn": (10, 1),
    "float8_e5m2": (11, 1),
    "uint16": (12, 2),
    "uint32": (13, 4),
    "uint64": (14, 8),
}
# NOTE: an older build of _core (no DTYPE_NAMES) is checked once it is rebuilt.
_CORE_NAMES = tuple(getattr(_core, "DTYPE_NAMES", ()))
if _CORE_NAMES and _CORE_NAMES != tuple(sorted(_DTYPES, key=lambda n: _DTYPES[n][0])):
    raise ImportError(f"refit_engine._core names dtypes {_CORE_NAMES}, unlike refit_engine.dtypes "
                      f"{tuple(_DTYPES)}: rebuild the package (pip install .)")
_ALIASES = {"half": "float16", "float": "float32", "double": "float64", "long": "int64",
            "int": "int32", "short": "int16"}


def dtype_name(dtype) -> str:
    """Canonical name of a dtype given as a string, a torch dtype or a NumPy dtype."""
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
    elif not isinstance(dtype, str):
        name = np.dtype(dtype).name
    name = _ALIASES.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    return name


def dtype_code(dtype) -> int:
    return _DTYPES[dtype_name(dtype)][0]


def itemsize(dtype) -> int:
    return _DTYPES[dtype_name(dtype)][1]


def numpy_bits_dtype(dtype) -> np.dtype:
    """An unsigned NumPy dtype of the same size: bit-exact storage for any dtype (bf16 too)."""
    return np.dtype(f"u{itemsize(dtype)}") if itemsize(dtype) > 1 else np.dtype("u1")
