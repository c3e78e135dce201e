// Built in CUDA builds without nccl.h: the module still has an NcclCommunicator class (that
// cannot be constructed) and says it has no NCCL (HAS_NCCL False).
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "bindings/transports.h"

namespace py = pybind11;

namespace refit {

namespace {
struct NoNccl {};
}  // namespace

void bind_nccl(py::module_& m) {
    m.attr("HAS_NCCL") = false;
    py::class_<NoNccl>(m, "NcclCommunicator");
}

PeerTransports peer_transports(const py::handle& comm) {
    if (comm.is_none()) return {};
    throw std::runtime_error("this build of refit_engine has no NCCL transport");
}

}  // namespace refit
