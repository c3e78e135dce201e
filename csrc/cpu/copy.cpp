#include "cpu/copy.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

namespace refit {

namespace {

uint8_t* resolve(const CpuSide& side, int64_t buffer, int64_t offset) {
    return (buffer < 0 ? side.staging : side.buffers[buffer]) + offset;
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

}  // namespace

void cpu_copy_segments(const Segment* segs, int64_t n, const CpuSide& src, const CpuSide& dst,
                       int threads) {
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) {
        const Segment& s = segs[i];
        if (s.src_buffer >= src.num_buffers || s.dst_buffer >= dst.num_buffers ||
            (s.src_buffer < 0 && !src.staging) || (s.dst_buffer < 0 && !dst.staging)) {
            throw std::out_of_range("segment refers to a buffer that is not bound");
        }
        total += s.bytes();
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
