"""refit_engine.quantize, the reference formats every transforming executor must equal bit for
bit: checked against independent readings of each definition (a table search for e4m3's
nearest-even, a literal OCP MX algorithm, torch's own casts and float8_e4m3fn conversion
clamped to +-448), exhaustively where cheap, and edge case by edge case."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from refit_engine import quantize as Q

ROOT = Path(__file__).resolve().parents[1]
ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # every 16-bit pattern
F32_MAX = np.float32(np.finfo(np.float32).max)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def bits32(values) -> np.ndarray:
    return f32(values).view(np.uint32)


def fp32_patterns() -> np.ndarray:
    """Every bf16-significant high half with low halves around the rounding boundaries: every
    sign, exponent (normal, subnormal, Inf, NaN) and rounding case of a cast to bf16 / fp16."""
    high = np.arange(1 << 16, dtype=np.uint64) << 16
    low = np.array([0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000,
                    0x8001, 0xC000, 0xE000, 0xF000, 0xFFFF], dtype=np.uint64)
    return (high[:, None] | low[None, :]).ravel().astype(np.uint32)


# ------------------------------------------------------------------------------------------
# An independent e4m3fn: values by the format's definition, nearest-even by table search.

def e4m3_value(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 7
    if e == 15 and m == 7:
        return math.nan
    return sign * (m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


E4M3_TABLE = np.array([e4m3_value(c) for c in range(0x7F)])  # codes 0..0x7E, ascending


def table_e4m3(v) -> np.ndarray:
    """e4m3 codes of float64 values by searching the table: nearest, a tie to the even code
    (mantissa LSB 0), |v| > 448 and Inf -> 448, NaN -> 0x7F."""
    v = np.asarray(v, dtype=np.float64)
    a = np.minimum(np.abs(np.nan_to_num(v, nan=0.0, posinf=448.0, neginf=-448.0)), 448.0)
    hi = np.clip(np.searchsorted(E4M3_TABLE, a), 0, 0x7E)
    lo = np.maximum(hi - 1, 0)
    d_lo, d_hi = a - E4M3_TABLE[lo], E4M3_TABLE[hi] - a
    code = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo % 2 == 0, lo, hi)))
    code = code | (np.signbit(v).astype(np.int64) << 7)
    return np.where(np.isnan(v), 0x7F, code).astype(np.uint8)


def torch_e4m3(torch, x) -> np.ndarray:
    """torch's float8_e4m3fn of float32 values after clamping to +-448 (torch's own cast does not
    saturate); NaN -> 0x7F (torch keeps its sign)."""
    t = torch.from_numpy(f32(x).copy())
    out = torch.clamp(t, -448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return np.where(np.isnan(f32(x)), 0x7F, out).astype(np.uint8)


def test_module_imports_numpy_only():
    tree = ast.parse((ROOT / "refit_engine" / "quantize.py").read_text())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert top <= {"__future__", "collections", "re", "numpy"}, top
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and n not in tree.body]


# ------------------------------------------------------------------------------------------
# e4m3fn


def test_e4m3_all_256_codes_decode_and_round_trip(torch):
    codes = np.arange(256, dtype=np.uint8)
    values = Q.e4m3_to_float32(codes)
    expected = f32([e4m3_value(c) for c in range(256)])
    assert np.array_equal(values, expected, equal_nan=True)
    by_torch = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(values.view(np.uint32)[~np.isnan(values)],
                          by_torch.view(np.uint32)[~np.isnan(values)])
    assert np.flatnonzero(np.isnan(values)).tolist() == [0x7F, 0xFF]
    again = Q.e4m3_from_float32(values)
    assert np.array_equal(again[codes != 0xFF], codes[codes != 0xFF])  # -0 -> 0x80 included
    assert again[0xFF] == 0x7F  # the one NaN pattern
    assert values[0x7E] == 448 and values[0x01] == 2.0 ** -9 and values[0x08] == 2.0 ** -6
    assert values[0x07] == 7 * 2.0 ** -9 and values[0x80] == 0 and np.signbit(values[0x80])


def test_e4m3_every_bf16_pattern_at_fixed_scales(torch):
    """All 65536 bf16 patterns through the block format's element step at fixed scales."""
    x = Q.to_float32(ALL16, "bf16")
    for scale in (1.0, 2.0 ** -10, 3.0 / 448, 0.0123456789, 1.0e30, 2.0 ** -126):
        s = np.float32(scale)
        ours = Q.quantize_e4m3(x, s)
        with np.errstate(all="ignore"):
            q = x / s  # one float32 division
        assert np.array_equal(ours, table_e4m3(q)), scale
        assert np.array_equal(ours, torch_e4m3(torch, q)), scale


def test_e4m3_midpoints_round_to_even(torch):
    """Every point of the grid, every midpoint between neighbours, and the float32 values just
    either side of each: ties go to the even code, the rest to the nearer neighbour."""
    grid = E4M3_TABLE
    mids = (grid[:-1] + grid[1:]) / 2
    pts = f32(np.concatenate([grid, mids, 464.0 + np.zeros(1)]))
    around = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)),
                             np.nextafter(pts, np.float32(0))])
    around = np.concatenate([around, -around])
    ours = Q.e4m3_from_float32(around)
    assert np.array_equal(ours, table_e4m3(around))
    assert np.array_equal(ours, torch_e4m3(torch, around))
    tie_codes = Q.e4m3_from_float32(f32(mids))
    assert np.all(tie_codes % 2 == 0)  # every exact tie lands on an even code


def test_e4m3_edge_cases_named():
    enc = lambda v: int(Q.e4m3_from_float32(f32([v]))[0])
    assert enc(448) == 0x7E and enc(-448) == 0xFE
    for over in (449.0, 463.99, 464.0, 480.0, 1.0e30, float(F32_MAX), math.inf):
        assert enc(over) == 0x7E and enc(-over) == 0xFE, over  # SATFINITE
    assert enc(math.nan) == 0x7F and enc(-math.nan) == 0x7F  # canonical, positive
    assert enc(0.0) == 0x00 and enc(-0.0) == 0x80
    assert enc(2.0 ** -9) == 0x01 and enc(-(2.0 ** -9)) == 0x81  # smallest subnormal
    assert enc(2.0 ** -10) == 0x00  # tie between 0 and 2^-9: to even (0)
    assert enc(3 * 2.0 ** -10) == 0x02  # tie between 1 and 2 (x 2^-9): to even (2)
    assert enc(5 * 2.0 ** -10) == 0x02  # tie between 2 and 3: to even (2)
    assert enc(2.0 ** -10 * 1.0001) == 0x01
    assert enc(-(2.0 ** -12)) == 0x80  # rounds to zero, keeps its sign
    assert enc(1e-45) == 0x00  # a float32 subnormal
    assert enc(15 * 2.0 ** -10) == 0x08  # 7.5 x 2^-9: tie, up to the min normal 2^-6
    assert enc(1.0) == 0x38 and enc(1.0625) == 0x38 and enc(1.1875) == 0x3A  # ties to even
    assert enc(240.0) == 0x77 and enc(432.0) == 0x7E  # 432 = tie 416 / 448 -> 448 (even)


# ------------------------------------------------------------------------------------------
# Casts


def test_cast_fp32_to_bf16_and_fp16_against_torch_and_numpy(torch):
    f = fp32_patterns()
    x = f.view(np.float32)
    nan = np.isnan(x)
    t = torch.from_numpy(x.copy())
    bf16 = Q.cast(f, "fp32", "bf16")
    by_torch = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16[~nan], by_torch[~nan])
    assert np.all(bf16[nan] == 0x7FC0)
    # The kernel form of RNE to bf16 (add 0x7FFF plus the kept LSB, truncate) agrees.
    wide = f.astype(np.uint64)
    trick = ((wide + 0x7FFF + ((wide >> 16) & 1)) >> 16).astype(np.uint16)
    assert np.array_equal(bf16[~nan], trick[~nan])
    fp16 = Q.cast(f, "fp32", "fp16")
    by_torch = t.to(torch.float16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(fp16[~nan], by_torch[~nan])
    with np.errstate(all="ignore"):
        by_numpy = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(fp16[~nan], by_numpy[~nan])
    assert np.all(fp16[nan] == 0x7E00)


def test_cast_widening_is_exact(torch):
    for fmt, tdtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = Q.cast(ALL16, fmt, "fp32")
        x = Q.to_float32(ALL16, fmt)
        nan = np.isnan(x)
        by_torch = torch.from_numpy(ALL16.view(np.int16).copy()).view(tdtype).float().numpy()
        assert np.array_equal(out[~nan], by_torch.view(np.uint32)[~nan]), fmt
        assert np.all(out[nan] == 0x7FC00000), fmt
        back = Q.cast(out, "fp32", fmt)  # narrowing an exact widening gives the bits back
        assert np.array_equal(back[~nan], ALL16[~nan]), fmt
    nan = np.isnan(Q.to_float32(ALL16, "bf16"))  # bf16 -> fp32 is the kernel's shift by 16
    assert np.array_equal(Q.cast(ALL16, "bf16", "fp32"),
                          np.where(nan, 0x7FC00000, ALL16.astype(np.uint32) << 16))


def test_cast_between_bf16_and_fp16_all_patterns(torch):
    for src, dst, tsrc, tdst in (("bf16", "fp16", torch.bfloat16, torch.float16),
                                 ("fp16", "bf16", torch.float16, torch.bfloat16)):
        out = Q.cast(ALL16, src, dst)
        nan = np.isnan(Q.to_float32(ALL16, src))
        t = torch.from_numpy(ALL16.view(np.int16).copy()).view(tsrc)
        by_torch = t.to(tdst).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(out[~nan], by_torch[~nan]), (src, dst)
        assert np.all(out[nan] == Q.NAN_BITS[dst])
        via = Q.cast(Q.cast(ALL16, src, "fp32"), "fp32", dst)  # one rounding, via fp32
        assert np.array_equal(out, via)


def test_cast_edge_cases_named():
    def c(v, dst):
        return int(Q.cast(bits32([v]), "fp32", dst)[0])
    assert c(65504.0, "fp16") == 0x7BFF
    assert c(65519.996, "fp16") == 0x7BFF and c(65520.0, "fp16") == 0x7C00  # IEEE: to Inf
    assert c(-1e6, "fp16") == 0xFC00 and c(math.inf, "fp16") == 0x7C00
    assert c(2.0 ** -24, "fp16") == 0x0001 and c(2.0 ** -25, "fp16") == 0x0000  # tie to even
    assert c(3 * 2.0 ** -25, "fp16") == 0x0002 and c(-(2.0 ** -26), "fp16") == 0x8000
    assert c(float(F32_MAX), "bf16") == 0x7F80  # rounds past bf16's max: Inf
    assert c(float(np.float32(3.3895314e38)), "bf16") == 0x7F7F  # bf16's max
    assert c(-math.inf, "bf16") == 0xFF80 and c(-0.0, "bf16") == 0x8000
    assert c(1e-45, "bf16") == 0x0000  # float32's min subnormal: 2^-149 below bf16's 2^-133/2
    assert c(2.0 ** -133, "bf16") == 0x0001 and c(1.0 + 2.0 ** -8, "bf16") == 0x3F80  # tie even
    assert c(1.0 + 3 * 2.0 ** -8, "bf16") == 0x3F82
    nan_bits = np.array([0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0xFF812345], dtype=np.uint32)
    assert np.all(Q.cast(nan_bits, "fp32", "bf16") == 0x7FC0)
    assert np.all(Q.cast(nan_bits, "fp32", "fp16") == 0x7E00)
    assert np.array_equal(Q.cast(nan_bits, "fp32", "fp32"), nan_bits)  # a plain copy
    assert np.array_equal(Q.cast(ALL16, "bf16", "bf16"), ALL16)


def test_format_names_and_bad_input():
    assert Q.format_name("bfloat16") == "bf16" and Q.format_name("float32") == "fp32"
    with pytest.raises(ValueError, match="unknown format"):
        Q.format_name("int4")
    with pytest.raises(ValueError, match="4-byte"):
        Q.cast(ALL16, "fp32", "bf16")
    with pytest.raises(ValueError, match="2-D"):
        Q.quantize_fp8_block128(ALL16, "bf16")
    with pytest.raises(ValueError, match="not a plain"):
        Q.cast(ALL16, "mxfp8", "bf16")
    # float arrays of the right size are their bits
    assert np.array_equal(Q.cast(f32([1.5]), "fp32", "bf16"), Q.cast(bits32([1.5]), "fp32",
                                                                       "bf16"))


# ------------------------------------------------------------------------------------------
# fp8_block128


def torch_block128(torch, x: np.ndarray):
    """The block definition written with torch float32 tensor ops (tensor-tensor divisions)."""
    t = torch.from_numpy(x.copy())
    r, c = t.shape
    pr, pc = -(-r // 128) * 128, -(-c // 128) * 128
    fin = torch.where(torch.isfinite(t), t.abs(), torch.zeros_like(t))
    fin = torch.nn.functional.pad(fin, (0, pc - c, 0, pr - r))
    amax = fin.reshape(pr // 128, 128, pc // 128, 128).amax(dim=(1, 3))
    s = amax / torch.full_like(amax, 448.0)
    s = torch.where(amax == 0, torch.ones_like(s), torch.clamp(s, min=2.0 ** -126))
    full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:r, :c]
    q = torch.clamp(t / full, -448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    q = torch.where(torch.isnan(t), torch.full_like(q, 0x7F), q)
    return q.numpy(), s.numpy()


def random_bf16(rng, shape, spread=20) -> np.ndarray:
    """bf16 bits of normal values times 2^k, k random per 32 x 32 tile (so blocks and groups
    get unlike scales)."""
    x = rng.standard_normal(shape).astype(np.float32)
    k = rng.integers(-spread, spread, size=(-(-shape[0] // 32), -(-shape[1] // 32)))
    x = x * np.exp2(np.repeat(np.repeat(k, 32, 0), 32, 1)[:shape[0], :shape[1]]).astype(np.float32)
    return Q.cast(x.view(np.uint32), "fp32", "bf16")


def assert_block128(torch, bits, fmt):
    q, s = Q.quantize_fp8_block128(bits, fmt)
    tq, ts = torch_block128(torch, Q.to_float32(bits, fmt))
    assert q.dtype == np.uint8 and s.dtype == np.float32
    assert s.shape == Q.scale_shape(q.shape, "fp8_block128")
    assert np.array_equal(s.view(np.uint32), ts.view(np.uint32))
    assert np.array_equal(q, tq)
    return q, s


def test_block128_every_bf16_pattern(torch):
    """All 65536 patterns (NaN, Inf, subnormals, bf16's max) in 128 x 128 blocks, in order and
    shuffled, against the torch reading of the definition and the dequantization bound."""
    rng = np.random.default_rng(0)
    for bits in (ALL16.reshape(512, 128), rng.permutation(ALL16).reshape(256, 256)):
        q, s = assert_block128(torch, bits, "bf16")
        assert Q.check_dequantized(bits, "bf16", q, s, "fp8_block128") is None


@pytest.mark.parametrize("shape", [(300, 400), (128, 128), (1, 129), (257, 1), (5, 7)])
def test_block128_random_bf16_against_torch(torch, shape):
    rng = np.random.default_rng(sum(shape))
    bits = random_bf16(rng, shape)
    specials = np.array([0x7FC0, 0xFF80, 0x7F80, 0x0000, 0x8000, 0x0001, 0x7F7F], np.uint16)
    flat = bits.reshape(-1)
    flat[rng.integers(0, flat.size, 6)] = rng.choice(specials, 6)
    q, s = assert_block128(torch, bits, "bf16")
    assert Q.check_dequantized(bits, "bf16", q, s, "fp8_block128") is None


@pytest.mark.parametrize("fmt", ["fp32", "fp16"])
def test_block128_fp32_and_fp16_sources(torch, fmt):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((200, 300)) * 0.02).astype(np.float32)
    bits = x.view(np.uint32) if fmt == "fp32" else x.astype(np.float16).view(np.uint16)
    q, s = assert_block128(torch, bits, fmt)
    assert Q.check_dequantized(bits, fmt, q, s, "fp8_block128") is None


def block_of(values, shape=(128, 128)) -> np.ndarray:
    """fp32 bits of a tensor of zeros holding `values` {(row, col): value}."""
    x = np.zeros(shape, np.float32)
    for (i, j), v in values.items():
        x[i, j] = v
    return x.view(np.uint32)


def test_block128_zero_block():
    x = np.zeros((130, 260), np.float32)
    x[129, 259] = -0.0
    q, s = Q.quantize_fp8_block128(x.view(np.uint32), "fp32")
    assert s.shape == (2, 3) and np.all(s == 1.0)  # zero blocks: scale_inv 1.0
    assert np.all(q[x.view(np.uint32) == 0] == 0) and q[129, 259] == 0x80
    assert np.all(Q.dequantize_fp8_block128(q, s) == 0)


def test_block128_nan_stays_in_its_element():
    q, s = Q.quantize_fp8_block128(block_of({(0, 0): math.nan, (1, 1): 3.0, (2, 2): -1.0}),
                                   "fp32")
    q0, s0 = Q.quantize_fp8_block128(block_of({(1, 1): 3.0, (2, 2): -1.0}), "fp32")
    assert q[0, 0] == 0x7F and s[0, 0] == s0[0, 0] == np.float32(3.0) / np.float32(448)
    q[0, 0] = 0
    assert np.array_equal(q, q0)
    q, s = Q.quantize_fp8_block128(block_of({(0, 0): -math.nan}), "fp32")
    assert q[0, 0] == 0x7F and s[0, 0] == 1.0  # only NaN: amax of nothing is 0
    deq = Q.dequantize_fp8_block128(q, s)
    assert np.isnan(deq[0, 0]) and np.all(deq.ravel()[1:] == 0)


def test_block128_inf_saturates_at_the_finite_scale():
    q, s = Q.quantize_fp8_block128(block_of({(0, 0): math.inf, (0, 1): -math.inf,
                                             (5, 5): 2.0}), "fp32")
    assert s[0, 0] == np.float32(2.0) / np.float32(448)
    assert q[0, 0] == 0x7E and q[0, 1] == 0xFE and q[5, 5] == 0x7E
    q, s = Q.quantize_fp8_block128(block_of({(3, 4): -math.inf}), "fp32")
    assert s[0, 0] == 1.0 and q[3, 4] == 0xFE  # only Inf: scale 1.0, -448
    deq = Q.dequantize_fp8_block128(q, s)
    assert deq[3, 4] == -448.0


def test_block128_saturation_at_448_exactly():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 256)).astype(np.float32)
    q, _ = Q.quantize_fp8_block128(x.view(np.uint32), "fp32")
    blocks = np.abs(x).reshape(2, 128, 2, 128)
    for bi in range(2):
        for bj in range(2):
            i, j = np.unravel_index(blocks[bi, :, bj, :].argmax(), (128, 128))
            assert q[bi * 128 + i, bj * 128 + j] & 0x7F == 0x7E  # the amax element is +-448
    assert np.all(np.abs(Q.e4m3_to_float32(q)) <= 448)


def test_block128_one_huge_value():
    bf16_max = float(Q.to_float32(np.array([0x7F7F], np.uint16), "bf16")[0])
    x = np.ones((128, 128), np.float32)
    x[7, 9] = bf16_max
    q, s = Q.quantize_fp8_block128(x.view(np.uint32), "fp32")
    assert s[0, 0] == np.float32(bf16_max) / np.float32(448)
    assert q[7, 9] == 0x7E and np.count_nonzero(q) == 1  # 1 / 7.6e35 is far below 2^-10
    assert Q.check_dequantized(x.view(np.uint32), "fp32", q, s, "fp8_block128") is None


def test_block128_subnormals():
    # bf16's smallest subnormal everywhere: amax / 448 underflows below FLT_MIN, clamped.
    bits = np.full((128, 128), 0x0001, np.uint16)  # 2^-133
    bits[0, 0] = 0x8001
    q, s = Q.quantize_fp8_block128(bits, "bf16")
    assert s[0, 0] == np.float32(2.0 ** -126)
    assert np.all(q.ravel()[1:] == 0x04) and q[0, 0] == 0x84  # 2^-133 / 2^-126 = 4 x 2^-9
    # e4m3 subnormal outputs under a normal scale (amax 448: scale_inv 1).
    vals = {(0, 0): 448.0, (0, 1): 2.0 ** -8, (0, 2): 2.0 ** -10, (0, 3): 3 * 2.0 ** -10,
            (0, 4): -7 * 2.0 ** -9, (0, 5): 2.0 ** -6, (0, 6): 1e-40}
    q, s = Q.quantize_fp8_block128(block_of(vals), "fp32")
    assert s[0, 0] == 1.0
    assert q[0, :7].tolist() == [0x7E, 0x02, 0x00, 0x02, 0x87, 0x08, 0x00]
    # a block whose amax is just above the clamp uses amax / 448 itself
    amax = np.float32(448 * 2.0 ** -126 * 1.5)
    q, s = Q.quantize_fp8_block128(block_of({(0, 0): amax}), "fp32")
    assert s[0, 0] == amax / np.float32(448) and q[0, 0] == 0x7E


def test_block128_partial_edge_blocks_and_block_independence(torch):
    """Edge blocks are the partial ones; any block-aligned sub-tensor quantizes alone to the
    same bits and scales (what lets each destination shard quantize what it holds)."""
    rng = np.random.default_rng(11)
    bits = random_bf16(rng, (300, 270))
    q, s = assert_block128(torch, bits, "bf16")
    assert s.shape == (3, 3)
    corner = Q.to_float32(bits, "bf16")[256:, 256:]
    assert s[2, 2] == np.float32(np.abs(corner).max()) / np.float32(448)
    for r0, r1, c0, c1 in ((0, 128, 0, 128), (128, 300, 0, 270), (0, 300, 256, 270),
                           (256, 300, 128, 256)):
        sq, ss = Q.quantize_fp8_block128(bits[r0:r1, c0:c1], "bf16")
        assert np.array_equal(sq, q[r0:r1, c0:c1])
        assert np.array_equal(ss, s[r0 // 128:-(-r1 // 128), c0 // 128:-(-c1 // 128)])
        assert Q.shard_cut((300, 270), (r0, r1 - r0, c0, c1 - c0), "fp8_block128") is None


def test_block128_dequantization_bound():
    """Within half an e4m3 step of the scaled value: relative error at most 2^-4 where the
    scaled value is in e4m3's normal range, at most 2^-10 * scale_inv below it."""
    rng = np.random.default_rng(5)
    bits = random_bf16(rng, (384, 256))
    q, s = Q.quantize_fp8_block128(bits, "bf16")
    assert Q.check_dequantized(bits, "bf16", q, s, "fp8_block128") is None
    x = Q.to_float32(bits, "bf16").astype(np.float64)
    deq = Q.dequantize_fp8_block128(q, s).astype(np.float64)
    full = np.repeat(np.repeat(s.astype(np.float64), 128, 0), 128, 1)
    normal = np.abs(x) / full >= 2.0 ** -6
    assert np.all(np.abs(deq - x)[normal] <= 2.0 ** -4 * np.abs(x)[normal] * (1 + 2.0 ** -20))
    assert np.all(np.abs(deq - x)[~normal] <= 2.0 ** -10 * full[~normal] * (1 + 2.0 ** -20))
    # the check sees a wrong element
    bad = q.copy()
    bad[100, 100] ^= 0x04
    assert "element (100, 100)" in Q.check_dequantized(bits, "bf16", bad, s, "fp8_block128")
    nan_src = bits.copy()
    nan_src[3, 3] = 0x7FC0
    assert "expected NaN" in Q.check_dequantized(nan_src, "bf16", q, s, "fp8_block128")


def test_empty_tensors():
    q, s = Q.quantize_fp8_block128(np.zeros((0, 300), np.uint16), "bf16")
    assert q.shape == (0, 300) and s.shape == (0, 3)
    q, s = Q.quantize_mxfp8(np.zeros((4, 0), np.uint16), "bf16")
    assert q.shape == (4, 0) and s.shape == (4, 0)


# ------------------------------------------------------------------------------------------
# mxfp8


def spec_mxfp8(x: np.ndarray):
    """A literal reading of OCP MX v1.0 section 6.3 for E4M3 (emax_elem 8), one group at a time
    in float64: shared_exp = floor(log2(max |V|)) - emax_elem, a NaN scale above e8m0's range
    (NaN or Inf in the group), clamped below at -127 (max |V| = 0 counts as -inf); P_i = V_i /
    2^shared_exp to e4m3, nearest even, normal numbers clamped to 448."""
    r, c = x.shape
    groups = -(-c // 32)
    q, scales = np.zeros((r, c), np.uint8), np.zeros((r, groups), np.uint8)
    with np.errstate(all="ignore"):  # signalling NaNs
        wide = x.astype(np.float64)
    for i in range(r):
        for g in range(groups):
            v = wide[i, g * 32:(g + 1) * 32]
            amax = float(np.max(np.abs(v)))
            if not math.isfinite(amax):
                scales[i, g], q[i, g * 32:(g + 1) * 32] = 0xFF, 0x7F
                continue
            shared = -math.inf if amax == 0 else math.frexp(amax)[1] - 1 - 8
            shared = int(max(shared, -127))
            assert shared <= 127
            scales[i, g] = shared + 127
            q[i, g * 32:(g + 1) * 32] = table_e4m3(v / 2.0 ** shared)
    return q, scales


def test_mxfp8_hand_made_groups():
    def mx(values, c=32):
        x = np.zeros((1, c), np.float32)
        x[0, :len(values)] = values
        return Q.quantize_mxfp8(x.view(np.uint32), "fp32")
    q, s = mx([1.0])
    assert s.tolist() == [[119]] and q[0, 0] == 0x78 and not q[0, 1:].any()  # 1 = 256 x 2^-8
    q, s = mx([])
    assert s.tolist() == [[0]] and not q.any()  # zero group: X = -127, elements 0
    q, s = mx([0.75, -0.375])
    assert s.tolist() == [[118]] and q[0, :2].tolist() == [0x7C, 0xF4]  # 384, -192 x 2^-9
    q, s = mx([500.0, 1.0])
    assert s.tolist() == [[127]] and q[0, :2].tolist() == [0x7E, 0x38]  # 500 saturates to 448
    q, s = mx([2.0 ** -120])
    assert s.tolist() == [[0]] and q[0, 0] == 0x70  # X clamped at -127: 2^-120 * 2^127 = 128
    q, s = mx([float(F32_MAX), 1.0])
    assert s.tolist() == [[246]] and q[0, :2].tolist() == [0x7E, 0x00]  # X = 119
    q, s = mx([1e-45])  # a float32 subnormal amax
    assert s.tolist() == [[0]] and q[0, 0] == 0
    for special in (math.nan, math.inf, -math.inf):
        q, s = mx([1.0, special] + [0.0] * 30 + [2.0], c=40)
        assert s.tolist() == [[0xFF, 120]]  # the NaN group; the next one is its own
        assert np.all(q[0, :32] == 0x7F) and q[0, 32] == 0x78
        assert np.all(np.isnan(Q.dequantize_mxfp8(q, s)[0, :32]))
    q, s = mx([3.0] * 40, c=40)  # a partial last group of 8
    assert s.shape == (1, 2) and s.tolist() == [[120, 120]] and np.all(q == 0x7C)  # 3 x 2^7 = 384


@pytest.mark.parametrize("shape", [(64, 96), (3, 70), (1, 32), (33, 1)])
def test_mxfp8_against_the_spec(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    x = Q.to_float32(random_bf16(rng, shape, spread=60), "bf16")
    x[0, :min(32, shape[1])] = 0  # a zero group
    if shape[0] > 2:
        x[1, 0] = np.nan
        x[2, -1] = -np.inf
    if shape[1] >= 4:
        x[-1, :4] = f32([1e-39, -3e-42, 2.0 ** -126, 0])  # fp32 subnormals
    q, s = Q.quantize_mxfp8(x.view(np.uint32), "fp32")
    sq, ss = spec_mxfp8(x)
    assert np.array_equal(s, ss) and np.array_equal(q, sq)
    bits = Q.cast(x.view(np.uint32), "fp32", "bf16")
    q, s = Q.quantize_mxfp8(bits, "bf16")
    sq, ss = spec_mxfp8(Q.to_float32(bits, "bf16"))
    assert np.array_equal(s, ss) and np.array_equal(q, sq)
    assert Q.check_dequantized(bits, "bf16", q, s, "mxfp8") is None


def test_mxfp8_every_bf16_pattern():
    x = Q.to_float32(ALL16, "bf16").reshape(256, 256)
    q, s = Q.quantize_mxfp8(ALL16.reshape(256, 256), "bf16")
    sq, ss = spec_mxfp8(x)
    assert np.array_equal(s, ss) and np.array_equal(q, sq)
    assert Q.check_dequantized(ALL16.reshape(256, 256), "bf16", q, s, "mxfp8") is None


def test_mxfp8_dequantization_is_exact_products():
    codes = np.arange(256, dtype=np.uint8)
    for scale in (0, 1, 100, 127, 200, 246):  # 246: the largest the quantizer writes
        s = np.full((8, 1), scale, np.uint8)
        deq = Q.dequantize_mxfp8(codes.reshape(8, 32), s).astype(np.float64)
        want = np.array([e4m3_value(c) for c in range(256)]).reshape(8, 32) * 2.0 ** (scale - 127)
        assert np.array_equal(deq, want, equal_nan=True), scale
    big = Q.dequantize_mxfp8(np.array([[0x7E, 0x38]], np.uint8), np.array([[254]], np.uint8))
    assert big[0, 0] == np.inf and big[0, 1] == np.float32(2.0 ** 127)  # overflow to Inf
    assert np.isnan(Q.e8m0_to_float32(np.array([0xFF], np.uint8))[0])
    assert Q.e8m0_to_float32(np.array([0], np.uint8))[0] == np.float32(2.0 ** -127)


def test_transform_dispatch():
    bits = random_bf16(np.random.default_rng(1), (40, 70))
    for dst in ("fp8_block128", "mxfp8"):
        data, scales = Q.transform(bits, "bfloat16", dst)
        want = Q.quantize_fp8_block128(bits, "bf16") if dst == "fp8_block128" else \
            Q.quantize_mxfp8(bits, "bf16")
        assert np.array_equal(data, want[0]) and np.array_equal(scales, want[1])
    data, scales = Q.transform(bits, "bf16", "fp32")
    assert scales is None and np.array_equal(data, Q.cast(bits, "bf16", "fp32"))
    data, scales = Q.transform(bits, "bf16", "keep")
    assert scales is None and np.array_equal(data, bits) and data is not bits


# ------------------------------------------------------------------------------------------
# Shards that cut blocks


def test_shard_cut_messages():
    cut = Q.shard_cut
    assert cut((300, 256), (0, 128, 0, 256), "fp8_block128") is None
    assert cut((300, 256), (256, 44, 128, 128), "fp8_block128") is None  # ends at the edge
    msg = cut((300, 256), (64, 128, 0, 256), "fp8_block128")
    assert "300 x 256" in msg and "128 x 128" in msg and "row 64 and row 192 are" in msg
    msg = cut((300, 256), (0, 128, 0, 100), "fp8_block128")
    assert "col 100 is not a multiple of 128" in msg and "rows [0, 128), cols [0, 100)" in msg
    assert cut((4, 64), (1, 2, 32, 32), "mxfp8") is None  # MX groups are along rows only
    assert cut((4, 70), (0, 4, 64, 6), "mxfp8") is None
    msg = cut((4, 64), (0, 4, 16, 32), "mxfp8")
    assert "32-element groups" in msg and "col 16 and col 48 are" in msg and "4 x 64" in msg
    for fmt in ("bf16", "fp16", "fp32", "keep"):
        assert cut((300, 256), (1, 2, 3, 4), fmt) is None
    assert cut((300, 256), (64, 0, 0, 5), "fp8_block128") is None  # empty
    with pytest.raises(ValueError, match="not inside"):
        cut((300, 256), (200, 128, 0, 256), "fp8_block128")
    with pytest.raises(ValueError, match="2-D"):
        cut((300,), (0, 1, 0, 1), "mxfp8")


def test_shard_cut_on_kimi_k2_tensor_parallel_shards():
    """At full size every TP 2 / 4 / 8 shard of Kimi K2's FP8 weights holds whole 128 x 128
    blocks (SwiGLU's stride-2 halves too); the toy model's 64-wide tensors do not."""
    from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_parameters
    from refit_engine.layouts import Split

    def cuts(cfg, tp):
        out = []
        for p in kimi_k2_parameters(cfg):
            if Q.format_for(p.name) not in Q.QUANTIZED:
                continue
            if p.split is None or p.expert is not None:  # replicated; experts at ETP 1
                assert Q.shard_cut(p.shape, (0, p.shape[0], 0, p.shape[1]),
                                   "fp8_block128") is None
                continue
            dim, stride = p.split
            for part in range(tp):
                for start, _, size in Split(dim, tp, stride).boxes(p.name, p.shape, part):
                    box = (start, size, 0, p.shape[1]) if dim == 0 else \
                        (0, p.shape[0], start, size)
                    msg = Q.shard_cut(p.shape, box, "fp8_block128")
                    if msg:
                        out.append((p.name, msg))
        return out

    full = KimiK2Config(num_layers=3, num_experts=8)  # full widths, fewer layers and experts
    for tp in (2, 4, 8):
        assert cuts(full, tp) == []
    toy = cuts(KimiK2Config.toy(), 2)
    assert toy and all("128 x 128 blocks" in m for _, m in toy)


# ------------------------------------------------------------------------------------------
# Format rules


def kimi_k2_names():
    from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_parameters
    return [p.name for p in kimi_k2_parameters(KimiK2Config.toy())]


def test_kimi_k2_default_formats_on_every_name():
    names = kimi_k2_names()
    formats = {n: Q.format_for(n) for n in names}  # every name has one
    kept = {n for n, f in formats.items() if f not in Q.QUANTIZED}
    want_kept = {n for n in names if n.startswith(("embedding.", "output_layer."))
                 or "norm" in n.rsplit(".", 2)[-2] or n.endswith("layer_norm_weight")
                 or ".router." in n}
    assert kept == want_kept
    assert all(formats[n] == "fp8_block128" for n in names if n not in kept)
    assert formats["embedding.word_embeddings.weight"] == "bf16"
    assert formats["output_layer.weight"] == "bf16"
    assert formats["decoder.final_layernorm.weight"] == "bf16"
    layer = "decoder.layers.1."
    assert formats[layer + "mlp.router.weight"] == "bf16"
    assert formats[layer + "mlp.router.expert_bias"] == "fp32"
    assert formats[layer + "input_layernorm.weight"] == "bf16"
    assert formats[layer + "pre_mlp_layernorm.weight"] == "bf16"
    assert formats[layer + "self_attention.linear_q_up_proj.layer_norm_weight"] == "bf16"
    assert formats[layer + "self_attention.linear_kv_up_proj.layer_norm_weight"] == "bf16"
    for tail in ("self_attention.linear_q_down_proj.weight",
                 "self_attention.linear_q_up_proj.weight",
                 "self_attention.linear_kv_down_proj.weight",
                 "self_attention.linear_kv_up_proj.weight", "self_attention.linear_proj.weight",
                 "mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight",
                 "mlp.experts.7.linear_fc1.weight", "mlp.experts.0.linear_fc2.weight"):
        assert formats[layer + tail] == "fp8_block128", tail
    assert formats["decoder.layers.0.mlp.linear_fc1.weight"] == "fp8_block128"
    assert formats["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"] == "bf16"
    n_fp8 = sum(f == "fp8_block128" for f in formats.values())
    assert n_fp8 == 5 + 2 + (3 - 1) * (5 + 2 + 2 * 8)  # attention 5, dense / MoE MLPs


def test_format_rules_mtp_gpt_names_overrides_and_unknown():
    for name, fmt in (("mtp.layers.0.enorm.weight", "bf16"), ("mtp.layers.0.hnorm.weight", "bf16"),
                      ("mtp.layers.0.eh_proj.weight", "bf16"),
                      ("mtp.layers.0.final_layernorm.weight", "bf16"),
                      ("mtp.layers.0.transformer_layer.mlp.experts.3.linear_fc1.weight",
                       "fp8_block128"),
                      ("mtp.layers.0.mtp_model_layer.self_attention.linear_proj.weight",
                       "fp8_block128"),
                      ("mtp.layers.0.mtp_model_layer.mlp.router.expert_bias", "fp32"),
                      ("decoder.layers.0.self_attention.linear_qkv.weight", "fp8_block128"),
                      ("decoder.layers.0.self_attention.linear_qkv.bias", "bf16"),
                      ("decoder.layers.0.self_attention.linear_qkv.layer_norm_bias", "bf16"),
                      ("decoder.layers.0.self_attention.q_layernorm.weight", "bf16"),
                      ("embedding.position_embeddings.weight", "bf16")):
        assert Q.format_for(name) == fmt, name
    rules = ((r"\.experts\.\d+\.", "mxfp8"),) + Q.KIMI_K2_FORMATS
    assert Q.format_for("decoder.layers.1.mlp.experts.3.linear_fc2.weight", rules) == "mxfp8"
    assert Q.format_for("decoder.layers.1.mlp.shared_experts.linear_fc2.weight",
                        rules) == "fp8_block128"
    assert Q.format_for("decoder.layers.1.mlp.router.weight", rules) == "bf16"
    assert Q.format_for("anything", ((r".*", "keep"),)) == "keep"
    with pytest.raises(ValueError, match="no format rule matches parameter 'rotary.inv_freq'"):
        Q.format_for("rotary.inv_freq")
    with pytest.raises(ValueError, match="unknown format"):
        Q.format_for("x.weight", ((r"x", "int4"),))
