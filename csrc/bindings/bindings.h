#pragma once

#include <pybind11/pybind11.h>

namespace refit {

void bind_plan(pybind11::module_& m);
void bind_cpu(pybind11::module_& m);
void bind_cuda(pybind11::module_& m);  // defined in cuda.cpp or cuda_stub.cpp

}  // namespace refit
