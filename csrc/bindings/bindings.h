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
void bind_transform(pybind11::module_& m);

}  // namespace refit

#include "transform/transform_table.h"

namespace refit {

// A transform table from a dict of int64 columns (TRANSFORM_FIELDS), for the CPU path and the
// CUDA table alike (transform.cpp).
HostTransforms as_transforms(const pybind11::dict& columns);

}  // namespace refit
