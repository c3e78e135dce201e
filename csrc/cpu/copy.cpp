#include "cpu/copy.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace refit {

namespace {

uint8_t* resolve_base(const CpuSide& side, int64_t buffer) {
    return buffer < 0 ? side.staging : side.buffers[buffer];
}

uint8_t* resolve(const CpuSide& side, int64_t buffer, int64_t offset) {
    return resolve_base(side, buffer) + offset;
}

// Copies bytes [from, to) of the segment's row-major byte stream.
void copy_range(const Segment& s, const CpuSide& src, const CpuSide& dst, int64_t from,
                int64_t to) {
    const uint8_t* in = resolve(src, s.src_buffer, s.src_offset);
    uint8_t* out = resolve(dst, s.dst_buffer, s.dst_offset);
    int64_t row = from / s.row_bytes, col = from % s.row_bytes;
    while (from < to) {
        const int64_t take = std::min(s.row_bytes - col, to - from);
        std::memcpy(out + row * s.dst_pitch + col, in + row * s.src_pitch + col, take);
        from += take;
        ++row;
        col = 0;
    }
}

// Lowest and one-past-highest byte, relative to the base, of `rows` rows of `row_bytes` bytes,
// `pitch` apart from `offset`; false when they do not fit in int64.
bool byte_range(int64_t offset, int64_t pitch, int64_t rows, int64_t row_bytes, int64_t& lo,
                int64_t& hi) {
    int64_t last_row;
    if (__builtin_mul_overflow(rows - 1, pitch, &last_row)) return false;
    return !__builtin_add_overflow(offset, std::min<int64_t>(last_row, 0), &lo) &&
           !__builtin_add_overflow(offset, std::max<int64_t>(last_row, 0), &hi) &&
           !__builtin_add_overflow(hi, row_bytes, &hi);
}

// The bytes of segment `i`, after checking it: its buffers are bound, and the bytes it
// touches lie at non-negative offsets from their bases (every plan's do) that fit in int64.
int64_t checked_bytes(const Segment& s, int64_t i, const CpuSide& src, const CpuSide& dst) {
    const std::string which = "segment " + std::to_string(i);
    if (s.src_buffer < -1 || s.src_buffer >= src.num_buffers || s.dst_buffer < -1 ||
        s.dst_buffer >= dst.num_buffers || (s.src_buffer < 0 && !src.staging) ||
        (s.dst_buffer < 0 && !dst.staging)) {
        throw std::out_of_range(which + " refers to a buffer that is not bound (source " +
                                std::to_string(s.src_buffer) + ", destination " +
                                std::to_string(s.dst_buffer) + ")");
    }
    int64_t bytes;
    if (s.rows < 0 || s.row_bytes < 0 || __builtin_mul_overflow(s.rows, s.row_bytes, &bytes)) {
        throw std::invalid_argument(which + " has " + std::to_string(s.rows) + " rows of " +
                                    std::to_string(s.row_bytes) +
                                    " bytes: negative or too large");
    }
    if (bytes == 0) return 0;  // copies nothing: its offsets are never used
    for (const auto& [base, offset, pitch] :
         {std::tuple{resolve_base(src, s.src_buffer), s.src_offset, s.src_pitch},
          std::tuple{resolve_base(dst, s.dst_buffer), s.dst_offset, s.dst_pitch}}) {
        int64_t lo, hi;
        if (!base) {
            throw std::out_of_range(which + " refers to a buffer at address 0");
        }
        if (!byte_range(offset, pitch, s.rows, s.row_bytes, lo, hi) || lo < 0) {
            throw std::invalid_argument(which + " reaches bytes before its buffer or past the "
                                                "range of 64-bit offsets (offset " +
                                        std::to_string(offset) + ", pitch " +
                                        std::to_string(pitch) + ")");
        }
    }
    return bytes;
}

}  // namespace

void cpu_copy_segments(const Segment* segs, int64_t n, const CpuSide& src, const CpuSide& dst,
                       int threads) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (__builtin_add_overflow(total, checked_bytes(segs[i], i, src, dst), &total)) {
            throw std::invalid_argument("segments add up to more bytes than int64 counts");
        }
    }
    // Small copies are not worth a thread start (~20 us each).
    constexpr int64_t kBytesPerThread = int64_t(4) << 20;
    threads = int(std::max<int64_t>(1, std::min<int64_t>(threads, total / kBytesPerThread)));
    auto work = [&](int64_t lo, int64_t hi) {  // bytes [lo, hi) of the concatenated segments
        int64_t base = 0;
        for (int64_t i = 0; i < n && base < hi; ++i) {
            const int64_t bytes = segs[i].bytes();
            const int64_t from = std::max(lo, base), to = std::min(hi, base + bytes);
            if (from < to) copy_range(segs[i], src, dst, from - base, to - base);
            base += bytes;
        }
    };
    if (threads == 1) {
        work(0, total);
        return;
    }
    std::vector<std::thread> pool;
    const int64_t share = (total + threads - 1) / threads;
    for (int t = 1; t < threads; ++t) pool.emplace_back(work, t * share, std::min(total, (t + 1) * share));
    work(0, std::min(total, share));
    for (std::thread& th : pool) th.join();
}

}  // namespace refit
