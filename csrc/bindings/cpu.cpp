// Bindings of the CPU executor: segment tables as int64 arrays, memory as integer addresses.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "bindings/bindings.h"
#include "cpu/copy.h"

namespace py = pybind11;

namespace refit {

namespace {

// Addresses cross as int64 and are read in place as pointers: this runs for every bucket of
// every refit, so no per-call conversion.
static_assert(sizeof(uint8_t*) == sizeof(int64_t), "addresses must be 64-bit");

uint8_t* const* as_pointers(const Int64Array& addresses) {
    return reinterpret_cast<uint8_t* const*>(addresses.data());
}

}  // namespace

void bind_cpu(py::module_& m) {
    m.def(
        "cpu_copy_segments",
        [](const Int64Array& segments, const Int64Array& src_buffers, int64_t src_staging,
           const Int64Array& dst_buffers, int64_t dst_staging, int threads) {
            if (segments.ndim() != 2 || segments.shape(1) != kSegmentFields) {
                throw std::invalid_argument("segments must have shape (n, " +
                                            std::to_string(kSegmentFields) + ")");
            }
            const CpuSide src{as_pointers(src_buffers), int64_t(src_buffers.size()),
                              reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(src_staging))};
            const CpuSide dst{as_pointers(dst_buffers), int64_t(dst_buffers.size()),
                              reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(dst_staging))};
            const auto* segs = reinterpret_cast<const Segment*>(segments.data());
            py::gil_scoped_release release;
            cpu_copy_segments(segs, segments.shape(0), src, dst, threads);
        },
        py::arg("segments"), py::arg("src_buffers"), py::arg("src_staging"),
        py::arg("dst_buffers"), py::arg("dst_staging"), py::arg("threads") = 1,
        "Run pitched copies between raw addresses (buffer index -1 means staging).");
}

}  // namespace refit
