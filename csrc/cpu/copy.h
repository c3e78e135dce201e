// CPU executor of pitched 2-D copies: pack (buffers -> staging), unpack (staging -> buffers)
// and local copies (buffers -> buffers), split over threads by bytes.
#pragma once

#include <cstdint>

#include "plan/types.h"

namespace refit {

// Base addresses of one side: buffer i lives at buffers[i]; segments whose buffer is -1
// address `staging` instead.
struct CpuSide {
    uint8_t* const* buffers;
    int64_t num_buffers;
    uint8_t* staging;
};

// Runs every segment: reads from `src`, writes to `dst`. Before copying anything, checks that
// buffer indices are in range and bases are not null (throws std::out_of_range), and that each
// segment's row count and size are not negative and the bytes it touches lie at non-negative
// offsets that fit in int64 (std::invalid_argument). Whether those bytes lie inside the
// memory at the addresses given is the caller's to ensure.
void cpu_copy_segments(const Segment* segs, int64_t n, const CpuSide& src, const CpuSide& dst,
                       int threads);

}  // namespace refit
