"""The transform tables (csrc/transform: casts, fp8_block128, mxfp8) against the NumPy
reference (refit_engine/quantize.py), bit for bit: the C++ CPU path on host memory, and the
CUDA kernel where a GPU is present. Fresh random bit patterns (NaN, Inf, subnormals and all),
destinations and scales poisoned first, whole tensors and block-aligned sub-boxes with pitch.
"""

import os

import numpy as np
import pytest

from refit_engine import _core, quantize

FORMATS = dict(_core.TRANSFORM_FORMATS)
PLAIN = ("fp32", "bf16", "fp16")
ALL = PLAIN + ("fp8_block128", "mxfp8")
BITS = {"fp32": np.uint32, "bf16": np.uint16, "fp16": np.uint16}
OUT = {"fp32": np.uint32, "bf16": np.uint16, "fp16": np.uint16, "fp8_block128": np.uint8,
       "mxfp8": np.uint8}
SCALE = {"fp8_block128": np.float32, "mxfp8": np.uint8}
POISON = 0xA5


def _source(fmt, shape, rng):
    """Random bits of every kind, a zero 128 x 128 block, and realistic weights in one block."""
    bits = rng.integers(0, np.iinfo(BITS[fmt]).max, size=shape, dtype=BITS[fmt], endpoint=True)
    bits[:128, :128] = 0
    weights = (rng.standard_normal((128, 128)) * 0.02).astype(np.float32)
    if fmt == "fp32":
        bits[128:256, :128] = weights.view(np.uint32)
    else:
        bits[128:256, :128] = quantize.cast(weights.view(np.uint32), "fp32", fmt)
    return bits


def _poisoned(shape, dtype):
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.full(n, POISON, np.uint8).view(dtype).reshape(shape)


def _columns(src, dst, box, src_fmt, dst_fmt, scale=None, scale_at=(0, 0), address=None):
    """One table row: rows [r0, r0+n), cols [c0, c0+m) of `src` into the same box of `dst`."""
    address = address or (lambda a: a.ctypes.data)
    r0, n, c0, m = box
    sb, db = src.itemsize, dst.itemsize
    row = {"src": address(src) + (r0 * src.shape[1] + c0) * sb,
           "dst": address(dst) + (r0 * dst.shape[1] + c0) * db,
           "src_pitch": src.shape[1] * sb, "dst_pitch": dst.shape[1] * db, "rows": n, "cols": m,
           "src_fmt": FORMATS[src_fmt], "dst_fmt": FORMATS[dst_fmt], "scale": 0, "scale_pitch": 0}
    if scale is not None:
        i, j = scale_at
        row["scale"] = address(scale) + (i * scale.shape[1] + j) * scale.itemsize
        row["scale_pitch"] = scale.shape[1] * scale.itemsize
    return {k: np.array([v], dtype=np.int64) for k, v in row.items()}


def _want(bits, src_fmt, dst_fmt):
    data, scales = quantize.transform(bits, src_fmt, dst_fmt)
    return data, scales


def _run_cpu(src, dst_fmt, src_fmt, box=None):
    shape = src.shape
    box = box or (0, shape[0], 0, shape[1])
    dst = _poisoned(shape, OUT[dst_fmt])
    scale = (_poisoned(quantize.scale_shape(shape, dst_fmt), SCALE[dst_fmt])
             if dst_fmt in SCALE else None)
    at = (0, 0)
    if dst_fmt == "fp8_block128":
        at = (box[0] // 128, box[2] // 128)
    elif dst_fmt == "mxfp8":
        at = (box[0], box[2] // 32)
    _core.transform_cpu(_columns(src, dst, box, src_fmt, dst_fmt, scale, at))
    return dst, scale


@pytest.mark.parametrize("src_fmt", PLAIN)
@pytest.mark.parametrize("dst_fmt", ALL)
def test_cpu_path_equals_the_reference(src_fmt, dst_fmt):
    rng = np.random.default_rng(hash((src_fmt, dst_fmt)) % 2**32)
    src = _source(src_fmt, (300, 260), rng)
    dst, scale = _run_cpu(src, dst_fmt, src_fmt)
    data, scales = _want(src, src_fmt, dst_fmt)
    assert np.array_equal(dst.view(np.uint8), np.ascontiguousarray(data).view(np.uint8))
    if scales is not None:
        assert np.array_equal(scale.view(np.uint8), np.ascontiguousarray(scales).view(np.uint8))


@pytest.mark.parametrize("dst_fmt", ALL)
def test_cpu_path_on_a_block_aligned_sub_box_writes_only_it(dst_fmt):
    rng = np.random.default_rng(5)
    src = _source("bf16", (300, 260), rng)
    box = (128, 172, 128, 132) if dst_fmt != "mxfp8" else (3, 200, 64, 196)
    dst, scale = _run_cpu(src, dst_fmt, "bf16", box)
    data, scales = _want(src, "bf16", dst_fmt)
    r0, n, c0, m = box
    inside = np.zeros(src.shape, bool)
    inside[r0:r0 + n, c0:c0 + m] = True
    got, want = dst.view(np.uint8).reshape(300, -1), np.ascontiguousarray(data).view(
        np.uint8).reshape(300, -1)
    per = got.shape[1] // 260
    mask = np.repeat(inside, per, axis=1)
    assert np.array_equal(got[mask], want[mask])
    assert np.all(got[~mask] == POISON)
    if scales is not None:
        if dst_fmt == "fp8_block128":
            sub = (slice(1, None), slice(1, None))
        else:
            sub = (slice(r0, r0 + n), slice(c0 // 32, None))
        assert np.array_equal(scale[sub].view(np.uint8), scales[sub].view(np.uint8))


def test_bad_tables_are_refused_naming_the_row():
    src = np.zeros((4, 4), np.uint16)
    cols = _columns(src, np.zeros((4, 4), np.uint8), (0, 4, 0, 4), "bf16", "fp8_block128")
    with pytest.raises(ValueError, match="row 0: a quantized destination needs its scales"):
        _core.transform_cpu(cols)
    cols = _columns(src, np.zeros((4, 4), np.uint16), (0, 4, 0, 4), "bf16", "bf16")
    cols["src_fmt"][0] = FORMATS["mxfp8"]
    with pytest.raises(ValueError, match="the source must be fp32, bf16 or fp16"):
        _core.transform_cpu(cols)


def _gpu_ready():
    try:
        import torch
    except ImportError:
        return False
    return _core.HAS_CUDA and torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU and a CUDA build")
@pytest.mark.parametrize("src_fmt", PLAIN)
@pytest.mark.parametrize("dst_fmt", ALL)
def test_cuda_kernel_equals_the_reference(src_fmt, dst_fmt):
    import torch

    rng = np.random.default_rng(hash(("gpu", src_fmt, dst_fmt)) % 2**32)
    shape = (300, 260)
    src = _source(src_fmt, shape, rng)
    data, scales = _want(src, src_fmt, dst_fmt)
    for box in ((0, 300, 0, 260), (128, 172, 128, 132) if dst_fmt != "mxfp8" else (3, 200, 64, 196)):
        d_src = torch.from_numpy(src.view(np.uint8).copy()).cuda()
        d_dst = torch.full((int(np.prod(shape)) * np.dtype(OUT[dst_fmt]).itemsize,), POISON,
                           dtype=torch.uint8, device="cuda")
        s_shape = quantize.scale_shape(shape, dst_fmt) if dst_fmt in SCALE else None
        d_scale = (torch.full((int(np.prod(s_shape)) * np.dtype(SCALE[dst_fmt]).itemsize,),
                              POISON, dtype=torch.uint8, device="cuda") if s_shape else None)
        # Address views shaped like the host arrays for _columns' arithmetic.
        views = {id(src): d_src.data_ptr()}
        host_dst = np.zeros(shape, OUT[dst_fmt])
        views[id(host_dst)] = d_dst.data_ptr()
        host_scale = np.zeros(s_shape, SCALE[dst_fmt]) if s_shape else None
        if host_scale is not None:
            views[id(host_scale)] = d_scale.data_ptr()
        at = (0, 0)
        if dst_fmt == "fp8_block128":
            at = (box[0] // 128, box[2] // 128)
        elif dst_fmt == "mxfp8":
            at = (box[0], box[2] // 32)
        table = _core.TransformTable(_columns(src, host_dst, box, src_fmt, dst_fmt, host_scale,
                                              at, address=lambda a, v=views: v[id(a)]))
        table.launch(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        got = d_dst.cpu().numpy().reshape(300, -1)
        want = np.ascontiguousarray(data).view(np.uint8).reshape(300, -1)
        r0, n, c0, m = box
        per = got.shape[1] // 260
        inside = np.zeros(shape, bool)
        inside[r0:r0 + n, c0:c0 + m] = True
        mask = np.repeat(inside, per, axis=1)
        assert np.array_equal(got[mask], want[mask]), (src_fmt, dst_fmt, box)
        assert np.all(got[~mask] == POISON)
        if s_shape:
            s = d_scale.cpu().numpy().view(SCALE[dst_fmt]).reshape(s_shape)
            if box[0] == 0:
                assert np.array_equal(s.view(np.uint8), scales.view(np.uint8))
            elif dst_fmt == "fp8_block128":
                assert np.array_equal(s[1:, 1:].view(np.uint8), scales[1:, 1:].view(np.uint8))
            else:
                sub = (slice(r0, r0 + n), slice(c0 // 32, None))
                assert np.array_equal(s[sub].view(np.uint8), scales[sub].view(np.uint8))


def _every_bf16_pair(device):
    """bf16 blocks [128 * B, 128] (a torch int16 tensor on `device`) for the division shortcut:
    for every positive finite bf16 amax a (bits 0x0001 .. 0x7F7F), blocks whose element 0 is a
    and whose other elements are every positive bf16 x <= a (bits 1 .. a), then +0, -0 and every
    -x (|x| <= a) as padding. No Inf or NaN: those send a block to the exact path, not the
    shortcut. 48,895 blocks (1.5 GiB)."""
    import torch

    per = 128 * 128 - 1
    a = torch.arange(1, 0x7F80, dtype=torch.int32, device=device)
    nblk = (a + per - 1) // per
    block_a = torch.repeat_interleave(a, nblk)
    block_k = (torch.arange(len(block_a), dtype=torch.int32, device=device)
               - torch.repeat_interleave(torch.cumsum(nblk, 0, dtype=torch.int32) - nblk, nblk))
    out = torch.empty((len(block_a), 128 * 128), dtype=torch.int16, device=device)
    out[:, 0] = block_a.to(torch.int16)
    j = torch.arange(per, dtype=torch.int32, device=device)
    step = 4096
    for b in range(0, len(block_a), step):
        amax = block_a[b:b + step, None]
        t = block_k[b:b + step, None] * per + j  # position in a's sequence
        u = torch.remainder(t - amax, amax + 2)  # the padding's position: +0, -0, -1 .. -a
        pad = torch.where(u == 0, 0, (u - 1) | 0x8000)
        out[b:b + step, 1:] = torch.where(t < amax, t + 1, pad).to(torch.int16)
    return out.view(-1, 128)


def _run_cpu_threaded(src, dst_fmt, src_fmt):
    """_run_cpu of a whole [R, C] tensor, its 128-row bands split among up to 16 threads (the
    binding drops the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = min(16, os.cpu_count() or 1)
    rows = src.shape[0]
    dst = _poisoned(src.shape, OUT[dst_fmt])
    scale = _poisoned(quantize.scale_shape(src.shape, dst_fmt), SCALE[dst_fmt])
    bands = -(-rows // 128)
    cuts = [128 * (bands * i // threads) for i in range(threads + 1)]

    def run(i):
        r0, r1 = cuts[i], min(cuts[i + 1], rows)
        if r1 > r0:
            _core.transform_cpu(_columns(src, dst, (r0, r1 - r0, 0, src.shape[1]), src_fmt,
                                         dst_fmt, scale, (r0 // 128, 0)))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, range(threads)))
    return dst, scale


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs a CUDA GPU and a CUDA build")
def test_cuda_block_quotient_is_exact_for_every_bf16_pair():
    """The kernel's fp8_block128 quotient (a per-block reciprocal with two FMA corrections,
    formats.h block_quotient) against the IEEE division of the CPU path, exhaustively over bf16:
    every positive finite x against the scale amax / 448 of every bf16 amax >= x, both signs,
    the signed zeros; bit for bit, scales too. The CPU path is checked against quantize.py on a
    sample of the same blocks (the other tests check it on random data)."""
    import torch

    d_src = _every_bf16_pair("cuda")
    src = d_src.cpu().numpy().view(np.uint16)
    rows = src.shape[0]
    want, want_scale = _run_cpu_threaded(src, "fp8_block128", "bf16")
    sample = np.random.default_rng(16).choice(rows // 128, 64, replace=False)
    for b in sample:
        data, scales = quantize.transform(src[128 * b:128 * b + 128], "bf16", "fp8_block128")
        assert np.array_equal(want[128 * b:128 * b + 128], data.view(np.uint8)), b
        assert want_scale[b, 0].view(np.uint32) == scales[0, 0].view(np.uint32), b

    d_dst = torch.full((rows * 128,), POISON, dtype=torch.uint8, device="cuda")
    d_scale = torch.full((rows // 128 * 4,), POISON, dtype=torch.uint8, device="cuda")
    host_dst, host_scale = np.zeros((rows, 128), np.uint8), np.zeros((rows // 128, 1), np.float32)
    views = {id(src): d_src.data_ptr(), id(host_dst): d_dst.data_ptr(),
             id(host_scale): d_scale.data_ptr()}
    table = _core.TransformTable(_columns(src, host_dst, (0, rows, 0, 128), "bf16",
                                          "fp8_block128", host_scale,
                                          address=lambda a: views[id(a)]))
    table.launch(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    got = d_dst.cpu().numpy().reshape(rows, 128)
    got_scale = d_scale.cpu().numpy().view(np.float32).reshape(-1, 1)
    assert np.array_equal(got_scale.view(np.uint32), want_scale.view(np.uint32))
    bad = np.flatnonzero((got != want).any(axis=1))
    assert bad.size == 0, (
        f"{bad.size} rows differ; first block {bad[0] // 128} (amax bits "
        f"{src[bad[0] // 128 * 128, 0]:#06x}), x bits {src[bad[0]][got[bad[0]] != want[bad[0]]][:8]}")
