// The seam between the executor's bindings and the transports' (CUDA builds only): each
// transport's binding file turns the Python object given as an executor's `comm` into the
// transport of each peer, so cuda.cpp never names a transport.
#pragma once

#include <pybind11/pybind11.h>

#include "transport/transport.h"

namespace refit {

// Registers the NCCL transport's Python API (nccl.cpp, or nccl_stub.cpp without nccl.h).
void bind_nccl(pybind11::module_& m);
// Registers the CUDA IPC transport's Python API (ipc.cpp): exports, mappings, orderings.
void bind_ipc(pybind11::module_& m);
// The transports an executor built with `comm` uses: none for None, otherwise every peer of
// the communicator over it. Raises TypeError for anything else.
PeerTransports peer_transports(const pybind11::handle& comm);

}  // namespace refit
