#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace refit {

// An int64 NumPy array as the bindings take tables, columns and address lists (converted to
// C order and int64 if it is not already).
using Int64Array = pybind11::array_t<int64_t, pybind11::array::c_style | pybind11::array::forcecast>;

void bind_plan(pybind11::module_& m);
void bind_cpu(pybind11::module_& m);
void bind_cuda(pybind11::module_& m);  // defined in cuda.cpp or cuda_stub.cpp

}  // namespace refit
