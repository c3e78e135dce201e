// Bindings of the CUDA executor pieces. Addresses and streams cross as integers, so the
// module never links torch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "bindings/bindings.h"
#include "cuda/check.h"
#include "cuda/segment_copy.h"

namespace py = pybind11;

namespace refit {

namespace {

using Column = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// A segment table uploaded to the device once and launched many times.
class DeviceSegmentTable {
   public:
    DeviceSegmentTable(const Column& src, const Column& dst, const Column& src_pitch,
                       const Column& dst_pitch, const Column& rows, const Column& row_bytes) {
        const int64_t n = src.size();
        for (const Column* c : {&dst, &src_pitch, &dst_pitch, &rows, &row_bytes}) {
            if (c->size() != n) throw std::invalid_argument("segment columns differ in length");
        }
        std::vector<int64_t> host(7 * n + 1);
        int64_t chunks = 0;
        for (int64_t i = 0; i < n; ++i) {
            if (row_bytes.data()[i] <= 0 || rows.data()[i] < 0) {
                throw std::invalid_argument("segment rows must be >= 0 and row_bytes > 0");
            }
            host[6 * n + i] = chunks;
            chunks += (rows.data()[i] * row_bytes.data()[i] + kChunkBytes - 1) / kChunkBytes;
        }
        host[7 * n] = chunks;
        const Column* cols[6] = {&src, &dst, &src_pitch, &dst_pitch, &rows, &row_bytes};
        for (int c = 0; c < 6; ++c) std::copy(cols[c]->data(), cols[c]->data() + n, host.begin() + c * n);
        void* dev = nullptr;
        REFIT_CUDA_CHECK(cudaMalloc(&dev, host.size() * sizeof(int64_t)));
        memory_.reset(static_cast<int64_t*>(dev));
        REFIT_CUDA_CHECK(cudaMemcpy(dev, host.data(), host.size() * sizeof(int64_t),
                                    cudaMemcpyHostToDevice));
        const int64_t* base = memory_.get();
        table_ = {base, base + n, base + 2 * n, base + 3 * n, base + 4 * n, base + 5 * n,
                  base + 6 * n, n, chunks};
    }

    void launch(uintptr_t stream) const {
        launch_segment_copy(table_, reinterpret_cast<cudaStream_t>(stream));
    }
    int64_t count() const { return table_.count; }

   private:
    struct Free {
        void operator()(int64_t* p) const { cudaFree(p); }
    };
    std::unique_ptr<int64_t, Free> memory_;
    DeviceSegments table_;
};

}  // namespace

void bind_cuda(py::module_& m) {
    py::class_<DeviceSegmentTable>(m, "DeviceSegmentTable",
                                   "Pitched copies uploaded to the GPU; launch() enqueues them.")
        .def(py::init<const Column&, const Column&, const Column&, const Column&, const Column&,
                      const Column&>(),
             py::arg("src"), py::arg("dst"), py::arg("src_pitch"), py::arg("dst_pitch"),
             py::arg("rows"), py::arg("row_bytes"))
        .def("launch", &DeviceSegmentTable::launch, py::arg("stream") = 0,
             "Enqueue the copy on the CUDA stream given as an integer handle.")
        .def_property_readonly("count", &DeviceSegmentTable::count);
}

}  // namespace refit
