"""refit_engine: weight resharding between parallel layouts of one model.

Layouts (`Layout`, `Split`) describe where every piece of every tensor lives on each side; a
`Planner` hands them to the plan compiler (the C++ core), which compiles them into per-rank
plans of pitched copies and messages; executors run plans (`executors.reference.run_reference`
is the NumPy oracle). What benchmarks and CLIs need lives in `refit_engine.harness`, which
nothing here imports.
"""

import sys as _sys

from refit_engine._native import load_core as _load_core

_core = _load_core(_sys.modules[__name__])

from refit_engine.compiler import DEFAULT_BUCKET_BYTES, Planner, RankPlan, compile_plans
from refit_engine.errors import RefitError
from refit_engine.executors.loopback import LoopbackRefit
from refit_engine.layouts import Layout, Split, TensorMeta
from refit_engine.local import ShardedTensors
from refit_engine.refit import DEFAULT_TIMEOUT_S, Plan, execute, plan

HAS_CUDA: bool = bool(_core.HAS_CUDA)
HAS_NCCL: bool = bool(_core.HAS_NCCL)

__version__ = "0.1.0"


def features() -> dict[str, bool]:
    """What this build can do. CUDA is off when the package was built without nvcc."""
    return {"planner": True, "cpu_gloo": True, "cuda": HAS_CUDA, "nccl": HAS_NCCL}


__all__ = ["DEFAULT_BUCKET_BYTES", "DEFAULT_TIMEOUT_S", "HAS_CUDA", "HAS_NCCL", "Layout",
           "LoopbackRefit", "Plan", "Planner", "RankPlan", "RefitError", "ShardedTensors", "Split",
           "TensorMeta", "compile_plans", "execute", "features", "plan"]
