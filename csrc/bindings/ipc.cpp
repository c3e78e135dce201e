// Bindings of the CUDA IPC transport: exporting and mapping allocations, and the two
// cross-process orderings. Handles cross as bytes, addresses and streams as integers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bindings/transports.h"
#include "transport/ipc/ipc_memory.h"
#include "transport/ipc/ipc_ordering.h"
#include "transport/ordering.h"

namespace py = pybind11;

namespace refit {

namespace {

cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

std::vector<std::string> as_strings(const std::vector<py::bytes>& handles) {
    std::vector<std::string> out;
    for (const auto& h : handles) out.push_back(std::string(h));
    return out;
}

}  // namespace

void bind_ipc(py::module_& m) {
    m.attr("HAS_IPC") = true;
    m.def(
        "ipc_export",
        [](uintptr_t address) {
            IpcExport e = export_allocation(address);
            return py::make_tuple(py::bytes(e.handle), e.offset, e.allocation_bytes);
        },
        py::arg("address"),
        "(handle bytes, offset, allocation bytes) of the allocation holding a device address; "
        "ValueError when that memory cannot be shared over CUDA IPC.");

    py::class_<IpcMapping, std::shared_ptr<IpcMapping>>(
        m, "IpcMapping", "A peer's allocation mapped into this process; unmapped when dropped.")
        .def(py::init([](const py::bytes& handle, int device) {
                 return IpcMapping::open(std::string(handle), device);
             }),
             py::arg("handle"), py::arg("device"))
        .def_property_readonly("base", &IpcMapping::base);

    py::class_<IpcEvents>(m, "IpcEvents", "Interprocess events: the host-barrier ordering.")
        .def(py::init<int>(), py::arg("device"))
        .def_property_readonly("ready_handle",
                               [](const IpcEvents& e) { return py::bytes(e.ready_handle()); })
        .def_property_readonly("done_handle",
                               [](const IpcEvents& e) { return py::bytes(e.done_handle()); })
        .def(
            "connect",
            [](IpcEvents& e, const std::vector<py::bytes>& owners_ready,
               const std::vector<py::bytes>& readers_done) {
                e.connect(as_strings(owners_ready), as_strings(readers_done));
            },
            py::arg("owners_ready"), py::arg("readers_done"))
        .def("signal_ready", [](IpcEvents& e, uintptr_t s) { e.signal_ready(as_stream(s)); })
        .def("wait_owners", [](IpcEvents& e, uintptr_t s) { e.wait_owners(as_stream(s)); })
        .def("signal_done", [](IpcEvents& e, uintptr_t s) { e.signal_done(as_stream(s)); })
        .def("wait_readers", [](IpcEvents& e, uintptr_t s) { e.wait_readers(as_stream(s)); });

    py::class_<StreamOrdering, std::shared_ptr<StreamOrdering>>(m, "StreamOrdering")
        .def_property_readonly("error", &StreamOrdering::error);
    py::class_<IpcFlags, StreamOrdering, std::shared_ptr<IpcFlags>>(
        m, "IpcFlags", "Device-side flags in IPC-shared memory: the graph-capturable ordering.")
        .def(py::init<int, double>(), py::arg("device"), py::arg("timeout_s"))
        .def_property_readonly("handle", [](const IpcFlags& f) { return py::bytes(f.handle()); })
        .def_property_readonly("nonce", &IpcFlags::nonce)
        .def(
            "connect",
            [](IpcFlags& f, const std::vector<int64_t>& owner_ranks,
               const std::vector<py::bytes>& owners, const std::vector<int64_t>& owner_nonces,
               const std::vector<int64_t>& reader_ranks, const std::vector<py::bytes>& readers,
               const std::vector<int64_t>& reader_nonces) {
                f.connect(owner_ranks, as_strings(owners), owner_nonces, reader_ranks,
                          as_strings(readers), reader_nonces);
            },
            py::arg("owner_ranks"), py::arg("owners"), py::arg("owner_nonces"),
            py::arg("reader_ranks"), py::arg("readers"), py::arg("reader_nonces"));
}

}  // namespace refit
