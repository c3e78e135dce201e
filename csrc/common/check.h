// The return-code checks of every CUDA and NCCL call: each failure throws std::runtime_error
// naming the library, file, line, the call and the library's own reason, so no code is ignored
// and every error reads the same.
//
// This header includes neither library: a macro needs its library's declarations only where it
// is expanded (REFIT_CUDA_CHECK: <cuda_runtime.h>; REFIT_NCCL_CHECK: transport/nccl/nccl_api.h,
// whose dlopen'ed table names the error), so CUDA-only code never sees nccl.h.
#pragma once

#include <stdexcept>
#include <string>

namespace refit {

// The one format of a failed check: "<library> error at <file>:<line>: <call>: <reason>".
[[noreturn]] inline void throw_check_failure(const char* library, const char* file, int line,
                                             const char* call, const char* reason) {
    throw std::runtime_error(std::string(library) + " error at " + file + ":" +
                             std::to_string(line) + ": " + call + ": " + reason);
}

}  // namespace refit

#define REFIT_CUDA_CHECK(expr)                                                               \
    do {                                                                                     \
        const cudaError_t refit_err_ = (expr);                                               \
        if (refit_err_ != cudaSuccess) {                                                     \
            ::refit::throw_check_failure("CUDA", __FILE__, __LINE__, #expr,                  \
                                         cudaGetErrorString(refit_err_));                    \
        }                                                                                    \
    } while (0)

// ncclInProgress is not a failure: a non-blocking communicator reports it while an operation
// is still being set up.
#define REFIT_NCCL_CHECK(expr)                                                               \
    do {                                                                                     \
        const ncclResult_t refit_res_ = (expr);                                              \
        if (refit_res_ != ncclSuccess && refit_res_ != ncclInProgress) {                     \
            ::refit::throw_check_failure("NCCL", __FILE__, __LINE__, #expr,                  \
                                         ::refit::nccl().error_string(refit_res_));          \
        }                                                                                    \
    } while (0)
