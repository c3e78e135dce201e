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

// Runs every segment: reads from `src`, writes to `dst`. Checks that buffer indices are in
// range (throws std::out_of_range) before copying anything.
void cpu_copy_segments(const Segment* segs, int64_t n, const CpuSide& src, const CpuSide& dst,
                       int threads);

}  // namespace refit
