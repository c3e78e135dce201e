#include "transform/transform_copy.h"

#include <stdexcept>
#include <vector>

#include "common/check.h"
#include "transform/formats.h"

namespace refit {

namespace {

// A tile is 128 x 128 elements; 8 warps, warp w takes rows w, w + 8, ...; lane l takes the 4
// consecutive columns 4l .. 4l + 3 of each of its rows, so a row is one warp-wide access
// (vector loads and stores where the row allows: 8 or 16 bytes in, 4 or 8 bytes out). An
// MXFP8 group (32 columns) is then 8 neighbouring lanes.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kBlock / kWarps;  // 16
constexpr int kLane = 4;                       // consecutive columns per lane

enum Column { kSrc, kDst, kSrcPitch, kDstPitch, kRows, kCols, kSrcFmt, kDstFmt, kScale, kScalePitch };

template <int64_t Fmt>
struct Element {  // the raw element type of a plain format
    using type = uint16_t;
};
template <>
struct Element<kFp32> {
    using type = uint32_t;
};

template <typename T>
struct Vec4 {  // four elements in one access
    T v[kLane];
};

// Four consecutive elements at `p` (of which `n` <= 4 are inside the rectangle; the rest 0).
template <typename T>
__device__ __forceinline__ Vec4<T> load4(const uint8_t* p, int n, bool aligned) {
    Vec4<T> out;
    if (n == kLane && aligned) {
        if constexpr (sizeof(T) == 2) {
            const uint2 w = *reinterpret_cast<const uint2*>(p);
            memcpy(&out, &w, sizeof(w));
        } else {
            const uint4 w = *reinterpret_cast<const uint4*>(p);
            memcpy(&out, &w, sizeof(w));
        }
        return out;
    }
#pragma unroll
    for (int e = 0; e < kLane; ++e) out.v[e] = e < n ? reinterpret_cast<const T*>(p)[e] : T(0);
    return out;
}

template <typename T>
__device__ __forceinline__ void store4(uint8_t* p, const Vec4<T>& x, int n, bool aligned) {
    if (n == kLane && aligned) {
        if constexpr (sizeof(T) == 1) {
            uint32_t w;
            memcpy(&w, &x, 4);
            *reinterpret_cast<uint32_t*>(p) = w;
        } else if constexpr (sizeof(T) == 2) {
            uint2 w;
            memcpy(&w, &x, 8);
            *reinterpret_cast<uint2*>(p) = w;
        } else {
            uint4 w;
            memcpy(&w, &x, 16);
            *reinterpret_cast<uint4*>(p) = w;
        }
        return;
    }
#pragma unroll
    for (int e = 0; e < kLane; ++e) {
        if (e < n) reinterpret_cast<T*>(p)[e] = x.v[e];
    }
}

struct Tile {
    const uint8_t* src;
    uint8_t* dst;
    int64_t sp, dp, rows, cols, r0, c0;
    uint8_t* scale;
    int64_t scale_pitch;
};

template <int Xor>
__device__ __forceinline__ float lanes_max(float v) {
    for (int o = 1; o < Xor; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

// One tile from format S into format D (both known at compile time: no per-element branch).
template <int64_t S, int64_t D>
__device__ void transform_tile(const Tile& t, float* partial) {
    using In = typename Element<S>::type;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t c = t.c0 + kLane * lane;
    const int n = c >= t.cols ? 0 : int(t.cols - c < kLane ? t.cols - c : kLane);
    const bool in_aligned = ((reinterpret_cast<uintptr_t>(t.src) | uint64_t(t.sp)) % (kLane * sizeof(In))) == 0;
    constexpr int kOut = D == kFp32 ? 4 : (D == kBf16 || D == kFp16 ? 2 : 1);
    const bool out_aligned = ((reinterpret_cast<uintptr_t>(t.dst) | uint64_t(t.dp)) % (kLane * kOut)) == 0;

    Vec4<In> raw[kRowsPerWarp];
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
        const int64_t r = t.r0 + warp + kWarps * k;
        const int m = r < t.rows ? n : 0;
        raw[k] = load4<In>(t.src + r * t.sp + c * sizeof(In), m, in_aligned);
        if constexpr (D == kFp8Block128) {
#pragma unroll
            for (int e = 0; e < kLane; ++e) {
                const float v = widen(raw[k].v[e], S);
                if (e < m && is_finite(v)) amax = fmaxf(amax, fabsf(v));
            }
        }
    }

    if constexpr (D == kFp8Block128) {
        amax = lanes_max<32>(amax);
        if (lane == 0) partial[warp] = amax;
        __syncthreads();
        float block = 0.0f;
        for (int w = 0; w < kWarps; ++w) block = fmaxf(block, partial[w]);
        __syncthreads();  // `partial` is reused by the next tile
        const float s = block_scale_inv(block);
        if (threadIdx.x == 0) {
            memcpy(t.scale + (t.r0 / kBlock) * t.scale_pitch + (t.c0 / kBlock) * 4, &s, 4);
        }
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) {
            const int64_t r = t.r0 + warp + kWarps * k;
            if (r >= t.rows || n == 0) continue;
            Vec4<uint8_t> q;
#pragma unroll
            for (int e = 0; e < kLane; ++e) q.v[e] = block_element(widen(raw[k].v[e], S), s);
            store4<uint8_t>(t.dst + r * t.dp + c, q, n, out_aligned);
        }
    } else if constexpr (D == kMxfp8) {
        // Group g of a row is lanes 8g .. 8g + 7: reduced among those 8 (warp-wide shuffles,
        // every lane takes part; lanes past the rectangle contribute nothing).
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) {
            const int64_t r = t.r0 + warp + kWarps * k;
            if (r >= t.rows) continue;  // the same for the whole warp
            float group = 0.0f;
            bool bad = false;
#pragma unroll
            for (int e = 0; e < kLane; ++e) {
                const float v = widen(raw[k].v[e], S);
                if (e < n) {
                    bad |= !is_finite(v);
                    group = fmaxf(group, fabsf(v));
                }
            }
            group = lanes_max<8>(group);
            bad = lanes_max<8>(bad ? 1.0f : 0.0f) != 0.0f;
            const uint32_t sbits = bad ? kE8m0Nan : mx_scale(group);
            if (lane % 8 == 0 && n > 0) t.scale[r * t.scale_pitch + c / kMxGroup] = uint8_t(sbits);
            if (n == 0) continue;
            const float f = bad ? 0.0f : mx_factor(sbits);
            Vec4<uint8_t> q;
#pragma unroll
            for (int e = 0; e < kLane; ++e) q.v[e] = bad ? kE4m3Nan : e4m3(widen(raw[k].v[e], S) * f);
            store4<uint8_t>(t.dst + r * t.dp + c, q, n, out_aligned);
        }
    } else {
        using Out = typename Element<D>::type;
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) {
            const int64_t r = t.r0 + warp + kWarps * k;
            if (r >= t.rows || n == 0) continue;
            Vec4<Out> o;
#pragma unroll
            for (int e = 0; e < kLane; ++e) {
                o.v[e] = Out(S == D ? uint32_t(raw[k].v[e]) : narrow(widen(raw[k].v[e], S), D));
            }
            store4<Out>(t.dst + r * t.dp + c * sizeof(Out), o, n, out_aligned);
        }
    }
}

template <int64_t S>
__device__ void dispatch_dst(int64_t d, const Tile& t, float* partial) {
    switch (d) {
        case kFp32: transform_tile<S, kFp32>(t, partial); break;
        case kBf16: transform_tile<S, kBf16>(t, partial); break;
        case kFp16: transform_tile<S, kFp16>(t, partial); break;
        case kFp8Block128: transform_tile<S, kFp8Block128>(t, partial); break;
        default: transform_tile<S, kMxfp8>(t, partial); break;
    }
}

// One 128 x 128 tile of one row of the table per thread block (a jagged grid, as the segment
// copy's): block b finds its row by binary search over the tiles' prefix sums.
__global__ void __launch_bounds__(kThreads) transform_kernel(DeviceTransforms t) {
    __shared__ float partial[kWarps];
    for (int64_t tile = blockIdx.x; tile < t.tiles; tile += gridDim.x) {
        int64_t lo = 0, hi = t.count - 1;
        while (lo < hi) {
            const int64_t mid = (lo + hi + 1) / 2;
            if (t.tile_first[mid] <= tile) lo = mid; else hi = mid - 1;
        }
        const int64_t i = lo;
        const int64_t rows = t.col[kRows][i], cols = t.col[kCols][i];
        const int64_t tiles_across = (cols + kBlock - 1) / kBlock;
        const int64_t local = tile - t.tile_first[i];
        const Tile x{reinterpret_cast<const uint8_t*>(t.col[kSrc][i]),
                     reinterpret_cast<uint8_t*>(t.col[kDst][i]),
                     t.col[kSrcPitch][i], t.col[kDstPitch][i], rows, cols,
                     (local / tiles_across) * kBlock, (local % tiles_across) * kBlock,
                     reinterpret_cast<uint8_t*>(t.col[kScale][i]), t.col[kScalePitch][i]};
        const int64_t d = t.col[kDstFmt][i];
        switch (t.col[kSrcFmt][i]) {
            case kFp32: dispatch_dst<kFp32>(d, x, partial); break;
            case kBf16: dispatch_dst<kBf16>(d, x, partial); break;
            default: dispatch_dst<kFp16>(d, x, partial); break;
        }
    }
}

}  // namespace

TransformTable::TransformTable(const HostTransforms& t) {
    t.check();
    const int64_t n = int64_t(t.size());
    std::vector<int64_t> host(11 * n + 1);
    const std::vector<int64_t>* cols[10] = {&t.src,  &t.dst,     &t.src_pitch, &t.dst_pitch,
                                            &t.rows, &t.cols,    &t.src_fmt,   &t.dst_fmt,
                                            &t.scale, &t.scale_pitch};
    for (int c = 0; c < 10; ++c) std::copy(cols[c]->begin(), cols[c]->end(), host.begin() + c * n);
    int64_t tiles = 0;
    for (int64_t i = 0; i < n; ++i) {
        host[10 * n + i] = tiles;
        tiles += ((t.rows[i] + kBlock - 1) / kBlock) * ((t.cols[i] + kBlock - 1) / kBlock);
    }
    host[11 * n] = tiles;
    void* dev = nullptr;
    REFIT_CUDA_CHECK(cudaMalloc(&dev, host.size() * sizeof(int64_t)));
    memory_.reset(static_cast<int64_t*>(dev));
    REFIT_CUDA_CHECK(cudaMemcpy(dev, host.data(), host.size() * sizeof(int64_t),
                                cudaMemcpyHostToDevice));
    const int64_t* base = memory_.get();
    for (int c = 0; c < 10; ++c) table_.col[c] = base + c * n;
    table_.tile_first = base + 10 * n;
    table_.count = n;
    table_.tiles = tiles;
}

void TransformTable::launch(cudaStream_t stream) const {
    if (table_.count == 0 || table_.tiles == 0) return;
    const int64_t max_blocks = int64_t(1) << 20;
    const unsigned blocks = unsigned(table_.tiles < max_blocks ? table_.tiles : max_blocks);
    transform_kernel<<<blocks, kThreads, 0, stream>>>(table_);
    REFIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace refit
