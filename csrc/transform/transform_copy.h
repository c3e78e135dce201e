// The CUDA side of the transform tables (transform_table.h): uploaded once per plan, so a
// captured CUDA graph stays valid, and launched as one kernel per table.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "transform/transform_table.h"

namespace refit {

struct DeviceTransforms {
    const int64_t* col[10] = {};      // the table's columns in HostTransforms order
    const int64_t* tile_first = nullptr;  // n + 1 entries: first 128 x 128 tile of each row
    int64_t count = 0;
    int64_t tiles = 0;
};

class TransformTable {
   public:
    explicit TransformTable(const HostTransforms& rows);
    void launch(cudaStream_t stream) const;
    int64_t tiles() const { return table_.tiles; }

   private:
    struct Free {
        void operator()(int64_t* p) const { cudaFree(p); }
    };
    std::unique_ptr<int64_t, Free> memory_;
    DeviceTransforms table_;
};

}  // namespace refit
