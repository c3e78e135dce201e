// Bindings of the CUDA executor. Addresses and streams cross as integers, so the module never
// links torch; tables cross as int64 NumPy columns.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "bindings/bindings.h"
#include "bindings/transports.h"
#include "cuda/executor.h"
#include "cuda/segment_table.h"
#include "transform/transform_copy.h"

namespace py = pybind11;

namespace refit {

namespace {

std::vector<int64_t> as_vector(const Int64Array& c) { return {c.data(), c.data() + c.size()}; }

std::vector<DeviceMessage> as_messages(const Int64Array& table) {
    if (table.size() == 0) return {};
    if (table.ndim() != 2 || table.shape(1) != 3) {
        throw std::invalid_argument("messages must have shape (n, 3): peer, address, bytes");
    }
    std::vector<DeviceMessage> out(table.shape(0));
    for (py::ssize_t i = 0; i < table.shape(0); ++i) {
        out[i] = {table.at(i, 0), table.at(i, 1), table.at(i, 2)};
    }
    return out;
}

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

}  // namespace

void bind_cuda(py::module_& m) {
    m.attr("HAS_CUDA") = true;
    py::class_<SegmentTable, std::shared_ptr<SegmentTable>>(
        m, "SegmentTable", "Pitched copies (absolute device addresses) uploaded to the GPU.")
        .def(py::init([](const Int64Array& src, const Int64Array& dst, const Int64Array& src_pitch,
                         const Int64Array& dst_pitch, const Int64Array& rows, const Int64Array& row_bytes) {
                 HostSegments s{as_vector(src),  as_vector(dst),  as_vector(src_pitch),
                                as_vector(dst_pitch), as_vector(rows), as_vector(row_bytes)};
                 return std::make_shared<SegmentTable>(s);
             }),
             py::arg("src"), py::arg("dst"), py::arg("src_pitch"), py::arg("dst_pitch"),
             py::arg("rows"), py::arg("row_bytes"))
        .def("launch", [](const SegmentTable& t, uintptr_t stream) { t.launch(as_stream(stream)); },
             py::arg("stream") = 0, "Enqueue the copies on a CUDA stream (integer handle).");

    py::class_<TransformTable, std::shared_ptr<TransformTable>>(
        m, "TransformTable", "Transforming copies (casts, FP8 quantization) uploaded to the GPU.")
        .def(py::init([](const py::dict& columns) {
                 return std::make_shared<TransformTable>(as_transforms(columns));
             }),
             py::arg("columns"))
        .def("launch", [](const TransformTable& t, uintptr_t stream) { t.launch(as_stream(stream)); },
             py::arg("stream") = 0, "Enqueue the table on a CUDA stream (integer handle).")
        .def_property_readonly("tiles", &TransformTable::tiles);

    // Each transport's Python classes; peer_transports() turns an executor's `comm` into them.
    bind_nccl(m);
    bind_ipc(m);

    py::class_<CudaExecutor>(m, "CudaExecutor", "Runs one rank's (or, loopback, all ranks') plan.")
        .def(py::init([](int device, const py::object& comm) {
                 return std::make_unique<CudaExecutor>(device, peer_transports(comm));
             }),
             py::arg("device"), py::arg("comm") = py::none())
        .def("set_local", &CudaExecutor::set_local, py::arg("table"))
        .def("set_local_transform", &CudaExecutor::set_local_transform, py::arg("table"))
        .def("set_finish", &CudaExecutor::set_finish, py::arg("table"))
        .def("set_ordering", &CudaExecutor::set_ordering, py::arg("ordering"))
        .def(
            "add_bucket",
            [](CudaExecutor& self, std::shared_ptr<SegmentTable> pack, const Int64Array& sends,
               const Int64Array& recvs, std::shared_ptr<SegmentTable> exchange,
               std::shared_ptr<SegmentTable> unpack, std::shared_ptr<TransformTable> pack_transform,
               std::shared_ptr<TransformTable> unpack_transform) {
                self.add_bucket(Bucket{std::move(pack), as_messages(sends), as_messages(recvs),
                                       std::move(exchange), std::move(unpack),
                                       std::move(pack_transform), std::move(unpack_transform)});
            },
            py::arg("pack"), py::arg("sends"), py::arg("recvs"), py::arg("exchange"),
            py::arg("unpack"), py::arg("pack_transform") = nullptr,
            py::arg("unpack_transform") = nullptr)
        // NOTE: without the GIL: an NCCL group's end may wait (bounded) for peers to connect.
        .def("run",
             [](CudaExecutor& self, uintptr_t s) {
                 py::gil_scoped_release release;
                 self.run(as_stream(s));
             },
             py::arg("stream"))
        .def("capture",
             [](CudaExecutor& self, uintptr_t s) {
                 py::gil_scoped_release release;
                 self.capture(as_stream(s));
             },
             py::arg("stream"))
        .def("replay", [](CudaExecutor& self, uintptr_t s) { self.replay(as_stream(s)); },
             py::arg("stream"))
        .def("wait",
             [](CudaExecutor& self, uintptr_t s, double timeout) {
                 py::gil_scoped_release release;
                 self.wait(as_stream(s), timeout);
             },
             py::arg("stream"), py::arg("timeout_s"))
        .def_property_readonly("captured", &CudaExecutor::captured)
        .def_property_readonly("num_buckets", &CudaExecutor::num_buckets);
}

}  // namespace refit
