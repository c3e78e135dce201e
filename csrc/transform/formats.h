// The element formats of a refit's transforms, one definition for the CPU path and the CUDA
// kernels (host and device compile these same functions): casts between float32, bfloat16 and
// float16, float8 e4m3fn with SATFINITE, and the two block scalings (128 x 128 blocks with a
// float32 scale_inv, MXFP8's 32-element groups with an e8m0 scale). refit_engine/quantize.py
// defines every bit of it (rounding, NaN, Inf, subnormals); tests compare the two bit for bit.
// Every step is one IEEE float32 operation or exact integer work: no fast-math, no FTZ.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define REFIT_HD __host__ __device__ __forceinline__
#else
#define REFIT_HD inline
#endif

namespace refit {

// Format codes of a transform's two sides (the tables' src_fmt / dst_fmt columns).
enum Format : int64_t {
    kFp32 = 0,
    kBf16 = 1,
    kFp16 = 2,
    kFp8Block128 = 3,  // e4m3fn, one float32 scale_inv per 128 x 128 block of the global tensor
    kMxfp8 = 4,        // e4m3fn, one e8m0 scale per 32 consecutive elements of a row
};

constexpr int kBlock = 128;
constexpr int kMxGroup = 32;
constexpr float kE4m3Max = 448.0f;
constexpr uint8_t kE4m3Nan = 0x7F;
constexpr uint8_t kE8m0Nan = 0xFF;

REFIT_HD float float_of(uint32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

REFIT_HD uint32_t bits_of(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

REFIT_HD bool is_nan(float x) { return (bits_of(x) & 0x7FFFFFFFu) > 0x7F800000u; }
REFIT_HD bool is_finite(float x) { return (bits_of(x) & 0x7F800000u) != 0x7F800000u; }

// Round to nearest, ties to even: rintf under the default rounding mode, on host and device.
REFIT_HD float round_even(float x) { return rintf(x); }

// float32 value of a plain element (raw bits, low bits of `raw`): exact.
REFIT_HD float widen(uint32_t raw, int64_t fmt) {
    if (fmt == kFp32) return float_of(raw);
    if (fmt == kBf16) return float_of(raw << 16);
    const uint32_t sign = (raw & 0x8000u) << 16, exp = (raw >> 10) & 0x1F, mant = raw & 0x3FF;
    if (exp == 0x1F) return float_of(sign | 0x7F800000u | (mant << 13));  // Inf, NaN
    if (exp == 0) {  // zero and subnormals: mant * 2^-24, exact in float32
        const float v = float(mant) * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return float_of(sign | ((exp + 112) << 23) | (mant << 13));
}

// float32 -> float32 / bfloat16 / float16 bits: IEEE RNE, overflow to Inf, canonical positive
// NaN (also when widening: every cast between two formats canonicalizes NaN).
REFIT_HD uint32_t narrow(float x, int64_t fmt) {
    const uint32_t b = bits_of(x);
    if (is_nan(x)) return fmt == kFp32 ? 0x7FC00000u : (fmt == kBf16 ? 0x7FC0u : 0x7E00u);
    if (fmt == kFp32) return b;
    if (fmt == kBf16) return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;  // carries into Inf
    const uint32_t sign = (b >> 16) & 0x8000u;
    const float a = fabsf(x);
    if (a >= 65520.0f) return sign | 0x7C00u;  // rounds past 65504 (Inf too)
    if (a < 6.103515625e-05f) {                // below 2^-14: the subnormal grid, k * 2^-24
        return sign | uint32_t(round_even(a * 16777216.0f));  // k = 1024 is 2^-14 itself
    }
    const uint32_t m = bits_of(a);
    const uint32_t r = (m + 0xFFFu + ((m >> 13) & 1u)) & ~0x1FFFu;
    return sign | ((((r >> 23) - 112) << 10) | ((r >> 13) & 0x3FFu));
}

// float32 -> e4m3fn bits: RNE on e4m3's grid, SATFINITE (|x| > 448 and Inf -> +-448), NaN ->
// 0x7F, the sign of zero kept.
REFIT_HD uint8_t e4m3(float x) {
    if (is_nan(x)) return kE4m3Nan;
    const uint8_t sign = uint8_t((bits_of(x) >> 24) & 0x80u);
    const float a = fabsf(x);
    if (a >= kE4m3Max) return sign | 0x7E;
    if (a < 0.015625f) {  // below 2^-6: subnormals k * 2^-9 (k = 8 is 2^-6, code 0x08)
        return sign | uint8_t(round_even(a * 512.0f));
    }
    const uint32_t m = bits_of(a);
    const uint32_t r = (m + 0x7FFFFu + ((m >> 20) & 1u)) & ~0xFFFFFu;
    return sign | uint8_t((((r >> 23) - 120) << 3) | ((r >> 20) & 7u));
}

// fp8_block128's scale_inv of a block whose finite elements' largest magnitude is `amax`.
REFIT_HD float block_scale_inv(float amax) {
    return amax == 0.0f ? 1.0f : fmaxf(amax / kE4m3Max, 1.17549435e-38f);
}

REFIT_HD uint8_t block_element(float x, float scale_inv) {
    return is_nan(x) ? kE4m3Nan : e4m3(x / scale_inv);
}

// MXFP8's e8m0 scale bits of a group with no NaN or Inf whose largest magnitude is `amax`.
REFIT_HD uint32_t mx_scale(float amax) {
    const int biased = int((bits_of(amax) >> 23) & 0xFF);
    return uint32_t(biased - 8 > 0 ? biased - 8 : 0);
}

// 2^(127 - scale): the exact factor that brings a group into e4m3's range.
REFIT_HD float mx_factor(uint32_t scale) { return float_of((254u - scale) << 23); }

#if defined(__CUDACC__)
// Device-only fast forms of the definitions above, each equal to them bit for bit on the inputs
// it states (tests/test_transform_kernels.py checks the kernels against quantize.py).

// e4m3(lo) | e4m3(hi) << 8 for two inputs that are not NaN (finite or +-Inf). On sm_89+ one
// cvt.rn.satfinite.e4m3x2.f32: round to nearest even on e4m3's grid (subnormals included),
// SATFINITE (|x| > 448 and +-Inf -> +-448), the sign of zero kept: e4m3() above. NaN is the
// caller's: it selects kE4m3Nan itself, so no result depends on the cvt's NaN encoding.
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    uint16_t r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));  // 1st -> bits 15:8
    return r;
#else
    return uint32_t(e4m3(lo)) | (uint32_t(e4m3(hi)) << 8);
#endif
}

// kBlockFastScale: the smallest scale_inv for which block_quotient() is exact.
constexpr float kBlockFastScale = 0x1p-92f;

// RN(x / s) (the IEEE division of block_element) for a finite x, a scale_inv s of the block x
// belongs to (so |x| <= amax and |x / s| <= 448 * (1 + 2^-23)) with s >= 2^-92, and y =
// __frcp_rn(s), the correctly rounded 1 / s, computed once per block. Why it is exact:
// - q0 = RN(x * y) is within 1.5 ulp of Q = x / s (y's error is below 2^-24 relative).
// - One correction q1 = RN(q0 - RN(q0 * s - x) * y) lands within 2^-21 ulp of Q before its
//   rounding (for Q >= 2^-11; a subnormal RN(q0 * s - x) adds at most 2^-58 absolute), so q1
//   is faithful (one of the two floats around Q).
// - Markstein's theorem (y within half an ulp of 1 / s, q1 faithful): r1 = q1 * s - x is then
//   exact and q2 = RN(q1 - r1 * y) = RN(Q). r1 is exact, i.e. representable, when x, q1 and s
//   leave it on the float32 grid: r1 is a multiple of 2^(E(q) + E(s) - 46) below 2^24 of
//   those, so it needs E(q) + E(s) >= -103, true for every Q >= 2^-11 once s >= 2^-92.
// - Quotients below 2^-11 (where r may be rounded) stay below 2^-10 within the error bounds
//   (at most 2^-57 absolute from a rounded r, y <= 2^92), and every such value is +-0 in
//   e4m3 (2^-10 itself is the tie between 0 and 2^-9: even, 0); their sign is set from x, so
//   the sign of zero is RN(x / s)'s whatever the rounding of tiny residues did.
// (One correction alone matched RN(x / s) on 4e8 random float32 pairs, but q0 is not always
// faithful, so the theorem does not cover it: two corrections, four FMAs.) Overflow cannot
// happen: |q| <= 448 * (1 + 2^-23), and the FMAs' products are not rounded. Non-finite x must
// not come here (Inf * y - Inf is NaN).
__device__ __forceinline__ float block_quotient(float x, float s, float y) {
    const float q0 = __fmul_rn(x, y);
    const float q1 = __fmaf_rn(-__fmaf_rn(q0, s, -x), y, q0);
    const float q2 = __fmaf_rn(-__fmaf_rn(q1, s, -x), y, q1);
    uint32_t r;  // q2's magnitude, x's sign: one lop3 ((a & ~c) | (b & c))
    asm("lop3.b32 %0, %1, %2, %3, 0xD8;" : "=r"(r) : "r"(bits_of(q2)), "r"(bits_of(x)), "r"(0x80000000u));
    return float_of(r);
}
#endif

REFIT_HD int element_bytes(int64_t fmt) { return fmt == kFp32 ? 4 : (fmt <= kFp16 ? 2 : 1); }

REFIT_HD uint32_t load_raw(const uint8_t* p, int64_t fmt) {
    if (fmt == kFp32) {
        uint32_t v;
        memcpy(&v, p, 4);
        return v;
    }
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

REFIT_HD void store_raw(uint8_t* p, uint32_t v, int64_t fmt) {
    if (fmt == kFp32) {
        memcpy(p, &v, 4);
    } else if (fmt == kBf16 || fmt == kFp16) {
        const uint16_t h = uint16_t(v);
        memcpy(p, &h, 2);
    } else {
        *p = uint8_t(v);
    }
}

}  // namespace refit
