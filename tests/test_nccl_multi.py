"""Multi-GPU NCCL refits, one process per GPU (skipped with fewer than 2 GPUs).

Bit-exact refits of a toy Kimi K2 (synthetic layouts: TP, EP, ETP and PP changes, collocated
and non-collocated) through refit_engine.plan / execute, plain and as a CUDA graph; and a rank
killed mid-refit making the others raise within the timeout (ncclCommAbort path).
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from multiproc import run_world  # noqa: E402



def _gpus():
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


CASES = [  # (name, source grid kwargs, destination grid kwargs, non-collocated)
    ("TP2->TP1", dict(tp=2), dict(tp=1), False),
    ("TP1->TP2", dict(tp=1), dict(tp=2), False),
    ("EP1->EP2 experts move", dict(tp=2, ep=1), dict(tp=1, ep=2), False),
    ("ETP2->ETP1", dict(tp=2, ep=1, etp=2), dict(tp=2, ep=2, etp=1), False),
    ("PP2->PP1", dict(tp=1, pp=2), dict(tp=2), False),
    ("non-collocated", dict(tp=1), dict(tp=1), True),
]


def _refit_cases(rank, world, device="cuda"):
    import refit_engine
    from refit_engine.harness.grid import ParallelGrid
    from refit_engine.local import from_layout
    from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout
    from refit_engine.executors.reference import materialize, random_globals
    if device == "cuda":
        torch.cuda.set_device(rank)
    cfg = KimiK2Config.toy()
    out = {}
    for name, s, d, separate in CASES:
        if separate and world < 2:
            continue
        half = world // 2 if separate else world
        src = kimi_k2_layout(cfg, ParallelGrid(half, **s))
        dst = kimi_k2_layout(cfg, ParallelGrid(half, offset=half if separate else 0, **d))
        g = random_globals(src, np.random.default_rng(len(out)))
        mine = {r for r in (rank,)}
        src_t = {k[1]: torch.from_numpy(v).to(device)
                 for k, v in materialize(src, g, ranks=mine).items()}
        dst_t = {k[1]: torch.from_numpy(v).to(device)
                 for k, v in materialize(dst, poison=0xA5, ranks=mine).items()}
        plan = refit_engine.plan(from_layout(src, rank, src_t) if src_t else None,
                                 from_layout(dst, rank, dst_t) if dst_t else None,
                                 bucket_bytes=1 << 16, timeout_s=60)
        want = materialize(dst, g, ranks=mine)
        ok = True
        for graph in (False, True, True) if device == "cuda" else (False, False):
            for t in dst_t.values():
                t.fill_(0x5A if graph else 0x3C)
            refit_engine.execute(plan, graph=graph)
            ok &= all(np.array_equal(dst_t[k[1]].cpu().numpy(), v) for k, v in want.items())
        out[name] = ok
    return out


def test_same_cases_on_cpu_gloo():
    """The multi-GPU cases' logic, on CPU tensors over gloo (runs everywhere)."""
    results = run_world(_refit_cases, 4, "cpu", timeout=300)
    for rank, r in enumerate(results):
        assert r and all(r.values()), (rank, r)


@pytest.mark.gpu_2
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_multi_gpu_refits_bit_exact():
    world = min(_gpus(), 8)
    world -= world % 2
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    results = run_world(_refit_cases, world, timeout=600)
    for rank, r in enumerate(results):
        assert all(r.values()), (rank, r)


def _dead_rank(rank, world):
    import time

    import refit_engine
    from refit_engine import RefitError, ShardedTensors, Split
    from refit_engine.executors.cuda import CudaPlanExecutor
    torch.cuda.set_device(rank)
    full = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    src, dst = ShardedTensors(), ShardedTensors()
    src.add("w", full.chunk(world, 0)[rank].contiguous().cuda(), full.shape, Split(0, world), rank)
    dst.add("w", torch.empty_like(full).cuda(), full.shape)
    plan = refit_engine.plan(src, dst, bucket_bytes=1 << 20, timeout_s=10)
    refit_engine.execute(plan)
    if rank == world - 1:
        os._exit(7)  # dies before the next refit: the others wait on it inside NCCL
    t0 = time.perf_counter()
    with pytest.raises(RefitError):
        plan.executor.run(False, None, True, 10.0)  # straight to the executor: no host check
    return time.perf_counter() - t0, isinstance(plan.executor, CudaPlanExecutor)


@pytest.mark.gpu_2
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_dead_rank_aborts_nccl_within_timeout():
    world = min(_gpus(), 4)
    results = run_world(_dead_rank, world, dying={world - 1}, timeout=300)
    for elapsed, _ in results[:-1]:
        assert elapsed < 10 + 5
