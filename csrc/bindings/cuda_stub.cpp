// Built when CUDA is off: the module still imports and says it has no CUDA (HAS_CUDA False).
#include "bindings/bindings.h"

namespace refit {

void bind_cuda(pybind11::module_& m) {
    m.attr("HAS_CUDA") = false;
    m.attr("HAS_NCCL") = false;
    m.attr("HAS_IPC") = false;
}

}  // namespace refit
