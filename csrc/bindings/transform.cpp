// Bindings of the transform tables (transform/transform_table.h): the CPU path here, the CUDA
// table in cuda.cpp (as_transforms is shared). Columns cross as int64 NumPy arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "bindings/bindings.h"
#include "transform/formats.h"
#include "transform/transform_table.h"

namespace py = pybind11;

namespace refit {

HostTransforms as_transforms(const py::dict& columns) {
    auto col = [&](const char* name) {
        if (!columns.contains(name)) throw std::invalid_argument(std::string("transform table has no column ") + name);
        Int64Array a = columns[name].cast<Int64Array>();
        return std::vector<int64_t>(a.data(), a.data() + a.size());
    };
    return {col("src"),  col("dst"),     col("src_pitch"), col("dst_pitch"), col("rows"),
            col("cols"), col("src_fmt"), col("dst_fmt"),   col("scale"),     col("scale_pitch")};
}

void bind_transform(py::module_& m) {
    py::dict formats;
    formats["fp32"] = int64_t(kFp32);
    formats["bf16"] = int64_t(kBf16);
    formats["fp16"] = int64_t(kFp16);
    formats["fp8_block128"] = int64_t(kFp8Block128);
    formats["mxfp8"] = int64_t(kMxfp8);
    m.attr("TRANSFORM_FORMATS") = formats;
    m.attr("TRANSFORM_FIELDS") = py::make_tuple("src", "dst", "src_pitch", "dst_pitch", "rows",
                                                "cols", "src_fmt", "dst_fmt", "scale",
                                                "scale_pitch");
    m.def(
        "transform_cpu",
        [](const py::dict& columns) {
            HostTransforms t = as_transforms(columns);
            py::gil_scoped_release release;
            transform_cpu(t);
        },
        py::arg("columns"),
        "Run a transform table (dict of int64 columns, TRANSFORM_FIELDS) on host memory.");
}

}  // namespace refit
