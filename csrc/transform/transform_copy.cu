#include "transform/transform_copy.h"

#include <stdexcept>
#include <vector>

#include "common/check.h"
#include "transform/formats.h"

namespace refit {

namespace {

constexpr int kThreads = 256;  // 8 warps: warp w takes rows w, w + 8, ... of a tile
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kBlock / kWarps;  // 16
constexpr int kColsPerLane = kBlock / 32;      // 4: lane l takes columns l, l + 32, ...

enum Column { kSrc, kDst, kSrcPitch, kDstPitch, kRows, kCols, kSrcFmt, kDstFmt, kScale, kScalePitch };

// Calls fn(k, j, r, c) for every element (row r, column c of the rectangle) this thread owns
// in the tile at (r0, c0): rows warp + 8k, columns lane + 32j, inside the rectangle only.
template <typename Fn>
__device__ __forceinline__ void each_element(int64_t r0, int64_t c0, int64_t rows, int64_t cols,
                                             Fn fn) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
        const int64_t r = r0 + warp + kWarps * k;
#pragma unroll
        for (int j = 0; j < kColsPerLane; ++j) {
            const int64_t c = c0 + lane + 32 * j;
            if (r < rows && c < cols) fn(k, j, r, c);
        }
    }
}

__device__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
    return v;
}

// One 128 x 128 tile of one row of the table per thread block (a jagged grid, as the segment
// copy's): block b finds its row by binary search over the tiles' prefix sums.
__global__ void __launch_bounds__(kThreads) transform_kernel(DeviceTransforms t) {
    __shared__ float partial[kWarps];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
        const int64_t r0 = (local / tiles_across) * kBlock, c0 = (local % tiles_across) * kBlock;
        const auto* src = reinterpret_cast<const uint8_t*>(t.col[kSrc][i]);
        auto* dst = reinterpret_cast<uint8_t*>(t.col[kDst][i]);
        const int64_t sp = t.col[kSrcPitch][i], dp = t.col[kDstPitch][i];
        const int64_t sf = t.col[kSrcFmt][i], df = t.col[kDstFmt][i];
        const int sb = element_bytes(sf), db = element_bytes(df);

        // Every element of the tile this thread owns, widened (or raw for a plain copy).
        uint32_t raw[kRowsPerWarp][kColsPerLane] = {};
        float amax = 0.0f;
        each_element(r0, c0, rows, cols, [&](int k, int j, int64_t r, int64_t c) {
            raw[k][j] = load_raw(src + r * sp + c * sb, sf);
            if (df == kFp8Block128) {
                const float v = widen(raw[k][j], sf);
                if (is_finite(v)) amax = fmaxf(amax, fabsf(v));
            }
        });

        if (df == kFp8Block128) {
            amax = warp_max(amax);
            if (lane == 0) partial[warp] = amax;
            __syncthreads();
            float block = 0.0f;
            for (int w = 0; w < kWarps; ++w) block = fmaxf(block, partial[w]);
            __syncthreads();  // `partial` is reused by the next tile
            const float s = block_scale_inv(block);
            if (threadIdx.x == 0) {
                auto* scale = reinterpret_cast<uint8_t*>(t.col[kScale][i]);
                memcpy(scale + (r0 / kBlock) * t.col[kScalePitch][i] + (c0 / kBlock) * 4, &s, 4);
            }
            each_element(r0, c0, rows, cols, [&](int k, int j, int64_t r, int64_t c) {
                dst[r * dp + c] = block_element(widen(raw[k][j], sf), s);
            });
        } else if (df == kMxfp8) {
            // A group is the 32 lanes of one (row, j): 32 consecutive elements of the row.
#pragma unroll
            for (int k = 0; k < kRowsPerWarp; ++k) {
                const int64_t r = r0 + warp + kWarps * k;
                if (r >= rows) continue;  // the same for the whole warp
#pragma unroll
                for (int j = 0; j < kColsPerLane; ++j) {
                    const int64_t c = c0 + lane + 32 * j;
                    if (c0 + 32 * j >= cols) continue;  // the same for the whole warp
                    const bool mine = c < cols;
                    const float v = mine ? widen(raw[k][j], sf) : 0.0f;
                    const bool bad = __any_sync(0xFFFFFFFFu, mine && !is_finite(v));
                    const float group = warp_max(fabsf(v));
                    const uint32_t sbits = bad ? kE8m0Nan : mx_scale(group);
                    if (lane == 0) {
                        auto* scale = reinterpret_cast<uint8_t*>(t.col[kScale][i]);
                        scale[r * t.col[kScalePitch][i] + (c0 + 32 * j) / kMxGroup] = uint8_t(sbits);
                    }
                    if (mine) dst[r * dp + c] = bad ? kE4m3Nan : e4m3(v * mx_factor(sbits));
                }
            }
        } else {
            each_element(r0, c0, rows, cols, [&](int k, int j, int64_t r, int64_t c) {
                const uint32_t out = df == sf ? raw[k][j] : narrow(widen(raw[k][j], sf), df);
                store_raw(dst + r * dp + c * db, out, df);
            });
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
