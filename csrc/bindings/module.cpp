// The Python module refit_engine._core: the only place that knows about Python, besides the
// one binding file per area it calls.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // ranks (std::vector) in the PlanError translation

#include "bindings/bindings.h"
#include "plan/error.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
    m.doc() = "refit_engine C++ core: plan compiler and executors (no torch inside)";

    // PlanError -> refit_engine.errors.RefitError(reason, tensor=..., ranks=...).
    py::register_exception_translator([](std::exception_ptr thrown) {
        try {
            if (thrown) std::rethrow_exception(thrown);
        } catch (const refit::PlanError& e) {
            py::object cls = py::module_::import("refit_engine.errors").attr("RefitError");
            py::object err = cls(e.reason(), py::arg("tensor") = e.tensor(),
                                 py::arg("ranks") = e.ranks());
            PyErr_SetObject(cls.ptr(), err.ptr());
        }
    });

    refit::bind_plan(m);
    refit::bind_cpu(m);
    refit::bind_transform(m);
    refit::bind_cuda(m);
}
