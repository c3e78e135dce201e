"""CUDA executor: the fused kernel, loopback refits, graph replay, a one-rank NCCL world.

Skipped without a GPU (CI); run on the device machine.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import refit_engine  # noqa: E402
from refit_engine import _core  # noqa: E402
from refit_engine.harness.grid import ParallelGrid  # noqa: E402
from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout  # noqa: E402
from refit_engine.executors.reference import materialize, random_globals  # noqa: E402

pytestmark = pytest.mark.gpu


def _to_gpu(buffers):
    return {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in buffers.items()}


def _copy_reference(dst, src, segs):
    for s_off, d_off, s_pitch, d_pitch, rows, row_bytes in segs:
        for r in range(rows):
            dst[d_off + r * d_pitch:d_off + r * d_pitch + row_bytes] = \
                src[s_off + r * s_pitch:s_off + r * s_pitch + row_bytes]


@pytest.mark.parametrize("kind", ["misaligned", "tiny", "aligned"])
def test_kernel_random_segments(kind):
    rng = np.random.default_rng({"misaligned": 1, "tiny": 2, "aligned": 3}[kind])
    size = 1 << 22
    src_host = rng.integers(0, 256, size=size, dtype=np.uint8)
    src = torch.from_numpy(src_host).cuda()
    dst = torch.full((size,), 0xA5, dtype=torch.uint8, device="cuda")
    segs, cursor = [], 0
    while cursor < size - (1 << 16):
        row_bytes = {"tiny": int(rng.integers(1, 9)), "misaligned": int(rng.integers(1, 3000)),
                     "aligned": 16 * int(rng.integers(1, 200))}[kind]
        rows = int(rng.integers(1, 12))
        pitch = row_bytes + (16 * int(rng.integers(0, 3)) if kind == "aligned" else int(rng.integers(0, 40)))
        s_off = int(rng.integers(0, size - rows * pitch - 1))
        if kind == "aligned":
            s_off -= s_off % 16
            cursor += (-cursor) % 16
        segs.append((s_off, cursor, pitch, pitch if kind != "tiny" else row_bytes, rows, row_bytes))
        cursor += (rows - 1) * segs[-1][3] + row_bytes + (0 if kind == "aligned" else int(rng.integers(0, 5)))
    a = np.array(segs, dtype=np.int64)
    table = _core.SegmentTable(a[:, 0] + src.data_ptr(), a[:, 1] + dst.data_ptr(), a[:, 2], a[:, 3],
                               a[:, 4], a[:, 5])
    table.launch(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    want = np.full(size, 0xA5, dtype=np.uint8)
    _copy_reference(want, src_host, segs)
    assert np.array_equal(dst.cpu().numpy(), want)


def test_kernel_offsets_beyond_4gib():
    free, _ = torch.cuda.mem_get_info()
    if free < (6 << 30):
        pytest.skip("needs 6 GiB of free GPU memory")
    big = torch.full(((5 << 30),), 0xA5, dtype=torch.uint8, device="cuda")
    head = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
    big[:1 << 20] = head
    base = big.data_ptr()
    far = (4 << 30) + 12345            # past 32-bit offsets, misaligned
    far2 = (4 << 30) + (3 << 20) + 5   # a pitched copy out there too
    half = 1 << 19
    table = _core.SegmentTable(np.array([base, base + 3]), np.array([base + far, base + far2]),
                               np.array([half, 2000]), np.array([half, 1001]),
                               np.array([2, 3]), np.array([half, 1000]))
    table.launch(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.equal(big[far:far + (1 << 20)], head)
    for r in range(3):
        got = big[far2 + r * 1001:far2 + r * 1001 + 1000]
        assert torch.equal(got, head[3 + r * 2000:3 + r * 2000 + 1000])
    assert int(big[far2 + 1000]) == 0xA5  # the gap between pitched rows is untouched
    del big


def _loopback_case(src_grid, dst_grid, bucket_bytes, grouped=False, seed=0, direct=False):
    cfg = KimiK2Config.toy()
    src = kimi_k2_layout(cfg, src_grid, grouped_experts=grouped)
    dst = kimi_k2_layout(cfg, dst_grid)
    rng = np.random.default_rng(seed)
    globals_ = random_globals(src, rng)
    src_t = _to_gpu(materialize(src, globals_))
    dst_t = _to_gpu(materialize(dst, poison=0xA5))
    refit = refit_engine.LoopbackRefit(src, dst, src_t, dst_t, bucket_bytes=bucket_bytes,
                                       direct=direct)
    return src, dst, src_t, dst_t, refit, globals_


def _check(dst, dst_t, globals_):
    want = materialize(dst, globals_)
    for key, t in dst_t.items():
        assert np.array_equal(t.cpu().numpy(), want[key]), key


@pytest.mark.parametrize("bucket_bytes,direct", [(1 << 30, False), (4096, False), (4096, True)])
def test_loopback_toy_kimi_8_virtual_ranks(bucket_bytes, direct):
    src, dst, src_t, dst_t, refit, g = _loopback_case(ParallelGrid(8, tp=4, ep=4),
                                                      ParallelGrid(8, tp=2, ep=8), bucket_bytes,
                                                      grouped=True, direct=direct)
    refit.run()
    _check(dst, dst_t, g)


def test_graph_replay_picks_up_new_source_values():
    src, dst, src_t, dst_t, refit, g = _loopback_case(ParallelGrid(8, tp=8, ep=2),
                                                      ParallelGrid(8, tp=1, ep=8), 1 << 16)
    refit.run(graph=True)
    _check(dst, dst_t, g)
    for step in range(2):
        g = random_globals(src, np.random.default_rng(100 + step))
        for key, value in materialize(src, g).items():
            src_t[key].copy_(torch.from_numpy(np.ascontiguousarray(value)))
        for t in dst_t.values():
            t.fill_(0x5A if t.dtype == torch.uint8 else 0)
        refit.run(graph=True)
        _check(dst, dst_t, g)


def _nccl_one_rank(rank, world):
    import torch
    from refit_engine import ShardedTensors
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    src, dst = ShardedTensors(), ShardedTensors()
    src.add("w", full.cuda(), full.shape)
    out = torch.full_like(full, float("nan")).cuda()
    dst.add("w", out, full.shape)
    plan = refit_engine.plan(src, dst)
    refit_engine.execute(plan)
    assert torch.equal(out.cpu(), full)
    out.fill_(float("nan"))  # poisoned again: the graph run must write every element itself
    refit_engine.execute(plan, graph=True)
    assert torch.equal(out.cpu(), full)
    return True


def test_one_rank_nccl_world():
    from multiproc import run_world
    assert run_world(_nccl_one_rank, 1) == [True]


def _one_rank_reliability(rank, world):
    """Streams, repeated refits, graph replays and wrong devices on a one-rank NCCL world."""
    import torch

    from refit_engine import RefitError, ShardedTensors, Split
    torch.cuda.set_device(0)
    out = {}
    g = torch.Generator().manual_seed(5)
    full = torch.randn(4096, 1024, generator=g).to(torch.bfloat16).cuda()
    src, dst = ShardedTensors(), ShardedTensors()
    halves = [full[:2048].clone(), full[2048:].clone()]  # two "TP ranks" held by one rank
    for i, h in enumerate(halves):
        src.add("w", h, full.shape, Split(0, 2), i, key=f"w.{i}")
    target = torch.full_like(full, float("nan"))
    dst.add("w", target, full.shape)
    plan = refit_engine.plan(src, dst)

    # Streams: work queued before execute on a side stream (a slow write of new source values)
    # must land before the refit reads, and work queued after must see the refit's result.
    side = torch.cuda.Stream()
    new = torch.randn(4096, 1024, generator=g).to(torch.bfloat16).cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the write
        halves[0].copy_(new[:2048])
        halves[1].copy_(new[2048:])
        refit_engine.execute(plan, stream=side.cuda_stream, sync=False)
        seen = target.clone()
    torch.cuda.synchronize()
    out["stream_ordering"] = bool(torch.equal(seen, new))

    # 100 refits and 100 graph replays: exact, and no memory growth.
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for i in range(100):
        refit_engine.execute(plan)
    after_plain = torch.cuda.memory_allocated()
    for i in range(100):
        halves[0].add_(1)  # both halves change, so each replay must move both
        halves[1].sub_(1)
        refit_engine.execute(plan, graph=True)
    torch.cuda.synchronize()
    after_graph = torch.cuda.memory_allocated()
    out["exact_after_replays"] = bool(torch.equal(target[:2048], halves[0])
                                      and torch.equal(target[2048:], halves[1]))
    out["memory"] = (before, after_plain, after_graph)

    # A CPU tensor among CUDA tensors on one rank.
    bad = ShardedTensors()
    bad.add("w", halves[0], full.shape, Split(0, 2), 0, key="a")
    bad.add("w", halves[1].cpu(), full.shape, Split(0, 2), 1, key="b")
    try:
        refit_engine.plan(bad, dst)
        out["wrong_device"] = "no error"
    except RefitError as exc:
        out["wrong_device"] = exc.reason
    return out


def test_one_rank_streams_repeats_and_devices():
    from multiproc import run_world
    (out,) = run_world(_one_rank_reliability, 1)
    assert out["stream_ordering"], "refit did not order itself with the caller's stream"
    assert out["exact_after_replays"]
    before, after_plain, after_graph = out["memory"]
    assert after_plain == before and after_graph == before, out["memory"]
    assert "several devices" in out["wrong_device"], out["wrong_device"]


def test_loopback_accepts_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    from refit_engine import Layout, Split
    src, dst = Layout(), Layout()
    src.place("w", (64, 48), "bfloat16", [(0, 0), (1, 1)], Split(0, 2, stride=2))
    dst.place("w", (64, 48), "bfloat16", [(0, 0), (1, 0)])
    g = random_globals(src, np.random.default_rng(9))
    src_t = {k: cupy.asarray(v) for k, v in materialize(src, g).items()}
    dst_t = {k: cupy.asarray(v) for k, v in materialize(dst, poison=0xA5).items()}
    refit = refit_engine.LoopbackRefit(src, dst, src_t, dst_t)
    refit.run(stream=cupy.cuda.get_current_stream().ptr)
    want = materialize(dst, g)
    for key, t in dst_t.items():
        assert np.array_equal(cupy.asnumpy(t), want[key])


def _verify_on_gpu(rank, world):
    import torch

    from refit_engine import RefitError, ShardedTensors
    from refit_engine.executors.cuda import CudaRefitExecutor
    torch.cuda.set_device(0)
    full = torch.randn(256, 64).to(torch.bfloat16).cuda()
    src, dst = ShardedTensors(), ShardedTensors()
    src.add("w", full.clone(), full.shape)
    out = torch.zeros_like(full)
    dst.add("w", out, full.shape)
    plan = refit_engine.plan(src, dst)
    refit_engine.execute(plan, verify=True)
    real = CudaRefitExecutor.run

    def corrupting(self, *a, **k):
        real(self, *a, **k)
        out.view(torch.uint8)[17] ^= 1
    CudaRefitExecutor.run = corrupting
    try:
        refit_engine.execute(plan, verify=True)
        return "no error"
    except RefitError as exc:
        return exc.tensor
    finally:
        CudaRefitExecutor.run = real


def test_verify_on_gpu_reports_the_tensor():
    from multiproc import run_world
    assert run_world(_verify_on_gpu, 1) == ["w"]
