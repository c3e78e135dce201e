"""The C++ CPU segment copy against the NumPy reference on random pitched segments."""

import numpy as np
import pytest

import refit_engine
from refit_engine import _core
from refit_engine.tables import SEG, SEGMENT_FIELDS
from refit_engine.executors.reference import _copy


def random_segments(rng, n, buffers, staging_bytes):
    segs = np.zeros((n, len(SEGMENT_FIELDS)), dtype=np.int64)
    for i in range(n):
        src = int(rng.integers(-1, len(buffers)))
        src_size = staging_bytes if src < 0 else buffers[src].size
        row_bytes = int(rng.integers(1, 64))
        rows = int(rng.integers(1, 8))
        src_pitch = row_bytes + int(rng.integers(0, 9))
        dst_pitch = row_bytes + int(rng.integers(0, 9))
        src_off = int(rng.integers(0, src_size - (rows - 1) * src_pitch - row_bytes + 1))
        dst_off = int(rng.integers(0, 4096 - (rows - 1) * dst_pitch - row_bytes + 1))
        segs[i, [SEG["src_buffer"], SEG["src_offset"], SEG["src_pitch"], SEG["dst_buffer"],
                 SEG["dst_offset"], SEG["dst_pitch"], SEG["rows"], SEG["row_bytes"]]] = (
            src, src_off, src_pitch, 0, dst_off, dst_pitch, rows, row_bytes)
    return segs


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_copy_matches_reference(threads):
    rng = np.random.default_rng(1)
    buffers = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in (1000, 3000, 777)]
    staging = rng.integers(0, 256, size=2048, dtype=np.uint8)
    for _ in range(20):
        segs = random_segments(rng, 30, buffers, staging.size)
        # Non-overlapping destinations are not required for this check: both apply in order.
        want = np.full(4096, 0xA5, np.uint8)
        got = want.copy()
        src_map = {i: b for i, b in enumerate(buffers)} | {-1: staging}
        _copy(segs, src_map, {0: want})
        _core.cpu_copy_segments(segs, np.array([b.ctypes.data for b in buffers], np.int64),
                                staging.ctypes.data, np.array([got.ctypes.data], np.int64), 0,
                                threads)
        assert np.array_equal(got, want)


def test_large_copy_uses_threads_exactly():
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, size=24 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    segs = np.zeros((2, len(SEGMENT_FIELDS)), dtype=np.int64)
    half = src.size // 2
    for i in range(2):
        segs[i, [SEG["src_buffer"], SEG["src_offset"], SEG["src_pitch"], SEG["dst_buffer"],
                 SEG["dst_offset"], SEG["dst_pitch"], SEG["rows"], SEG["row_bytes"]]] = (
            0, i * half, 4096, 0, (1 - i) * half, 4096, half // 4096, 4096)
    _core.cpu_copy_segments(segs, np.array([src.ctypes.data]), 0, np.array([dst.ctypes.data]), 0, 2)
    assert np.array_equal(dst[:half], src[half:]) and np.array_equal(dst[half:], src[:half])


def test_unbound_buffer_is_refused_before_copying():
    dst = np.zeros(16, np.uint8)
    segs = np.zeros((1, len(SEGMENT_FIELDS)), dtype=np.int64)
    segs[0, [SEG["src_buffer"], SEG["rows"], SEG["row_bytes"], SEG["src_pitch"], SEG["dst_pitch"]]] = (3, 1, 4, 4, 4)
    with pytest.raises(IndexError):
        _core.cpu_copy_segments(segs, np.array([dst.ctypes.data]), 0, np.array([dst.ctypes.data]), 0)


def test_features_report_build():
    assert refit_engine.features()["cuda"] == refit_engine.HAS_CUDA
    assert refit_engine.features()["nccl"] == refit_engine.HAS_NCCL
