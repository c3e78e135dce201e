"""The reference formats of a refit's transforms (issue 16): casts, block FP8, MXFP8.

This module DEFINES, bit for bit, what a destination tensor in another format holds. Every
executor that transforms while it copies (the CUDA kernels, the C++ CPU path) must produce
exactly these bits; the tests compare against it with `.view(np.uint8 / np.uint16 / np.uint32)`.
NumPy only; everything is computed on raw bit patterns, arithmetic in float32 as a CUDA kernel
does it (every step below is one IEEE float32 operation, or exact).

Formats (`FORMATS`; the repo's dtype names "bfloat16", "float16", "float32" are accepted too):

- "bf16", "fp16", "fp32": a plain tensor of that dtype (raw bits as uint16 / uint16 / uint32).
- "fp8_block128": DeepSeek-V3's checkpoint format. float8 e4m3fn elements (uint8 bits) of a
  2-D [R, C] global tensor, one float32 `weight_scale_inv` per 128 x 128 block of the GLOBAL
  tensor, scales [ceil(R/128), ceil(C/128)] row-major; the blocks at the bottom and right edge
  are the partial ones (R or C not a multiple of 128). value = e4m3 * scale_inv.
- "mxfp8": OCP Microscaling (MX) v1.0 MXFP8 with E4M3 elements: one e8m0 scale (uint8,
  2^(bits - 127), 0xFF = NaN) per 32 consecutive elements of a row, scales [R, ceil(C/32)];
  the last group of a row is the partial one. value = e4m3 * 2^(scale - 127).
- "keep": no transform (the destination holds the source's dtype and bits).

Definitions (each one a choice; the tests name them one by one):

Casts (`cast`)
- bf16 -> fp32, fp16 -> fp32: exact (every bf16 / fp16 value is a float32).
- fp32 -> bf16, fp32 -> fp16: IEEE round to nearest, ties to even, subnormals kept (rounded on
  the subnormal grid), overflow to +-Inf as IEEE says (fp16: |x| >= 65520 -> Inf; no
  saturation), +-Inf -> +-Inf, the sign of zero kept.
- bf16 <-> fp16: widened to fp32 (exact), then as above: one rounding.
- NaN -> the destination's canonical quiet NaN, positive: bf16 0x7FC0, fp16 0x7E00, fp32
  0x7FC00000 (e4m3 below: 0x7F). Sign and payload are dropped: GPU arithmetic does not keep
  them either (its NaN results are canonical), so one pattern per format is the contract.
  Neither torch nor CUDA is the reference here: torch 2.13's CPU casts give bf16 0xFFFF and keep
  the sign in fp16 (0x7E00 | sign) and e4m3 (0x7F | sign); CUDA's cvt gives 0x7FFF for bf16
  and fp16. A kernel selects `isnan(x) ? kNan : cvt(x)`.
- src == dst is a plain copy (bits unchanged, NaNs too).

fp32 -> e4m3 (`e4m3_from_float32`): round to nearest, ties to even, on e4m3fn's grid (3
mantissa bits, exponent bias 7, subnormals k * 2^-9 for k = 1..7, min normal 2^-6, max 448 =
0x7E), then SATFINITE: every |x| > 448 and +-Inf -> +-448 (0x7E / 0xFE); NaN -> 0x7F; zero and
values that round to zero keep their sign (-0 -> 0x80). e4m3fn has no Inf. This is CUDA's
`__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)` (cvt.rn.satfinite.e4m3x2.f32), with NaN
inputs selected by the kernel itself so that no path depends on what a cvt does with a NaN's
sign; torch's float8_e4m3fn cast does not saturate (|x| >= 464 -> NaN), so it equals this only
after clamping to +-448.

fp8_block128 (`quantize_fp8_block128`), per 128 x 128 block (the partial one at the edges):
1. x = the source widened to float32 (exact).
2. amax = max |x| over the block's FINITE elements (NaN and +-Inf do not count; max is exact).
3. scale_inv = amax / 448.0f (one float32 division, IEEE round to nearest even), then
   - amax == 0 (all-zero block, or only non-finite values): scale_inv = 1.0. Every choice
     dequantizes zeros to zero; 1.0 is what Transformer Engine uses for an amax of zero, and a
     normal number keeps step 4 free of 0 / 0.
   - scale_inv < 2^-126 (FLT_MIN: amax < 448 * 2^-126, about 5.3e-36): scale_inv = 2^-126, so
     the divisor is never subnormal or zero (every |x| / 2^-126 is then below 448: nothing
     saturates). No other clamp: unlike torch recipes that clamp amax at 1e-4 or 1e-12
     (or compressed-tensors' scale at 2^-23), every block of real weights gets exactly
     amax / 448, as DeepSeek-V3's own `s = amax / 448` does. Scales are not rounded to powers
     of two.
   Kernel form: `s = amax == 0.f ? 1.f : fmaxf(amax / 448.f, FLT_MIN)`.
4. q = x / scale_inv (one float32 division, IEEE RNE, no reciprocal-multiply), then fp32 ->
   e4m3 as above. NaN elements -> 0x7F (only those elements: the NaN does not spread); +-Inf
   elements -> +-448 of the block's scale. Finite elements never saturate (|x| <= amax, and
   amax / scale_inv rounds to at most 448 on e4m3's grid).
Dequantization (`dequantize_fp8_block128`): e4m3 value * scale_inv, one float32 multiply.

mxfp8 (`quantize_mxfp8`), per group of 32 consecutive elements of a row (OCP MX v1.0's
conversion algorithm, as Microsoft's reference implementation `microxcaling` reads it):
1. x widened to float32 (exact).
2. A group holding a NaN or +-Inf: scale 0xFF (NaN) and every element 0x7F. The spec's
   shared exponent floor(log2(max |V_i|)) is then NaN or +Inf, above e8m0's range, which
   microxcaling maps to a NaN scale; the spec makes every element of a NaN-scaled block NaN.
3. Otherwise amax = max |x| (finite), shared exponent X = floor(log2(amax)) - 8 (emax of E4M3
   is 8: 448 = 1.75 * 2^8), clamped below at -127 (an all-zero group, or amax < 2^-118, gets
   X = -127, scale bits 0: the spec's floor(log2(0)) is taken as -inf, as microxcaling's
   FP32_MIN_NORMAL substitute ends the same). For finite float32 X <= 119, so the upper clamp
   at 127 never applies. scale bits = X + 127. Kernel form, exact: `max(biased_exponent(amax)
   - 8, 0)` (a subnormal or zero amax has biased exponent 0).
4. element = fp32 -> e4m3 (RNE, SATFINITE) of x * 2^-X: an exact float32 multiply by a power of
   two that is always a normal float32 (2^-X in [2^-119, 2^127]), except that results below
   2^-126 round in float32 first, which cannot change the e4m3 result (all are < 2^-10, so 0).
   The spec allows (and this takes) clamping to 448: elements with |x| >= 464 * 2^X saturate
   (amax can reach 512 * 2^X).
Dequantization (`dequantize_mxfp8`): e4m3 value * 2^(scale - 127), one float32 multiply, exact
(2^-127 is a float32 subnormal: kernels must not flush subnormals); scales above 246, which the
quantizer never writes, can overflow it to +-Inf.

For every executor: no fast-math, no flush-to-zero (subnormal inputs, scales and outputs are
part of the format), IEEE division.

Also here: `shard_cut` (a destination shard that splits a 128 x 128 block or a 32-element
group, which the planner refuses), `check_dequantized` (the dequantization check against the
source), `scale_shape`, and the per-name format rules (`format_for`, `KIMI_K2_FORMATS`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

BLOCK = 128  # fp8_block128: block side, rows and columns of the global tensor
MX_GROUP = 32  # mxfp8: consecutive elements of a row per scale
E4M3_MAX = 448.0
E4M3_MAX_BITS = 0x7E
E4M3_NAN = 0x7F
E8M0_NAN = 0xFF
E4M3_EMAX = 8  # exponent of E4M3's largest normal: OCP MX's emax_elem
FLT_MIN = np.float32(2.0 ** -126)
NAN_BITS = {"bf16": 0x7FC0, "fp16": 0x7E00, "fp32": 0x7FC00000}

PLAIN = ("bf16", "fp16", "fp32")
QUANTIZED = ("fp8_block128", "mxfp8")
KEEP = "keep"
FORMATS = PLAIN + QUANTIZED + (KEEP,)
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
            "float": "fp32"}
_BITS = {"bf16": np.uint16, "fp16": np.uint16, "fp32": np.uint32}
# (exponent bias, mantissa bits, all-ones exponent field) of the IEEE-like formats.
_IEEE = {"bf16": (127, 7, 0xFF), "fp16": (15, 10, 0x1F), "fp32": (127, 23, 0xFF)}


def format_name(fmt: str) -> str:
    """The canonical name of a format ("bfloat16" -> "bf16"); ValueError for unknown ones."""
    name = _ALIASES.get(fmt, fmt)
    if name not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    return name


def _plain(fmt: str) -> str:
    name = format_name(fmt)
    if name not in PLAIN:
        raise ValueError(f"{fmt!r} is not a plain floating-point format ({', '.join(PLAIN)})")
    return name


def _as_bits(bits, fmt: str) -> np.ndarray:
    """`bits` viewed as the unsigned integers of `fmt` (an array of any dtype of that size:
    uint16 / float16 for bf16 and fp16, uint32 / float32 for fp32)."""
    fmt = _plain(fmt)
    a = np.asarray(bits)
    want = np.dtype(_BITS[fmt])
    if a.dtype.itemsize != want.itemsize or a.dtype.kind not in "uif":
        raise ValueError(f"{fmt} bits must be a {want.itemsize}-byte array, got {a.dtype}")
    return np.ascontiguousarray(a).view(want)


def _round_nearest_even(a: np.ndarray, mbits: int, emin: int) -> np.ndarray:
    """`a` (float64, finite, >= 0) rounded to nearest, ties to even, on the grid of a binary
    format with `mbits` mantissa bits and minimum normal exponent `emin` (no upper limit):
    exact, since float64 holds every float32 and the grid's points and midpoints."""
    _, e = np.frexp(a)  # a = m * 2^e, m in [0.5, 1): floor(log2 a) = e - 1
    quantum = np.ldexp(1.0, np.maximum(e - 1, emin) - mbits)
    return np.rint(a / quantum) * quantum  # rint: half to even; a / quantum is exact


def _encode(r: np.ndarray, bias: int, mbits: int) -> np.ndarray:
    """Bit patterns (sign 0) of values `r` already on the format's grid (float64 >= 0)."""
    _, e = np.frexp(r)
    exp = np.where(r > 0, e - 1, -bias)  # zero: the subnormal branch
    normal = exp >= 1 - bias
    sub = r * 2.0 ** (bias - 1 + mbits)  # subnormal: r / 2^(1 - bias - mbits), an integer
    mant = (np.ldexp(r, -exp) - 1.0) * 2.0 ** mbits
    code = np.where(normal, ((exp + bias) << mbits) + mant, sub)
    return code.astype(np.uint64)


def to_float32(bits, fmt: str) -> np.ndarray:
    """bf16 / fp16 / fp32 bits as float32 values, exactly (NaN bits as they widen; every
    transform here tests NaN on this value, never on its bits)."""
    fmt = _plain(fmt)
    b = _as_bits(bits, fmt)
    if fmt == "fp32":
        return b.view(np.float32).copy()
    if fmt == "bf16":
        return (b.astype(np.uint32) << 16).view(np.float32)
    with np.errstate(all="ignore"):  # signalling NaNs
        return b.view(np.float16).astype(np.float32)  # exact, IEEE


def _from_float32(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 values -> bits of `fmt` by the cast rules in the module's doc."""
    bias, mbits, ones = _IEEE[fmt]
    width = 1 + (ones.bit_length()) + mbits
    dtype = _BITS[fmt]
    sign = (x.view(np.uint32) >> 31).astype(np.uint64) << (width - 1)
    if fmt == "fp32":
        out = x.view(np.uint32).astype(np.uint64)
    else:
        a = np.abs(x.astype(np.float64))
        finite = np.isfinite(a)
        r = _round_nearest_even(np.where(finite, a, 0.0), mbits, 1 - bias)
        max_finite = (2.0 - 2.0 ** -mbits) * 2.0 ** (ones - 1 - bias)
        inf_bits = ones << mbits
        out = np.where(r > max_finite, inf_bits, _encode(np.minimum(r, max_finite), bias, mbits))
        out = np.where(finite, out, inf_bits) | sign
    out = np.where(np.isnan(x), NAN_BITS[fmt], out)
    return out.astype(dtype)


def cast(bits, src: str, dst: str) -> np.ndarray:
    """A plain-format cast, bit patterns in and out (uint16 for bf16 / fp16, uint32 for fp32):
    exact widening, IEEE RNE narrowing with overflow to Inf, canonical positive NaN."""
    src, dst = _plain(src), _plain(dst)
    b = _as_bits(bits, src)
    if src == dst:
        return b.copy()
    with np.errstate(all="ignore"):
        return _from_float32(to_float32(b, src), dst)


def e4m3_to_float32(q) -> np.ndarray:
    """e4m3fn bits (uint8) -> float32, exact; 0x7F and 0xFF (the only NaNs) -> NaN."""
    q = np.asarray(q, dtype=np.uint8)
    exp = ((q >> 3) & 0xF).astype(np.int64)
    mant = (q & 7).astype(np.float64)
    mag = np.where(exp == 0, mant * 2.0 ** -9, (1.0 + mant / 8.0) * np.ldexp(1.0, exp - 7))
    mag = np.where((q & 0x7F) == E4M3_NAN, np.nan, mag)
    with np.errstate(all="ignore"):
        return np.where(q & 0x80, -mag, mag).astype(np.float32)


def e4m3_from_float32(x) -> np.ndarray:
    """float32 -> e4m3fn bits (uint8): RNE, SATFINITE (+-448 for |x| > 448 and +-Inf), NaN ->
    0x7F, the sign of zero kept."""
    x = np.asarray(x, dtype=np.float32)
    sign = ((x.view(np.uint32) >> 31) << 7).astype(np.uint8)
    with np.errstate(all="ignore"):
        a = np.abs(x.astype(np.float64))
        r = _round_nearest_even(np.where(np.isfinite(a), a, 0.0), 3, -6)
        sat = ~(r <= E4M3_MAX) | np.isinf(a)  # rounded beyond 448, or Inf
        code = _encode(np.where(sat, E4M3_MAX, r), 7, 3).astype(np.uint8) | sign
    return np.where(np.isnan(x), np.uint8(E4M3_NAN), code).astype(np.uint8)


def e8m0_to_float32(s) -> np.ndarray:
    """e8m0 scale bits (uint8) -> float32: 2^(s - 127), 0xFF -> NaN (0 -> 2^-127, subnormal)."""
    s = np.asarray(s, dtype=np.uint8)
    v = np.ldexp(np.float64(1.0), s.astype(np.int64) - 127)
    with np.errstate(all="ignore"):
        return np.where(s == E8M0_NAN, np.nan, v).astype(np.float32)


def block_scale_inv(amax) -> np.ndarray:
    """fp8_block128's scale_inv of blocks with these amax values (float32, finite, >= 0):
    amax / 448 in float32, 1.0 for a zero amax, at least 2^-126."""
    amax = np.asarray(amax, dtype=np.float32)
    s = np.maximum(amax / np.float32(E4M3_MAX), FLT_MIN)
    return np.where(amax == 0, np.float32(1.0), s).astype(np.float32)


def quantize_e4m3(x, scale_inv) -> np.ndarray:
    """The block format's element step: e4m3 of the float32 quotient x / scale_inv (one IEEE
    float32 division, broadcast), NaN elements -> 0x7F."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(all="ignore"):
        q = x / np.asarray(scale_inv, dtype=np.float32)
    return np.where(np.isnan(x), np.uint8(E4M3_NAN), e4m3_from_float32(q)).astype(np.uint8)


def _matrix(bits, fmt: str) -> np.ndarray:
    x = to_float32(bits, fmt)
    if x.ndim != 2:
        raise ValueError(f"block formats quantize 2-D tensors, got shape {x.shape}")
    return x


def _blocks(a: np.ndarray, rows: int, cols: int, fill=0) -> np.ndarray:
    """`a` [R, C] padded with `fill` to whole blocks, as [R/rows, rows, C/cols, cols]."""
    r, c = a.shape
    pr, pc = -(-r // rows) * rows, -(-c // cols) * cols
    padded = np.full((pr, pc), fill, dtype=a.dtype)
    padded[:r, :c] = a
    return padded.reshape(pr // rows, rows, pc // cols, cols)


def _expand(per_block: np.ndarray, rows: int, cols: int, shape) -> np.ndarray:
    """A per-block array repeated over its blocks' elements, cut to `shape`."""
    return np.repeat(np.repeat(per_block, rows, 0), cols, 1)[:shape[0], :shape[1]]


def quantize_fp8_block128(bits, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D tensor (bf16 / fp16 / fp32 bits) -> (e4m3 bits uint8 [R, C], scale_inv float32
    [ceil(R/128), ceil(C/128)]) by the module's fp8_block128 definition."""
    x = _matrix(bits, fmt)
    r, c = x.shape
    if x.size == 0:
        return np.zeros((r, c), np.uint8), np.ones(scale_shape((r, c), "fp8_block128"), np.float32)
    finite_abs = np.where(np.isfinite(x), np.abs(x), np.float32(0))
    amax = _blocks(finite_abs, BLOCK, BLOCK).max(axis=(1, 3))
    scale_inv = block_scale_inv(amax)
    return quantize_e4m3(x, _expand(scale_inv, BLOCK, BLOCK, x.shape)), scale_inv


def dequantize_fp8_block128(q, scale_inv) -> np.ndarray:
    """e4m3 bits [R, C] and their blocks' scale_inv -> float32 values (one float32 multiply)."""
    v = e4m3_to_float32(q)
    s = np.asarray(scale_inv, dtype=np.float32)
    if s.shape != scale_shape(v.shape, "fp8_block128"):
        raise ValueError(f"scale_inv of shape {s.shape} for a tensor of shape {v.shape}")
    with np.errstate(all="ignore"):
        return v * _expand(s, BLOCK, BLOCK, v.shape)


def quantize_mxfp8(bits, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D tensor (bf16 / fp16 / fp32 bits) -> (e4m3 bits uint8 [R, C], e8m0 scale bits uint8
    [R, ceil(C/32)]) by the module's mxfp8 definition."""
    x = _matrix(bits, fmt)
    r, c = x.shape
    if x.size == 0:
        return np.zeros((r, c), np.uint8), np.zeros(scale_shape((r, c), "mxfp8"), np.uint8)
    groups = _blocks(x, 1, MX_GROUP).reshape(r, -1, MX_GROUP)
    bad = (~np.isfinite(groups)).any(axis=2)
    amax = np.where(bad[..., None], np.float32(0), np.abs(groups)).max(axis=2)
    biased = ((amax.view(np.uint32) >> 23) & 0xFF).astype(np.int64)  # amax >= 0
    scale = np.maximum(biased - E4M3_EMAX, 0)  # X + 127, X = floor(log2 amax) - 8 >= -127
    factor = np.ldexp(np.float32(1.0), (127 - scale).astype(np.int32)).astype(np.float32)
    with np.errstate(all="ignore"):
        q = e4m3_from_float32(x * _expand(factor, 1, MX_GROUP, x.shape))
    q = np.where(_expand(bad, 1, MX_GROUP, x.shape), np.uint8(E4M3_NAN), q).astype(np.uint8)
    return q, np.where(bad, E8M0_NAN, scale).astype(np.uint8)


def dequantize_mxfp8(q, scale) -> np.ndarray:
    """e4m3 bits [R, C] and e8m0 scale bits [R, ceil(C/32)] -> float32 (exact)."""
    v = e4m3_to_float32(q)
    s = np.asarray(scale, dtype=np.uint8)
    if s.shape != scale_shape(v.shape, "mxfp8"):
        raise ValueError(f"scales of shape {s.shape} for a tensor of shape {v.shape}")
    with np.errstate(all="ignore"):
        return v * _expand(e8m0_to_float32(s), 1, MX_GROUP, v.shape)


def transform(bits, src: str, dst: str) -> tuple[np.ndarray, np.ndarray | None]:
    """What a destination in format `dst` holds for a source of plain format `src`: (data bits,
    scales or None). "keep" and src == dst copy the bits."""
    src, dst = _plain(src), format_name(dst)
    if dst == "fp8_block128":
        return quantize_fp8_block128(bits, src)
    if dst == "mxfp8":
        return quantize_mxfp8(bits, src)
    if dst == KEEP:
        return _as_bits(bits, src).copy(), None
    return cast(bits, src, dst), None


def scale_shape(shape: Sequence[int], fmt: str) -> tuple[int, ...]:
    """The scale tensor's shape for a 2-D global `shape` (() for plain formats)."""
    fmt = format_name(fmt)
    if fmt not in QUANTIZED:
        return ()
    if len(shape) != 2:
        raise ValueError(f"{fmt} needs a 2-D tensor, got shape {tuple(shape)}")
    r, c = (int(n) for n in shape)
    if fmt == "fp8_block128":
        return (-(-r // BLOCK), -(-c // BLOCK))
    return (r, -(-c // MX_GROUP))


def shard_cut(shape: Sequence[int], box: Sequence[int], fmt: str) -> str | None:
    """Why a destination shard `box` = (row0, rows, col0, cols) of a 2-D global tensor of
    `shape` cannot hold `fmt` on its own (it splits a 128 x 128 block, or a row's 32-element
    group, so its scales would depend on elements it does not hold), or None when it can. A
    shard edge is fine on a multiple of the block or on the tensor's own edge; empty shards and
    plain formats never cut."""
    fmt = format_name(fmt)
    if fmt not in QUANTIZED:
        return None
    scale_shape(shape, fmt)  # 2-D, or ValueError
    r, c = int(shape[0]), int(shape[1])
    row0, rows, col0, cols = (int(v) for v in box)
    if min(row0, rows, col0, cols) < 0 or row0 + rows > r or col0 + cols > c:
        raise ValueError(f"shard rows [{row0}, {row0 + rows}), cols [{col0}, {col0 + cols}) "
                         f"is not inside a {r} x {c} tensor")
    if rows == 0 or cols == 0:
        return None
    edges = [("col", col0, c), ("col", col0 + cols, c)]
    if fmt == "fp8_block128":
        edges = [("row", row0, r), ("row", row0 + rows, r)] + edges
        step, what = BLOCK, f"its {BLOCK} x {BLOCK} blocks"
    else:
        step, what = MX_GROUP, f"its {MX_GROUP}-element groups along the row"
    bad = [f"{kind} {at}" for kind, at, end in edges if at % step and at != end]
    if not bad:
        return None
    return (f"{fmt}: the shard rows [{row0}, {row0 + rows}), cols [{col0}, {col0 + cols}) of a "
            f"{r} x {c} tensor cuts {what}: {' and '.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not a multiple of {step} "
            f"(nor the tensor's edge)")


def _e4m3_half_ulp(v: np.ndarray) -> np.ndarray:
    """Half the e4m3 grid spacing at magnitudes `v` (float64 >= 0)."""
    _, e = np.frexp(v)
    return np.ldexp(1.0, np.maximum(np.where(v > 0, e - 1, -6), -6) - 4)


def check_dequantized(src_bits, src_fmt: str, q, scales, fmt: str) -> str | None:
    """The dequantization check against the source: None when every element of (q, scales)
    dequantizes to within half an e4m3 step of its scaled source value (plus float32 rounding of
    the division and the product: 2^-22 relative), NaN sources to NaN and saturated ones to
    exactly +-448 * scale; else a message naming the first element that does not."""
    fmt = format_name(fmt)
    with np.errstate(all="ignore"):  # signalling NaNs
        x = to_float32(src_bits, src_fmt).astype(np.float64)
    if np.shape(q) != x.shape:
        raise ValueError(f"quantized data of shape {np.shape(q)} for a source of shape {x.shape}")
    if fmt == "fp8_block128":
        deq = dequantize_fp8_block128(q, scales).astype(np.float64)
        s = _expand(np.asarray(scales, np.float64), BLOCK, BLOCK, x.shape)
        nan_out = np.isnan(x)
    elif fmt == "mxfp8":
        deq = dequantize_mxfp8(q, scales).astype(np.float64)
        s = _expand(e8m0_to_float32(scales).astype(np.float64), 1, MX_GROUP, x.shape)
        nan_out = np.isnan(s)
    else:
        raise ValueError(f"{fmt!r} is not a quantized format ({', '.join(QUANTIZED)})")
    with np.errstate(all="ignore"):
        scaled = np.abs(x) / s
        saturated = ~nan_out & ~(scaled <= E4M3_MAX + 16.0)  # beyond 448's rounding range
        # +-448 * scale as the dequantization computes it: one float32 multiply
        expect_sat = (np.copysign(E4M3_MAX, x).astype(np.float32)
                      * s.astype(np.float32)).astype(np.float64)
        err = np.abs(deq - x)
        bound = s * _e4m3_half_ulp(np.minimum(scaled, E4M3_MAX)) \
            + 2.0 ** -22 * np.maximum(np.abs(x), np.abs(deq))
        ok = np.where(nan_out, np.isnan(deq),
                      np.where(saturated, deq == expect_sat, err <= bound))
    if ok.all():
        return None
    i = tuple(int(v) for v in np.argwhere(~ok)[0])
    return (f"{fmt}: element {i} dequantizes to {deq[i]!r} from source {x[i]!r} (scale "
            f"{s[i]!r}): error {err[i]!r} above the bound {bound[i]!r}"
            if not (nan_out[i] or saturated[i]) else
            f"{fmt}: element {i} dequantizes to {deq[i]!r} from source {x[i]!r} (scale "
            f"{s[i]!r}): expected {'NaN' if nan_out[i] else repr(expect_sat[i])}")


# Per-name format rules: (regular expression searched in the canonical parameter name, format),
# the first match wins. Names are refit_engine's canonical megatron-core names (global layer
# and expert indices: refit_engine.megatron_layout, harness/models/kimi_k2.py), decoder and MTP
# layers alike. Override by putting rules in front: `((r"\.experts\.", "mxfp8"),) +
# KIMI_K2_FORMATS`.
KIMI_K2_FORMATS: tuple[tuple[str, str], ...] = (
    # The router stays in the training dtype's BF16; its expert bias is float32 in megatron-core
    # and in the serving side (vLLM's DeepSeek / Kimi e_score_correction_bias).
    (r"(^|\.)router\.expert_bias$", "fp32"),
    (r"(^|\.)router\.weight$", "bf16"),
    # Embeddings and the output layer (untied in Kimi K2).
    (r"^embedding\.", "bf16"),
    (r"(^|\.)output_layer\.weight$", "bf16"),
    # Every norm: input_layernorm, pre_mlp_layernorm, final_layernorm, MTP's enorm / hnorm,
    # q / k layernorms, and the norms TE fuses into linears (linear_*.layer_norm_weight).
    (r"norm\.(weight|bias)$", "bf16"),
    (r"\.layer_norm_(weight|bias)$", "bf16"),
    # MTP's fusion projection: a plain nn.Linear, unquantized, in vLLM's DeepSeek-family MTP
    # modules (Kimi K2 ships no MTP layers).
    (r"(^|\.)eh_proj\.weight$", "bf16"),
    # Linear biases (Kimi K2 has none): the format quantizes weights only.
    (r"\.bias$", "bf16"),
    # Every linear weight of attention and MLP: MLA's q / kv down and up projections and
    # linear_proj, dense fc1 / fc2, shared and routed experts.
    (r"(^|\.)linear_\w+\.weight$", "fp8_block128"),
)
_COMPILED: dict[tuple[tuple[str, str], ...], list[tuple[re.Pattern, str]]] = {}


def format_for(name: str, rules: Sequence[tuple[str, str]] = KIMI_K2_FORMATS) -> str:
    """The destination format of the parameter with canonical `name` by the first rule whose
    expression it matches (`re.search`); ValueError when none does, so a parameter nobody gave
    a format is refused rather than guessed."""
    key = tuple((str(p), str(f)) for p, f in rules)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = [(re.compile(p), format_name(f)) for p, f in key]
        _COMPILED[key] = compiled
    for pattern, fmt in compiled:
        if pattern.search(name):
            return fmt
    raise ValueError(f"no format rule matches parameter {name!r} "
                     f"({len(compiled)} rules; add one in front of the table)")

