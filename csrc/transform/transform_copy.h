// The CUDA side of the transform tables (transform_table.h): uploaded once per plan, so a
// captured CUDA graph stays valid, and launched as one kernel per (source, destination) format
// pair present in the table (each pair its own instantiation: registers sized for it alone).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "transform/transform_table.h"

namespace refit {

// The rows of one format pair, in device memory.
struct DeviceTransforms {
    const int64_t* col[10] = {};          // the table's columns in HostTransforms order
    const int64_t* tile_first = nullptr;  // count + 1 entries: first 128 x 128 tile of each row
    int64_t count = 0;
    int64_t tiles = 0;
    // Nonzero at launch time: transform nothing. Set for transforms that read peer memory,
    // pointing at the cross-process ordering's failure word (as DeviceSegments::skip).
    const int64_t* skip = nullptr;
};

class TransformTable {
   public:
    explicit TransformTable(const HostTransforms& rows);
    void launch(cudaStream_t stream) const;
    int64_t tiles() const { return tiles_; }
    // The transforms do nothing while *flag is nonzero (see DeviceTransforms::skip).
    void skip_when(const int64_t* flag) {
        for (auto& g : groups_) g.table.skip = flag;
    }

   private:
    struct Free {
        void operator()(int64_t* p) const { cudaFree(p); }
    };
    struct Group {
        int64_t src_fmt, dst_fmt;
        DeviceTransforms table;
    };
    std::unique_ptr<int64_t, Free> memory_;
    std::vector<Group> groups_;
    int64_t tiles_ = 0;
};

}  // namespace refit
