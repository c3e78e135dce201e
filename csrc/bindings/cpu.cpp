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

using Table = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

std::vector<uint8_t*> as_pointers(const Table& addresses) {
    std::vector<uint8_t*> out(addresses.size());
    for (py::ssize_t i = 0; i < addresses.size(); ++i) {
        out[i] = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(addresses.data()[i]));
    }
    return out;
}

}  // namespace

void bind_cpu(py::module_& m) {
    m.def(
        "cpu_copy_segments",
        [](const Table& segments, const Table& src_buffers, int64_t src_staging,
           const Table& dst_buffers, int64_t dst_staging, int threads) {
            if (segments.ndim() != 2 || segments.shape(1) != kSegmentFields) {
                throw std::invalid_argument("segments must have shape (n, 11)");
            }
            std::vector<uint8_t*> src_ptrs = as_pointers(src_buffers);
            std::vector<uint8_t*> dst_ptrs = as_pointers(dst_buffers);
            const CpuSide src{src_ptrs.data(), int64_t(src_ptrs.size()),
                              reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(src_staging))};
            const CpuSide dst{dst_ptrs.data(), int64_t(dst_ptrs.size()),
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
