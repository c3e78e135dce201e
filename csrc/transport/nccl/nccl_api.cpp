#include "transport/nccl/nccl_api.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

namespace refit {

namespace {

template <typename F>
void load(void* handle, const char* name, F& slot) {
    slot = reinterpret_cast<F>(dlsym(handle, name));
    if (!slot) throw std::runtime_error(std::string("libnccl has no symbol ") + name);
}

}  // namespace

const NcclApi& nccl(const std::string& path) {
    static NcclApi api;
    static std::once_flag once;
    static std::string failure;
    std::call_once(once, [&]() {
        std::string lib = path;
        if (lib.empty()) {
            const char* env = std::getenv("REFIT_ENGINE_NCCL_LIBRARY");
            lib = env && *env ? env : "libnccl.so.2";
        }
        // RTLD_NOLOAD first: reuse the NCCL torch (or anyone) already loaded.
        void* handle = dlopen(lib.c_str(), RTLD_NOW | RTLD_NOLOAD);
        if (!handle) handle = dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL);
        if (!handle) {
            failure = "cannot load " + lib + ": " + dlerror() +
                      " (import torch first, or set REFIT_ENGINE_NCCL_LIBRARY)";
            return;
        }
        try {
            load(handle, "ncclGetUniqueId", api.get_unique_id);
            load(handle, "ncclCommInitRankConfig", api.comm_init_rank_config);
            load(handle, "ncclCommDestroy", api.comm_destroy);
            load(handle, "ncclCommAbort", api.comm_abort);
            load(handle, "ncclCommGetAsyncError", api.comm_get_async_error);
            load(handle, "ncclSend", api.send);
            load(handle, "ncclRecv", api.recv);
            load(handle, "ncclGroupStart", api.group_start);
            load(handle, "ncclGroupEnd", api.group_end);
            load(handle, "ncclGetErrorString", api.error_string);
            load(handle, "ncclGetVersion", api.get_version);
            api.path = lib;
        } catch (const std::exception& e) {
            failure = e.what();
        }
    });
    if (!failure.empty()) throw std::runtime_error(failure);
    return api;
}

}  // namespace refit
