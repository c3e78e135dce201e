// Bindings of the NCCL transport, exposed to Python as NcclCommunicator (the name refit.py and
// the executors use); built when nccl.h was found.
#include <pybind11/pybind11.h>

#include <memory>
#include <string>

#include "bindings/transports.h"
#include "common/check.h"
#include "transport/nccl/nccl_api.h"
#include "transport/nccl/nccl_transport.h"

namespace py = pybind11;

namespace refit {

void bind_nccl(py::module_& m) {
    m.attr("HAS_NCCL") = true;
    m.def("nccl_version", [](const std::string& path) {
        int v = 0;
        REFIT_NCCL_CHECK(nccl(path).get_version(&v));
        return py::make_tuple(v, nccl(path).path);
    }, py::arg("path") = "", "(version code, library path) of the NCCL in use");
    py::class_<NcclTransport, std::shared_ptr<NcclTransport>>(m, "NcclCommunicator")
        .def_static("unique_id", []() { return py::bytes(NcclTransport::unique_id()); })
        .def(py::init([](py::bytes id, int nranks, int rank, int device, double timeout_s) {
                 std::string raw = id;
                 py::gil_scoped_release release;
                 return std::make_shared<NcclTransport>(raw, nranks, rank, device, timeout_s);
             }),
             py::arg("unique_id"), py::arg("nranks"), py::arg("rank"), py::arg("device"),
             py::arg("timeout_s"),
             "A non-blocking NCCL communicator; waits up to timeout_s for every rank to join "
             "(then aborts it and raises)")
        .def("abort", &NcclTransport::abort)
        .def_property_readonly("aborted", &NcclTransport::aborted)
        .def_property_readonly("rank", &NcclTransport::rank)
        .def_property_readonly("size", &NcclTransport::size)
        .def_property_readonly("timeout_s", &NcclTransport::timeout_s)
        .def("async_error", [](const NcclTransport& c) { return int(c.async_result()); });
}

PeerTransports peer_transports(const py::handle& comm) {
    if (comm.is_none()) return {};
    if (!py::isinstance<NcclTransport>(comm)) {
        throw py::type_error("comm must be an NcclCommunicator or None, got " +
                             std::string(py::str(py::type::of(comm))));
    }
    auto transport = comm.cast<std::shared_ptr<NcclTransport>>();
    // Plan messages name peers by communicator rank: all of them go over this communicator.
    return PeerTransports::all(transport->size(), transport);
}

}  // namespace refit
