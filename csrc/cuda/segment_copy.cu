#include <cuda_runtime.h>

#include "common/check.h"
#include "cuda/segment_copy.h"

namespace refit {

namespace {

constexpr int kThreads = 512;

// Copies `len` bytes with all threads of the block, using the widest word that both `dst`
// and `src` share alignment for: head bytes up to the word boundary, words, tail bytes.
template <typename Word>
__device__ void copy_words(uint8_t* dst, const uint8_t* src, int64_t len) {
    constexpr int64_t kWord = sizeof(Word);
    const int64_t misalign = int64_t(reinterpret_cast<uintptr_t>(dst) % kWord);
    const int64_t head = len < (kWord - misalign) % kWord ? len : (kWord - misalign) % kWord;
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x) dst[i] = src[i];
    const int64_t words = (len - head) / kWord;
    Word* dst_w = reinterpret_cast<Word*>(dst + head);
    const Word* src_w = reinterpret_cast<const Word*>(src + head);
    for (int64_t i = threadIdx.x; i < words; i += blockDim.x) dst_w[i] = src_w[i];
    const int64_t done = head + words * kWord;
    for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) dst[i] = src[i];
}

__device__ void copy_bytes(uint8_t* dst, const uint8_t* src, int64_t len) {
    const uintptr_t mis = reinterpret_cast<uintptr_t>(dst) ^ reinterpret_cast<uintptr_t>(src);
    if (mis % 16 == 0) {
        copy_words<uint4>(dst, src, len);
    } else if (mis % 8 == 0) {
        copy_words<uint2>(dst, src, len);
    } else if (mis % 4 == 0) {
        copy_words<uint32_t>(dst, src, len);
    } else {
        copy_words<uint8_t>(dst, src, len);
    }
}

// Copies words [w0, w1) of a segment whose addresses, pitches and row length are all multiples
// of 16 bytes: every thread moves whole 16-byte words, spread over the rows of the chunk (so
// short rows keep every thread busy), with kUnroll independent loads in flight per thread.
constexpr int kUnroll = 4;

__device__ void copy_words_2d(const uint8_t* src, uint8_t* dst, int64_t src_pitch,
                              int64_t dst_pitch, uint32_t words_per_row, uint32_t w0, uint32_t w1) {
    const bool flat = src_pitch == int64_t(words_per_row) * 16 && dst_pitch == src_pitch;
    auto src_at = [&](uint32_t w) {
        if (flat) return reinterpret_cast<const uint4*>(src) + w;
        const uint32_t row = w / words_per_row, col = w - row * words_per_row;
        return reinterpret_cast<const uint4*>(src + int64_t(row) * src_pitch) + col;
    };
    auto dst_at = [&](uint32_t w) {
        if (flat) return reinterpret_cast<uint4*>(dst) + w;
        const uint32_t row = w / words_per_row, col = w - row * words_per_row;
        return reinterpret_cast<uint4*>(dst + int64_t(row) * dst_pitch) + col;
    };
    const uint32_t step = blockDim.x;
    uint32_t w = w0 + threadIdx.x;
    for (; w + (kUnroll - 1) * step < w1; w += kUnroll * step) {
        uint4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = *src_at(w + u * step);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) *dst_at(w + u * step) = v[u];
    }
    for (; w < w1; w += step) *dst_at(w) = *src_at(w);
}

// A "jagged grid": block b copies chunk b of the concatenated segments; it finds its segment
// by binary search over the chunk prefix sums.
__global__ void __launch_bounds__(kThreads) segment_copy_kernel(DeviceSegments t) {
    if (t.skip && *reinterpret_cast<const volatile int64_t*>(t.skip) != 0) return;
    for (int64_t chunk = blockIdx.x; chunk < t.chunks; chunk += gridDim.x) {
        int64_t lo = 0, hi = t.count - 1;
        while (lo < hi) {
            const int64_t mid = (lo + hi + 1) / 2;
            if (t.chunk_first[mid] <= chunk) lo = mid; else hi = mid - 1;
        }
        const int64_t seg = lo;
        const int64_t row_bytes = t.row_bytes[seg];
        const int64_t total = t.rows[seg] * row_bytes;
        int64_t from = (chunk - t.chunk_first[seg]) * kChunkBytes;
        const int64_t to = min(total, from + kChunkBytes);
        const uint8_t* src = reinterpret_cast<const uint8_t*>(t.src[seg]);
        uint8_t* dst = reinterpret_cast<uint8_t*>(t.dst[seg]);
        const int64_t src_pitch = t.src_pitch[seg], dst_pitch = t.dst_pitch[seg];
        const bool words = ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                             uint64_t(src_pitch) | uint64_t(dst_pitch) | uint64_t(row_bytes)) %
                            16) == 0;
        if (words) {
            // Chunk bounds are multiples of 16 here, and a chunk's words fit 32-bit indices.
            const int64_t first_row = from / row_bytes;
            const int64_t skip = first_row * row_bytes;
            copy_words_2d(src + first_row * src_pitch, dst + first_row * dst_pitch, src_pitch,
                          dst_pitch, uint32_t(row_bytes / 16), uint32_t((from - skip) / 16),
                          uint32_t((to - skip) / 16));
            continue;
        }
        int64_t row = from / row_bytes, col = from % row_bytes;
        while (from < to) {
            const int64_t take = min(row_bytes - col, to - from);
            copy_bytes(dst + row * dst_pitch + col, src + row * src_pitch + col, take);
            from += take;
            ++row;
            col = 0;
        }
    }
}

}  // namespace

void launch_segment_copy(const DeviceSegments& table, cudaStream_t stream) {
    if (table.count == 0 || table.chunks == 0) return;
    const int64_t max_blocks = int64_t(1) << 20;
    const unsigned blocks = unsigned(table.chunks < max_blocks ? table.chunks : max_blocks);
    segment_copy_kernel<<<blocks, kThreads, 0, stream>>>(table);
    REFIT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace refit
