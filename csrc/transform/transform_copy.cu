#include "transform/transform_copy.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "common/check.h"
#include "transform/formats.h"

namespace refit {

namespace {

// One 256-thread block per 128 x 128 tile. Each lane reads 16 bytes of a row per access (8
// elements of a 16-bit source, 4 of float32), so a row is 16 or 32 lanes and one access of the
// block covers 16 or 8 rows; a lane holds its whole share of the tile in registers (8 or 16
// accesses, all issued before any is used), and the amax, the scale and the quantization work
// from those registers: global memory is read once. An MXFP8 group (32 columns) is 4 or 8
// neighbouring lanes of one row.
//
// Alignment: the 16-byte loads need the source address and pitch to be multiples of 16, the
// vector stores the destination's to be multiples of min(16, bytes a lane writes per row);
// otherwise (and for the lanes at a rectangle's right edge) elements move one by one.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xFFFFFFFFu;

enum Column { kSrc, kDst, kSrcPitch, kDstPitch, kRows, kCols, kSrcFmt, kDstFmt, kScale, kScalePitch };

__host__ __device__ constexpr int bytes_of(int64_t f) { return f == kFp32 ? 4 : (f == kBf16 || f == kFp16 ? 2 : 1); }

// Magnitude bits from which an element of a plain format is Inf or NaN.
__host__ __device__ constexpr uint32_t nonfinite_from(int64_t f) {
    return f == kFp32 ? 0x7F800000u : (f == kBf16 ? 0x7F80u : 0x7C00u);
}

template <int64_t S, int64_t D>
struct Shape {
    static constexpr int kElems = 16 / bytes_of(S);                     // per lane per row
    static constexpr int kLanesPerRow = kBlock / kElems;                // 16 or 32
    static constexpr int kRowsPerWarp = 32 / kLanesPerRow;              // 2 or 1
    static constexpr int kRowsPerStep = kWarps * kRowsPerWarp;          // 16 or 8
    static constexpr int kSteps = kBlock / kRowsPerStep;                // 8 or 16
    static constexpr int kOutBytes = kElems * bytes_of(D);              // 4 .. 32
    static constexpr int kOutWords = kOutBytes / 4;
};

// 16 bytes of one row: elements 2j, 2j + 1 of a 16-bit format are the halves of w[j].
struct Lane {
    uint32_t w[4];
};

template <int64_t S>
__device__ __forceinline__ uint32_t raw_at(const Lane& l, int e) {
    if constexpr (S == kFp32) {
        return l.w[e];
    } else {
        return e % 2 ? l.w[e / 2] >> 16 : l.w[e / 2] & 0xFFFFu;
    }
}

// widen(): exact. fp16 by the hardware conversion (exact too; only a NaN's payload may differ,
// and no caller reads one: NaN outputs are selected by is_nan).
template <int64_t S>
__device__ __forceinline__ float value_at(const Lane& l, int e) {
    if constexpr (S == kFp32) {
        return float_of(l.w[e]);
    } else if constexpr (S == kBf16) {
        return float_of(e % 2 ? l.w[e / 2] & 0xFFFF0000u : l.w[e / 2] << 16);
    } else {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(uint16_t(raw_at<S>(l, e))));
        return f;
    }
}

// Largest magnitude bits of the lane's elements (zero-filled past the rectangle), Inf and NaN
// included: those sort above every finite magnitude. 16-bit formats two at a time.
template <int64_t S>
__device__ __forceinline__ uint32_t packed_max(uint32_t m, const Lane& l) {
    if constexpr (S == kFp32) {
        return max(max(m, max(l.w[0] & 0x7FFFFFFFu, l.w[1] & 0x7FFFFFFFu)),
                   max(l.w[2] & 0x7FFFFFFFu, l.w[3] & 0x7FFFFFFFu));
    } else {
        m = __vimax3_u16x2(m, l.w[0] & 0x7FFF7FFFu, l.w[1] & 0x7FFF7FFFu);
        return __vimax3_u16x2(m, l.w[2] & 0x7FFF7FFFu, l.w[3] & 0x7FFF7FFFu);
    }
}

template <int64_t S>
__device__ __forceinline__ uint32_t unpack_max(uint32_t m) {
    if constexpr (S == kFp32) {
        return m;
    } else {
        return max(m & 0xFFFFu, m >> 16);
    }
}

// The same over finite elements only (the rare tiles that hold Inf or NaN).
template <int64_t S>
__device__ __forceinline__ uint32_t finite_max(uint32_t m, const Lane& l) {
    constexpr int kElems = 16 / bytes_of(S);
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
        const uint32_t a = raw_at<S>(l, e) & (S == kFp32 ? 0x7FFFFFFFu : 0x7FFFu);
        if (a < nonfinite_from(S)) m = max(m, a);
    }
    return m;
}

// `n` elements of a row at `p` (n <= elements per lane; the rest zero).
template <int64_t S>
__device__ __forceinline__ Lane load_lane(const uint8_t* p, int n, bool vec) {
    constexpr int kElems = 16 / bytes_of(S);
    Lane l;
    if (vec && n == kElems) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        l.w[0] = v.x, l.w[1] = v.y, l.w[2] = v.z, l.w[3] = v.w;
        return l;
    }
    l.w[0] = l.w[1] = l.w[2] = l.w[3] = 0;
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
        if (e >= n) break;
        if constexpr (S == kFp32) {
            l.w[e] = reinterpret_cast<const uint32_t*>(p)[e];
        } else {
            l.w[e / 2] |= uint32_t(reinterpret_cast<const uint16_t*>(p)[e]) << (16 * (e % 2));
        }
    }
    return l;
}

// The first `n` of kBytes little-endian bytes of `o` to `p`.
template <int kBytes>
__device__ __forceinline__ void store_lane(uint8_t* p, const uint32_t* o, int n, bool vec) {
    if (vec && n == kBytes) {
        if constexpr (kBytes == 4) {
            *reinterpret_cast<uint32_t*>(p) = o[0];
        } else if constexpr (kBytes == 8) {
            *reinterpret_cast<uint2*>(p) = make_uint2(o[0], o[1]);
        } else {
#pragma unroll
            for (int i = 0; i < kBytes / 16; ++i) {
                reinterpret_cast<uint4*>(p)[i] = make_uint4(o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]);
            }
        }
        return;
    }
#pragma unroll
    for (int b = 0; b < kBytes; ++b) {
        if (b >= n) break;
        p[b] = uint8_t(o[b / 4] >> (8 * (b % 4)));
    }
}

struct Tile {
    const uint8_t* src;
    uint8_t* dst;
    int64_t sp, dp, rows, cols, r0, c0;
    uint8_t* scale;
    int64_t scale_pitch;
};

// The largest `v` of the block (every thread calls it; `partial` holds kWarps words).
__device__ __forceinline__ uint32_t block_max(uint32_t v, uint32_t* partial) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v = max(v, __shfl_xor_sync(kFull, v, o));
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    uint32_t b = partial[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) b = max(b, partial[w]);
    return b;
}

// One tile from format S into format D (both known at compile time: no per-element branch).
// `partial`: 2 x kWarps words of shared memory, free on entry, still read on return.
template <int64_t S, int64_t D>
__device__ __forceinline__ void transform_tile(const Tile& t, uint32_t (*partial)[kWarps]) {
    using G = Shape<S, D>;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t c = t.c0 + int64_t(lane % G::kLanesPerRow) * G::kElems;
    const int n = c >= t.cols ? 0 : int(t.cols - c < G::kElems ? t.cols - c : G::kElems);
    const int first = warp * G::kRowsPerWarp + lane / G::kLanesPerRow;  // of the tile's rows
    const int64_t row0 = t.r0 + first;
    // Rows of this tile inside the rectangle, less `first` (<= 128, may be <= 0).
    const int rows_left = int((t.rows - t.r0 < kBlock ? t.rows - t.r0 : kBlock)) - first;
    const bool in_vec = ((reinterpret_cast<uintptr_t>(t.src) | uint64_t(t.sp)) % 16) == 0;
    constexpr int kOutAlign = G::kOutBytes < 16 ? G::kOutBytes : 16;
    const bool out_vec = ((reinterpret_cast<uintptr_t>(t.dst) | uint64_t(t.dp)) % kOutAlign) == 0;
    const uint8_t* src = t.src + row0 * t.sp + c * bytes_of(S);
    uint8_t* dst = t.dst + row0 * t.dp + c * bytes_of(D);
    // Device memory: plain global loads and stores instead of generic ones.
    if (!__isGlobal(t.src) || !__isGlobal(t.dst)) __builtin_unreachable();
    const int64_t src_step = G::kRowsPerStep * t.sp, dst_step = G::kRowsPerStep * t.dp;

    Lane x[G::kSteps];
#pragma unroll
    for (int k = 0; k < G::kSteps; ++k) {
        x[k] = load_lane<S>(src + k * src_step, G::kRowsPerStep * k < rows_left ? n : 0, in_vec);
    }
    auto row_inside = [&](int k) { return n > 0 && G::kRowsPerStep * k < rows_left; };

    if constexpr (D == kFp8Block128) {
        uint32_t m = 0;
#pragma unroll
        for (int k = 0; k < G::kSteps; ++k) m = packed_max<S>(m, x[k]);
        uint32_t amax_bits = block_max(unpack_max<S>(m), partial[0]);
        const bool special = amax_bits >= nonfinite_from(S);  // the tile holds Inf or NaN
        if (special) {  // block-uniform: the amax of the finite elements, a second reduction
            m = 0;
#pragma unroll
            for (int k = 0; k < G::kSteps; ++k) m = finite_max<S>(m, x[k]);
            amax_bits = block_max(m, partial[1]);
        }
        const float s = block_scale_inv(widen(amax_bits, S));
        if (threadIdx.x == 0) {
            memcpy(t.scale + (t.r0 / kBlock) * t.scale_pitch + (t.c0 / kBlock) * 4, &s, 4);
        }
        if (!special && s >= kBlockFastScale) {  // every element finite: the fast quotient
            const float y = __frcp_rn(s);
#pragma unroll
            for (int k = 0; k < G::kSteps; ++k) {
                uint32_t o[G::kOutWords] = {};
#pragma unroll
                for (int e = 0; e < G::kElems; e += 2) {
                    const uint32_t h = e4m3x2(block_quotient(value_at<S>(x[k], e), s, y),
                                              block_quotient(value_at<S>(x[k], e + 1), s, y));
                    o[e / 4] |= h << (8 * (e % 4));
                }
                if (row_inside(k)) store_lane<G::kOutBytes>(dst + k * dst_step, o, n, out_vec);
            }
        } else {  // the definition itself: IEEE division, NaN -> 0x7F, Inf saturates
#pragma unroll
            for (int k = 0; k < G::kSteps; ++k) {
                uint32_t o[G::kOutWords] = {};
#pragma unroll
                for (int e = 0; e < G::kElems; ++e) {
                    o[e / 4] |= uint32_t(block_element(value_at<S>(x[k], e), s)) << (8 * (e % 4));
                }
                if (row_inside(k)) store_lane<G::kOutBytes>(dst + k * dst_step, o, n, out_vec);
            }
        }
    } else if constexpr (D == kMxfp8) {
        // Group g of a row is kGroupLanes neighbouring lanes: reduced among those (warp-wide
        // shuffles, every lane takes part; lanes past the rectangle hold zeros).
        constexpr int kGroupLanes = kMxGroup / G::kElems;  // 4 or 8
#pragma unroll
        for (int k = 0; k < G::kSteps; ++k) {
            uint32_t m = unpack_max<S>(packed_max<S>(0, x[k]));
#pragma unroll
            for (int o = 1; o < kGroupLanes; o *= 2) m = max(m, __shfl_xor_sync(kFull, m, o));
            const bool bad = m >= nonfinite_from(S);  // a NaN or Inf in the group
            const uint32_t sbits = bad ? kE8m0Nan : mx_scale(widen(m, S));
            if (!row_inside(k)) continue;
            const int64_t r = row0 + G::kRowsPerStep * k;
            if (lane % kGroupLanes == 0) t.scale[r * t.scale_pitch + c / kMxGroup] = uint8_t(sbits);
            uint32_t o[G::kOutWords];
            if (bad) {
#pragma unroll
                for (int i = 0; i < G::kOutWords; ++i) o[i] = 0x7F7F7F7Fu;
            } else {
                const float f = mx_factor(sbits);  // x * f is exact (or below 2^-126: +-0 in e4m3)
#pragma unroll
                for (int i = 0; i < G::kOutWords; ++i) o[i] = 0;
#pragma unroll
                for (int e = 0; e < G::kElems; e += 2) {
                    const uint32_t h = e4m3x2(value_at<S>(x[k], e) * f, value_at<S>(x[k], e + 1) * f);
                    o[e / 4] |= h << (8 * (e % 4));
                }
            }
            store_lane<G::kOutBytes>(dst + k * dst_step, o, n, out_vec);
        }
    } else {
        constexpr int kOut = bytes_of(D);
#pragma unroll
        for (int k = 0; k < G::kSteps; ++k) {
            if (!row_inside(k)) continue;
            uint32_t o[G::kOutWords] = {};
            if constexpr (S == D) {  // a copy: bits unchanged
#pragma unroll
                for (int i = 0; i < 4; ++i) o[i] = x[k].w[i];
            } else {
#pragma unroll
                for (int e = 0; e < G::kElems; ++e) {
                    const uint32_t v = narrow(value_at<S>(x[k], e), D);
                    if constexpr (kOut == 4) {
                        o[e] = v;
                    } else {
                        o[e / 2] |= v << (16 * (e % 2));
                    }
                }
            }
            store_lane<G::kOutBytes>(dst + k * dst_step, o, n * kOut, out_vec);
        }
    }
}

// The row holding `tile`: the last i < count with tile_first[i] <= tile (tile_first[0] is 0;
// rows without tiles repeat their successor's entry). A 32-way search by each warp on its own,
// one ballot per round: two rounds up to 1024 rows.
__device__ __forceinline__ int64_t find_row(const DeviceTransforms& t, int64_t tile) {
    const int lane = threadIdx.x % 32;
    int64_t lo = 0, n = t.count;  // the answer is in [lo, lo + n)
    while (n > 1) {
        const int64_t step = (n + 31) / 32;
        const bool ok = lane * step < n && t.tile_first[lo + lane * step] <= tile;
        const int k = 31 - __clz(__ballot_sync(kFull, ok));  // lane 0 is always ok
        lo += k * step;
        n = min(step, n - k * step);
    }
    return lo;
}

template <int64_t S>
__host__ __device__ constexpr int min_blocks() {  // a 16-bit source's tile is 32 registers a thread, float32's 64
    return S == kFp32 ? 2 : 4;
}

// A "jagged grid" as the segment copy's: block b takes tile b of the concatenated rows.
template <int64_t S, int64_t D>
__global__ void __launch_bounds__(kThreads, min_blocks<S>()) transform_kernel(DeviceTransforms t) {
    if (t.skip && *reinterpret_cast<const volatile int64_t*>(t.skip) != 0) return;
    __shared__ uint32_t partial[2][kWarps];
    for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {
        const int64_t i = find_row(t, tile);
        const int64_t cols = t.col[kCols][i];
        const int64_t tiles_across = (cols + kBlock - 1) / kBlock;
        const int64_t local = tile - t.tile_first[i];
        const Tile x{reinterpret_cast<const uint8_t*>(t.col[kSrc][i]),
                     reinterpret_cast<uint8_t*>(t.col[kDst][i]),
                     t.col[kSrcPitch][i], t.col[kDstPitch][i], t.col[kRows][i], cols,
                     (local / tiles_across) * kBlock, (local % tiles_across) * kBlock,
                     reinterpret_cast<uint8_t*>(t.col[kScale][i]), t.col[kScalePitch][i]};
        transform_tile<S, D>(x, partial);
        if (tile + gridDim.x < t.tiles) __syncthreads();  // NOTE: `partial` is reused
    }
}

using Kernel = void (*)(DeviceTransforms);

template <int64_t S>
Kernel kernel_to(int64_t d) {
    switch (d) {
        case kFp32: return transform_kernel<S, kFp32>;
        case kBf16: return transform_kernel<S, kBf16>;
        case kFp16: return transform_kernel<S, kFp16>;
        case kFp8Block128: return transform_kernel<S, kFp8Block128>;
        default: return transform_kernel<S, kMxfp8>;
    }
}

Kernel kernel_for(int64_t s, int64_t d) {
    switch (s) {
        case kFp32: return kernel_to<kFp32>(d);
        case kBf16: return kernel_to<kBf16>(d);
        default: return kernel_to<kFp16>(d);
    }
}

}  // namespace

TransformTable::TransformTable(const HostTransforms& t) {
    t.check();
    const int64_t n = int64_t(t.size());
    // Rows grouped by format pair (stable: the table's order within a pair), one launch each.
    std::vector<int64_t> order(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return std::make_pair(t.src_fmt[a], t.dst_fmt[a]) < std::make_pair(t.src_fmt[b], t.dst_fmt[b]);
    });
    struct Range {
        int64_t first, count;
    };
    std::vector<Range> ranges;
    for (int64_t k = 0; k < n; ++k) {
        const int64_t i = order[k];
        if (k == 0 || t.src_fmt[i] != t.src_fmt[order[k - 1]] || t.dst_fmt[i] != t.dst_fmt[order[k - 1]]) {
            ranges.push_back({k, 0});
        }
        ++ranges.back().count;
    }
    // Layout: the 10 columns of all rows (grouped order), then each group's count + 1 tile
    // prefix sums.
    const int64_t groups = int64_t(ranges.size());
    std::vector<int64_t> host(11 * n + groups);
    const std::vector<int64_t>* cols[10] = {&t.src,  &t.dst,     &t.src_pitch, &t.dst_pitch,
                                            &t.rows, &t.cols,    &t.src_fmt,   &t.dst_fmt,
                                            &t.scale, &t.scale_pitch};
    for (int c = 0; c < 10; ++c) {
        for (int64_t k = 0; k < n; ++k) host[c * n + k] = (*cols[c])[order[k]];
    }
    std::vector<int64_t> group_tiles(groups);
    for (int64_t g = 0; g < groups; ++g) {
        int64_t* first = host.data() + 10 * n + ranges[g].first + g;
        int64_t tiles = 0;
        for (int64_t k = 0; k < ranges[g].count; ++k) {
            const int64_t i = order[ranges[g].first + k];
            first[k] = tiles;
            tiles += ((t.rows[i] + kBlock - 1) / kBlock) * ((t.cols[i] + kBlock - 1) / kBlock);
        }
        first[ranges[g].count] = tiles;
        group_tiles[g] = tiles;
    }
    if (!host.empty()) {
        void* dev = nullptr;
        REFIT_CUDA_CHECK(cudaMalloc(&dev, host.size() * sizeof(int64_t)));
        memory_.reset(static_cast<int64_t*>(dev));
        REFIT_CUDA_CHECK(cudaMemcpy(dev, host.data(), host.size() * sizeof(int64_t),
                                    cudaMemcpyHostToDevice));
    }
    const int64_t* base = memory_.get();
    for (int64_t g = 0; g < groups; ++g) {
        const int64_t i = order[ranges[g].first];
        Group group{t.src_fmt[i], t.dst_fmt[i], {}};
        for (int c = 0; c < 10; ++c) group.table.col[c] = base + c * n + ranges[g].first;
        group.table.tile_first = base + 10 * n + ranges[g].first + g;
        group.table.count = ranges[g].count;
        group.table.tiles = group_tiles[g];
        tiles_ += group_tiles[g];
        if (group.table.tiles > 0) groups_.push_back(group);
    }
}

void TransformTable::launch(cudaStream_t stream) const {
    const int64_t max_blocks = int64_t(1) << 20;
    for (const Group& g : groups_) {
        const unsigned blocks = unsigned(g.table.tiles < max_blocks ? g.table.tiles : max_blocks);
        kernel_for(g.src_fmt, g.dst_fmt)<<<blocks, kThreads, 0, stream>>>(g.table);
        REFIT_CUDA_CHECK(cudaGetLastError());
    }
}

}  // namespace refit
