#include "transform/transform_table.h"

#include <stdexcept>
#include <string>

#include "transform/formats.h"

namespace refit {

namespace {

bool plain(int64_t f) { return f == kFp32 || f == kBf16 || f == kFp16; }

}  // namespace

void HostTransforms::check() const {
    const size_t n = size();
    for (const auto* c : {&dst, &src_pitch, &dst_pitch, &rows, &cols, &src_fmt, &dst_fmt, &scale,
                          &scale_pitch}) {
        if (c->size() != n) throw std::invalid_argument("transform columns differ in length");
    }
    for (size_t i = 0; i < n; ++i) {
        const std::string row = "transform row " + std::to_string(i) + ": ";
        if (!plain(src_fmt[i])) throw std::invalid_argument(row + "the source must be fp32, bf16 or fp16");
        if (dst_fmt[i] < kFp32 || dst_fmt[i] > kMxfp8) throw std::invalid_argument(row + "unknown destination format");
        if (rows[i] < 0 || cols[i] < 0) throw std::invalid_argument(row + "negative size");
        if (!plain(dst_fmt[i]) && rows[i] * cols[i] > 0 && scale[i] == 0) {
            throw std::invalid_argument(row + "a quantized destination needs its scales");
        }
    }
}

void transform_cpu(const HostTransforms& t) {
    t.check();
    for (size_t i = 0; i < t.size(); ++i) {
        const auto* src = reinterpret_cast<const uint8_t*>(t.src[i]);
        auto* dst = reinterpret_cast<uint8_t*>(t.dst[i]);
        const int64_t rows = t.rows[i], cols = t.cols[i], sp = t.src_pitch[i], dp = t.dst_pitch[i];
        const int64_t sf = t.src_fmt[i], df = t.dst_fmt[i];
        const int sb = element_bytes(sf), db = element_bytes(df);
        auto x = [&](int64_t r, int64_t c) { return widen(load_raw(src + r * sp + c * sb, sf), sf); };
        if (df == sf) {  // a copy: bits unchanged (NaN payloads too)
            for (int64_t r = 0; r < rows; ++r) {
                for (int64_t c = 0; c < cols; ++c) {
                    store_raw(dst + r * dp + c * db, load_raw(src + r * sp + c * sb, sf), df);
                }
            }
        } else if (df == kFp32 || df == kBf16 || df == kFp16) {
            for (int64_t r = 0; r < rows; ++r) {
                for (int64_t c = 0; c < cols; ++c) store_raw(dst + r * dp + c * db, narrow(x(r, c), df), df);
            }
        } else if (df == kFp8Block128) {
            auto* scale = reinterpret_cast<uint8_t*>(t.scale[i]);
            for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
                for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
                    const int64_t r1 = r0 + kBlock < rows ? r0 + kBlock : rows;
                    const int64_t c1 = c0 + kBlock < cols ? c0 + kBlock : cols;
                    float amax = 0.0f;
                    for (int64_t r = r0; r < r1; ++r) {
                        for (int64_t c = c0; c < c1; ++c) {
                            const float v = x(r, c);
                            if (is_finite(v)) amax = fmaxf(amax, fabsf(v));
                        }
                    }
                    const float s = block_scale_inv(amax);
                    memcpy(scale + (r0 / kBlock) * t.scale_pitch[i] + (c0 / kBlock) * 4, &s, 4);
                    for (int64_t r = r0; r < r1; ++r) {
                        for (int64_t c = c0; c < c1; ++c) dst[r * dp + c] = block_element(x(r, c), s);
                    }
                }
            }
        } else {  // kMxfp8
            auto* scale = reinterpret_cast<uint8_t*>(t.scale[i]);
            for (int64_t r = 0; r < rows; ++r) {
                for (int64_t c0 = 0; c0 < cols; c0 += kMxGroup) {
                    const int64_t c1 = c0 + kMxGroup < cols ? c0 + kMxGroup : cols;
                    float amax = 0.0f;
                    bool bad = false;
                    for (int64_t c = c0; c < c1; ++c) {
                        const float v = x(r, c);
                        bad |= !is_finite(v);
                        amax = fmaxf(amax, fabsf(v));
                    }
                    const uint32_t sbits = bad ? kE8m0Nan : mx_scale(amax);
                    scale[r * t.scale_pitch[i] + c0 / kMxGroup] = uint8_t(sbits);
                    const float f = bad ? 0.0f : mx_factor(sbits);
                    for (int64_t c = c0; c < c1; ++c) dst[r * dp + c] = bad ? kE4m3Nan : e4m3(x(r, c) * f);
                }
            }
        }
    }
}

}  // namespace refit
