// A segment table uploaded to the GPU once (built per plan, reused by every refit, so captured
// CUDA graphs stay valid), launched by the fused segment-copy kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "cuda/segment_copy.h"

namespace refit {

struct HostSegments {  // structure of arrays, absolute addresses
    std::vector<int64_t> src, dst, src_pitch, dst_pitch, rows, row_bytes;
    size_t size() const { return src.size(); }
};

class SegmentTable {
   public:
    explicit SegmentTable(const HostSegments& segments);
    void launch(cudaStream_t stream) const { launch_segment_copy(table_, stream); }
    // The copies do nothing while *flag is nonzero (see DeviceSegments::skip).
    void skip_when(const int64_t* flag) { table_.skip = flag; }

   private:
    struct Free {
        void operator()(int64_t* p) const { cudaFree(p); }
    };
    std::unique_ptr<int64_t, Free> memory_;
    DeviceSegments table_;
};

}  // namespace refit
