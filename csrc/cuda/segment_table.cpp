#include "cuda/segment_table.h"

#include <stdexcept>

#include "common/check.h"

namespace refit {

SegmentTable::SegmentTable(const HostSegments& s) {
    const int64_t n = s.size();
    for (const auto* c : {&s.dst, &s.src_pitch, &s.dst_pitch, &s.rows, &s.row_bytes}) {
        if (int64_t(c->size()) != n) throw std::invalid_argument("segment columns differ in length");
    }
    // Columns, then the chunk prefix sums the kernel's blocks search.
    std::vector<int64_t> host(7 * n + 1);
    int64_t chunks = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (s.row_bytes[i] <= 0 || s.rows[i] < 0) {
            throw std::invalid_argument("segment rows must be >= 0 and row_bytes > 0");
        }
        host[6 * n + i] = chunks;
        const int64_t bytes = s.rows[i] * s.row_bytes[i];
        chunks += (bytes + kChunkBytes - 1) / kChunkBytes;
    }
    host[7 * n] = chunks;
    const std::vector<int64_t>* cols[6] = {&s.src, &s.dst, &s.src_pitch, &s.dst_pitch, &s.rows,
                                           &s.row_bytes};
    for (int c = 0; c < 6; ++c) std::copy(cols[c]->begin(), cols[c]->end(), host.begin() + c * n);
    void* dev = nullptr;
    REFIT_CUDA_CHECK(cudaMalloc(&dev, host.size() * sizeof(int64_t)));
    memory_.reset(static_cast<int64_t*>(dev));
    REFIT_CUDA_CHECK(
        cudaMemcpy(dev, host.data(), host.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
    const int64_t* base = memory_.get();
    table_ = {base, base + n, base + 2 * n, base + 3 * n, base + 4 * n, base + 5 * n, base + 6 * n,
              n, chunks};
}

}  // namespace refit
