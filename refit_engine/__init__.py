"""refit_engine: weight resharding between parallel layouts of one model.

Layouts (`Layout`, `Split`) describe where every piece of every tensor lives on each side; the
C++ planner compiles them into per-rank plans of pitched copies and messages; executors run
plans (`reference.run_reference` is the NumPy oracle).
"""

import sys as _sys

from refit_engine._native import load_core as _load_core

_core = _load_core(_sys.modules[__name__])

from refit_engine.errors import RefitError
from refit_engine.layouts import Layout, Split, TensorMeta
from refit_engine.local import ShardedTensors
from refit_engine.compiler import DEFAULT_BUCKET_BYTES, Planner, RankPlan, compile_plans
from refit_engine.refit import DEFAULT_TIMEOUT_S, Plan, execute, plan


def __getattr__(name):  # LoopbackRefit imports the CUDA executor only when asked for
    if name == "LoopbackRefit":
        from refit_engine.executors.loopback import LoopbackRefit
        return LoopbackRefit
    raise AttributeError(name)

HAS_CUDA: bool = bool(_core.HAS_CUDA)
HAS_NCCL: bool = bool(_core.HAS_NCCL)

__version__ = "0.1.0"


def features() -> dict[str, bool]:
    """What this build can do. CUDA is off when the package was built without nvcc."""
    return {"planner": True, "cpu_gloo": True, "cuda": HAS_CUDA, "nccl": HAS_NCCL}


__all__ = ["DEFAULT_BUCKET_BYTES", "DEFAULT_TIMEOUT_S", "HAS_CUDA", "HAS_NCCL", "Layout", "Plan", "Planner",
           "RankPlan", "RefitError", "ShardedTensors", "Split", "TensorMeta", "compile_plans",
           "execute", "features", "plan"]
