// Error checks that throw with file and line: no CUDA return code is ignored.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define REFIT_CUDA_CHECK(expr)                                                              \
    do {                                                                                    \
        cudaError_t refit_err_ = (expr);                                                    \
        if (refit_err_ != cudaSuccess) {                                                    \
            throw std::runtime_error(std::string("CUDA error at ") + __FILE__ + ":" +       \
                                     std::to_string(__LINE__) + ": " + #expr + ": " +       \
                                     cudaGetErrorString(refit_err_));                       \
        }                                                                                   \
    } while (0)
