// NCCL through a function table filled by dlopen("libnccl.so.2") at run time, so the process
// shares the libnccl that torch already loaded (one NCCL per process) and nothing is linked
// at build time: only nccl.h (from the nvidia-nccl wheel) is needed to compile. Its calls are
// checked with REFIT_NCCL_CHECK (common/check.h).
#pragma once

#include <nccl.h>

#include <stdexcept>
#include <string>

namespace refit {

struct NcclApi {
    decltype(&ncclGetUniqueId) get_unique_id = nullptr;
    decltype(&ncclCommInitRankConfig) comm_init_rank_config = nullptr;
    decltype(&ncclCommDestroy) comm_destroy = nullptr;
    decltype(&ncclCommAbort) comm_abort = nullptr;
    decltype(&ncclCommGetAsyncError) comm_get_async_error = nullptr;
    decltype(&ncclSend) send = nullptr;
    decltype(&ncclRecv) recv = nullptr;
    decltype(&ncclGroupStart) group_start = nullptr;
    decltype(&ncclGroupEnd) group_end = nullptr;
    decltype(&ncclGetErrorString) error_string = nullptr;
    decltype(&ncclGetVersion) get_version = nullptr;
    std::string path;
};

// The loaded table (loads on first use). `path` overrides the library: empty means
// $REFIT_ENGINE_NCCL_LIBRARY, else "libnccl.so.2" (found through the process's loaded libraries
// first, so torch's NCCL is reused). Throws std::runtime_error if it cannot be loaded.
const NcclApi& nccl(const std::string& path = "");

}  // namespace refit
