// Bindings of the CPU executor: segment tables as int64 arrays, memory as integer addresses.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "cpu/copy.h"
#include "plan/error.h"

namespace py = pybind11;

namespace refit {

namespace {

// Addresses cross as int64 and are read in place as pointers: this runs for every bucket of
// every refit, so no per-call conversion of int64 arrays (other integer arrays are converted).
static_assert(sizeof(uint8_t*) == sizeof(int64_t), "addresses must be 64-bit");

constexpr int kAligned = py::detail::npy_api::NPY_ARRAY_ALIGNED_;
using AlignedInt64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast | kAligned>;

std::string shown(const py::handle& value) {
    std::string text = py::repr(value).cast<std::string>();
    return text.size() > 60 ? text.substr(0, 57) + "..." : text;
}

// An integer array of `ndim` dimensions (`cols` columns when 2-D) as aligned, C-contiguous
// int64, converted only when it is not already. Floats, booleans and objects are refused
// (TypeError) rather than truncated, unless empty; a wrong shape is a ValueError.
AlignedInt64Array integer_array(const py::handle& value, int ndim, int cols, const char* what) {
    py::array array = py::array::ensure(value);
    if (!array) throw py::type_error(std::string(what) + " must be an integer array, got " + shown(value));
    const char kind = array.dtype().kind();
    if (kind != 'i' && kind != 'u' && array.size() > 0) {  // [] is float64 to NumPy
        throw py::type_error(std::string(what) + " must be an integer array, got dtype " +
                             shown(array.dtype()));
    }
    if (array.ndim() != ndim || (ndim == 2 && array.shape(1) != cols)) {
        throw py::value_error(std::string(what) + " must have shape " +
                              (ndim == 2 ? "(n, " + std::to_string(cols) + ")" : "(n,)") +
                              ", got " + shown(py::tuple(array.attr("shape"))));
    }
    return AlignedInt64Array::ensure(array);
}

uint8_t* const* as_pointers(const AlignedInt64Array& addresses) {
    return reinterpret_cast<uint8_t* const*>(addresses.data());
}

// The thread count: an integer from 0 to kMaxThreads (0 and 1 both copy on the calling
// thread); anything else is a RefitError naming it (not pybind11's TypeError or OverflowError).
constexpr int64_t kMaxThreads = 4096;

int thread_count(const py::handle& value) {
    const std::string want =
        "threads must be an integer from 0 to " + std::to_string(kMaxThreads) + ", got ";
    PyObject* index = PyBool_Check(value.ptr()) ? nullptr : PyNumber_Index(value.ptr());
    if (!index) {
        PyErr_Clear();
        throw PlanError("*", {}, want + shown(value));
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (overflow || (v == -1 && PyErr_Occurred()) || v < 0 || v > kMaxThreads) {
        PyErr_Clear();
        throw PlanError("*", {}, want + shown(value));
    }
    return int(v);
}

}  // namespace

void bind_cpu(py::module_& m) {
    m.def(
        "cpu_copy_segments",
        [](const py::object& segment_table, const py::object& src_addresses, int64_t src_staging,
           const py::object& dst_addresses, int64_t dst_staging, const py::object& thread_arg) {
            const AlignedInt64Array segments =
                integer_array(segment_table, 2, kSegmentFields, "segments");
            const AlignedInt64Array src_buffers =
                integer_array(src_addresses, 1, 0, "source addresses");
            const AlignedInt64Array dst_buffers =
                integer_array(dst_addresses, 1, 0, "destination addresses");
            const int threads = thread_count(thread_arg);
            const CpuSide src{as_pointers(src_buffers), int64_t(src_buffers.size()),
                              reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(src_staging))};
            const CpuSide dst{as_pointers(dst_buffers), int64_t(dst_buffers.size()),
                              reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(dst_staging))};
            const auto* segs = reinterpret_cast<const Segment*>(segments.data());
            py::gil_scoped_release release;
            cpu_copy_segments(segs, segments.shape(0), src, dst, threads);
        },
        py::arg("segments"), py::arg("src_buffers"), py::arg("src_staging"),
        py::arg("dst_buffers"), py::arg("dst_staging"), py::arg("threads") = py::int_(1),
        "Run pitched copies between raw addresses (buffer index -1 means staging). Raises "
        "IndexError for a buffer that is not bound and ValueError for a malformed segment, "
        "before copying anything.");
}

}  // namespace refit
