// One fused kernel for every batched copy of a refit: pack (sources -> staging), unpack
// (staging -> destinations) and local copies (source -> destination).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace refit {

// Structure-of-arrays segment table in device memory; built once per plan and reused, so a
// captured CUDA graph stays valid. Addresses are absolute device addresses.
struct DeviceSegments {
    const int64_t* src = nullptr;
    const int64_t* dst = nullptr;
    const int64_t* src_pitch = nullptr;
    const int64_t* dst_pitch = nullptr;
    const int64_t* rows = nullptr;
    const int64_t* row_bytes = nullptr;
    const int64_t* chunk_first = nullptr;  // n + 1 entries: first work chunk of each segment
    int64_t count = 0;
    int64_t chunks = 0;
    // Nonzero at launch time: copy nothing. Set for copies that read peer memory, pointing at
    // the cross-process ordering's failure word, so a failed wait never reads a dead peer.
    const int64_t* skip = nullptr;
};

// Bytes of a segment's row-major byte stream that one thread block copies.
constexpr int64_t kChunkBytes = int64_t(64) << 10;

// Enqueues the copy of every segment on `stream`. Any alignment, any size (offsets beyond
// 4 GiB included); the widest access both addresses allow (16, 8, 4 or 1 bytes) is used.
void launch_segment_copy(const DeviceSegments& table, cudaStream_t stream);

}  // namespace refit
