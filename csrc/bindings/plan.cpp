// Bindings of the plan compiler. Layout tables cross as int64 NumPy arrays (one row per
// tensor, buffer or piece, and a flat array of holders), plans come back as int64 arrays with
// the fields of Segment and Message as columns; every table's columns are plan/schema.h's,
// exported by name (TENSOR_FIELDS, ..., MESSAGE_FIELDS).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <iterator>
#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "plan/error.h"
#include "plan/planner.h"
#include "plan/schema.h"
#include "plan/validate.h"

namespace py = pybind11;

namespace refit {

namespace {

using schema::BufferCols;
using schema::PieceCols;
using schema::TensorCols;

// Short repr of a bad argument, for error messages.
std::string shown(const py::handle& value) {
    std::string text = py::repr(value).cast<std::string>();
    return text.size() > 60 ? text.substr(0, 57) + "..." : text;
}

// An integer argument (bucket_bytes, ranks_per_node): a Python int or anything usable as one
// (NumPy integers), within int64. Anything else is a RefitError naming the argument, rather
// than pybind11's TypeError listing overloads or an OverflowError.
int64_t int64_arg(const py::handle& value, const char* what) {
    if (PyBool_Check(value.ptr())) {
        throw PlanError("*", {}, std::string(what) + " must be an integer, got " + shown(value));
    }
    PyObject* index = PyNumber_Index(value.ptr());
    if (!index) {
        PyErr_Clear();
        throw PlanError("*", {}, std::string(what) + " must be an integer, got " + shown(value));
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        throw PlanError("*", {}, std::string(what) + " " + shown(value) +
                                     " is out of range (a 64-bit integer)");
    }
    return int64_t(v);
}

// Aligned, C-contiguous int64: what the tables are read as (an unaligned array would be read
// through misaligned int64 loads).
constexpr int kAligned = py::detail::npy_api::NPY_ARRAY_ALIGNED_;
using AlignedInt64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast | kAligned>;

// The tensor table (copied into TensorSpecs, so it may be converted): a (n, cols) array of
// integers of any width. Floats, booleans and objects are refused rather than truncated.
AlignedInt64Array tensor_table(const py::handle& table, int cols) {
    py::array array = py::array::ensure(table);
    const std::string want = "tensor table must be an integer array of shape (n, " +
                             std::to_string(cols) + ")";
    if (!array) throw PlanError("*", {}, want + ", got " + shown(table));
    const char kind = array.dtype().kind();
    if ((kind != 'i' && kind != 'u') || array.ndim() != 2 || array.shape(1) != cols) {
        throw PlanError("*", {}, want + ", got dtype " + shown(array.dtype()) + " and shape " +
                                     shown(py::tuple(array.attr("shape"))));
    }
    return AlignedInt64Array::ensure(array);
}

bool usable_in_place(const py::array& array) {
    return py::isinstance<py::array_t<int64_t>>(array) &&
           (array.flags() & py::array::c_style) && (array.flags() & kAligned);
}

// A (n, cols) C-contiguous, aligned int64 array, used in place (no conversion, so no hidden
// copy whose memory could vanish under the Planner's views; the Planner keeps the arrays alive).
const int64_t* table_rows(const py::array& table, int cols, const char* what, int64_t& n) {
    if (!usable_in_place(table) || table.ndim() != 2 || table.shape(1) != cols) {
        throw PlanError("*", {}, std::string(what) + " table must be an aligned, C-contiguous "
                                 "int64 array of shape (n, " + std::to_string(cols) + ")");
    }
    n = table.shape(0);
    return static_cast<const int64_t*>(table.data());
}

// An aligned, C-contiguous 1-D int64 array, used in place like table_rows.
const int64_t* flat_items(const py::array& array, const char* what, int64_t& n) {
    if (!usable_in_place(array) || array.ndim() != 1) {
        throw PlanError("*", {}, std::string(what) + " must be an aligned, C-contiguous 1-D "
                                                     "int64 array");
    }
    n = array.shape(0);
    return static_cast<const int64_t*>(array.data());
}

Side make_side(std::vector<std::string> names, const py::object& tensor_rows,
               const py::array& buffers, const py::array& pieces, const py::array& holders) {
    Side side;
    side.names = std::move(names);
    const AlignedInt64Array tensors = tensor_table(tensor_rows, TensorCols::kCount);
    int64_t n = tensors.shape(0);
    const int64_t* row = tensors.data();
    side.tensors.resize(n);
    for (int64_t i = 0; i < n; ++i, row += TensorCols::kCount) {
        TensorSpec& t = side.tensors[i];
        const std::string name = i < int64_t(side.names.size()) ? side.names[i] : "*";
        const int64_t ndim = row[TensorCols::kNdim], itemsize = row[TensorCols::kItemsize];
        if (ndim < 0 || ndim > kMaxDims) {
            throw PlanError(name, {}, "tensors of more than " + std::to_string(kMaxDims) +
                                          " dimensions are not supported");
        }
        if (itemsize <= 0 || itemsize > 64) {  // the widest dtype is 16 bytes
            throw PlanError(name, {}, "element size " + std::to_string(itemsize) + " is not valid");
        }
        t.ndim = int32_t(ndim);
        t.itemsize = int32_t(itemsize);
        t.dtype_code = row[TensorCols::kDtypeCode];
        for (int d = 0; d < kMaxDims; ++d) t.shape[d] = row[TensorCols::kShape + d];
    }
    // Buffer and Piece are the row layouts of their tables (schema.h asserts it): view the
    // rows in place.
    row = table_rows(buffers, BufferCols::kCount, "buffer", n);
    side.buffers = View<Buffer>(reinterpret_cast<const Buffer*>(row), size_t(n));
    row = table_rows(pieces, PieceCols::kCount, "piece", n);
    side.pieces = View<Piece>(reinterpret_cast<const Piece*>(row), size_t(n));
    row = flat_items(holders, "holders", n);
    side.holders = View<int64_t>(row, size_t(n));
    return side;
}

// Copies a vector of int64-only structs into a (n, fields) array.
template <typename T>
py::array_t<int64_t> as_array(const std::vector<T>& items, int fields) {
    py::array_t<int64_t> out({py::ssize_t(items.size()), py::ssize_t(fields)});
    if (!items.empty()) std::memcpy(out.mutable_data(), items.data(), items.size() * sizeof(T));
    return out;
}

py::dict plan_to_dict(const RankPlan& plan) {
    py::dict d;
    d["rank"] = plan.rank;
    d["local"] = as_array(plan.local, schema::kSegmentCols);
    d["send"] = as_array(plan.send, schema::kSegmentCols);
    d["recv"] = as_array(plan.recv, schema::kSegmentCols);
    d["send_messages"] = as_array(plan.send_messages, schema::kMessageCols);
    d["recv_messages"] = as_array(plan.recv_messages, schema::kMessageCols);
    d["send_staging_bytes"] = plan.send_staging_bytes;
    d["recv_staging_bytes"] = plan.recv_staging_bytes;
    d["num_buckets"] = plan.num_buckets;
    return d;
}

}  // namespace

void bind_plan(py::module_& m) {
    m.attr("MAX_DIMS") = kMaxDims;
    // The input tables' names as tuples; SEGMENT_FIELDS and MESSAGE_FIELDS stay the lists
    // they have always been (callers wrap them in tuple()).
    auto fields = [](const std::vector<std::string>& names) { return py::tuple(py::cast(names)); };
    m.attr("TENSOR_FIELDS") = fields(schema::tensor_fields());
    m.attr("BUFFER_FIELDS") = fields(schema::buffer_fields());
    m.attr("PIECE_FIELDS") = fields(schema::piece_fields());
    m.attr("SEGMENT_FIELDS") = schema::segment_fields();
    m.attr("MESSAGE_FIELDS") = schema::message_fields();
    // Dtype names by code, as the planner's messages name them (checked by dtypes.py).
    m.attr("DTYPE_NAMES") = py::tuple(py::cast(
        std::vector<std::string>(std::begin(kDtypeNames), std::end(kDtypeNames))));

    py::class_<Planner>(m, "Planner", "Validated, indexed layouts of both sides; compiles plans.")
        .def(py::init([](std::vector<std::string> src_names, const py::object& src_tensors,
                         const py::array& src_buffers, const py::array& src_pieces,
                         const py::array& src_holders, std::vector<std::string> dst_names,
                         const py::object& dst_tensors, const py::array& dst_buffers,
                         const py::array& dst_pieces, const py::array& dst_holders,
                         const py::object& bucket_bytes, const py::object& ranks_per_node) {
                 Side src = make_side(std::move(src_names), src_tensors, src_buffers, src_pieces,
                                      src_holders);
                 Side dst = make_side(std::move(dst_names), dst_tensors, dst_buffers, dst_pieces,
                                      dst_holders);
                 PlanOptions options;  // range-checked by the Planner
                 options.bucket_bytes = int64_arg(bucket_bytes, "bucket_bytes");
                 options.ranks_per_node = int64_arg(ranks_per_node, "ranks_per_node");
                 py::gil_scoped_release release;
                 return new Planner(std::move(src), std::move(dst), options);
             }),
             py::arg("src_names"), py::arg("src_tensors"), py::arg("src_buffers"),
             py::arg("src_pieces"), py::arg("src_holders"), py::arg("dst_names"),
             py::arg("dst_tensors"), py::arg("dst_buffers"), py::arg("dst_pieces"),
             py::arg("dst_holders"), py::arg("bucket_bytes"), py::arg("ranks_per_node") = py::int_(0),
             // The Planner reads the buffer, piece and holder tables in place: keep them alive.
             py::keep_alive<1, 4>(), py::keep_alive<1, 5>(), py::keep_alive<1, 6>(),
             py::keep_alive<1, 9>(), py::keep_alive<1, 10>(), py::keep_alive<1, 11>())
        .def_property_readonly("ranks", &Planner::ranks)
        .def_property_readonly("timings", &Planner::timings,
                               "(phase, seconds) of validating and indexing, in order.")
        .def(
            "plan_rank",
            [](const Planner& self, int64_t rank) {
                RankPlan plan;
                {
                    py::gil_scoped_release release;
                    plan = self.plan_rank(rank);
                }
                return plan_to_dict(plan);
            },
            py::arg("rank"), "The plan of one rank as a dict of int64 arrays.")
        .def("plan_all", [](const Planner& self) {
            std::vector<RankPlan> plans;
            {
                py::gil_scoped_release release;
                plans = self.plan_all();
            }
            py::list out;
            for (const RankPlan& plan : plans) out.append(plan_to_dict(plan));
            return out;
        }, "Every rank's plan, in rank order.");
}

}  // namespace refit
