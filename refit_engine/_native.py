"""Loads the compiled module `refit_engine._core`.

Running from a source checkout (the repository root first on sys.path) shadows the installed
package, whose directory holds the compiled `_core`. Then the installed directory is added to
this package's search path, so `python -m refit_engine.bench` works from the checkout after
a plain `pip install .`.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys


def load_core(package):
    try:
        return importlib.import_module("refit_engine._core")
    except ImportError as exc:
        first_error = exc
    here = os.path.realpath(package.__path__[0])
    for entry in sys.path:
        candidate = os.path.realpath(os.path.join(entry or os.getcwd(), "refit_engine"))
        if candidate != here and glob.glob(os.path.join(candidate, "_core*")):
            package.__path__.append(candidate)
            return importlib.import_module("refit_engine._core")
    raise ImportError("refit_engine._core is not built or does not load: install the package "
                      f"with `pip install .` ({first_error})")
