#include "transport/ipc/ipc_memory.h"

#include <cuda.h>  // driver types only: the driver is reached through the runtime's entry point

#include <map>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "common/check.h"

namespace refit {

namespace {

using PointerGetAttribute = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);

// cuPointerGetAttribute through the runtime, so the module never links libcuda (a CPU machine
// that built the CUDA code can still import it).
PointerGetAttribute pointer_get_attribute() {
    static PointerGetAttribute fn = [] {
        void* f = nullptr;
        cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
        REFIT_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuPointerGetAttribute", &f, 12000,
                                                          cudaEnableDefault, &found));
        if (found != cudaDriverEntryPointSuccess || !f) {
            throw std::runtime_error("CUDA driver has no cuPointerGetAttribute");
        }
        return reinterpret_cast<PointerGetAttribute>(f);
    }();
    return fn;
}

template <typename T>
T attribute(uintptr_t address, CUpointer_attribute what, const char* name) {
    T value{};
    const CUresult res = pointer_get_attribute()(&value, what, CUdeviceptr(address));
    if (res != CUDA_SUCCESS) {
        throw std::invalid_argument("cannot query device address 0x" + std::to_string(address) +
                                    " (" + name + ": CUDA driver error " + std::to_string(res) +
                                    "): not CUDA device memory");
    }
    return value;
}

struct Registry {
    std::mutex mutex;
    std::map<std::pair<std::string, int>, std::weak_ptr<IpcMapping>> open;
};

Registry& registry() {
    static Registry* r = new Registry;  // never destroyed: mappings may outlive static teardown
    return *r;
}

}  // namespace

IpcExport export_allocation(uintptr_t address) {
    const int capable = attribute<int>(address, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                                       "IPC capability");
    if (!capable) {
        throw std::invalid_argument(
            "its memory cannot be shared over CUDA IPC (not a cudaMalloc allocation: expandable "
            "segments / VMM or a cudaMallocAsync pool; unset PYTORCH_CUDA_ALLOC_CONF="
            "expandable_segments:True, or use transport='nccl')");
    }
    const auto start = attribute<CUdeviceptr>(address, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                                              "allocation start");
    const auto size = attribute<size_t>(address, CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                                        "allocation size");
    cudaIpcMemHandle_t handle;
    REFIT_CUDA_CHECK(cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(start)));
    IpcExport out;
    out.handle.assign(reinterpret_cast<const char*>(&handle), sizeof(handle));
    out.offset = int64_t(address - uintptr_t(start));
    out.allocation_bytes = int64_t(size);
    return out;
}

std::shared_ptr<IpcMapping> IpcMapping::open(const std::string& handle, int device) {
    if (handle.size() != sizeof(cudaIpcMemHandle_t)) {
        throw std::invalid_argument("an IPC memory handle has " +
                                    std::to_string(sizeof(cudaIpcMemHandle_t)) + " bytes, not " +
                                    std::to_string(handle.size()));
    }
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto& slot = r.open[{handle, device}];
    if (auto live = slot.lock()) return live;
    cudaIpcMemHandle_t h;
    std::copy(handle.begin(), handle.end(), reinterpret_cast<char*>(&h));
    REFIT_CUDA_CHECK(cudaSetDevice(device));
    void* base = nullptr;
    REFIT_CUDA_CHECK(cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess));
    std::shared_ptr<IpcMapping> mapping(new IpcMapping(base, handle, device));
    slot = mapping;
    return mapping;
}

IpcMapping::~IpcMapping() {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.open.find({handle_, device_});
    if (it != r.open.end() && it->second.expired()) r.open.erase(it);
    // NOTE: destructors cannot throw; a failed unmap (the context is gone) is dropped.
    int current = 0;
    if (cudaGetDevice(&current) == cudaSuccess && current != device_) cudaSetDevice(device_);
    cudaIpcCloseMemHandle(base_);
    if (current != device_) cudaSetDevice(current);
}

}  // namespace refit
