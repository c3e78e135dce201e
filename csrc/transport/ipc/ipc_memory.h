// CUDA IPC memory: exporting the allocation that holds a tensor, and mapping a peer's.
//
// A CUDA IPC handle names a whole cudaMalloc allocation, never an address inside one, and a
// tensor of torch's caching allocator or of CuPy's pool lives at an offset inside a larger
// block. So an export is (the allocation's handle, the tensor's offset in it); the peer maps
// the allocation once and adds the offset. Memory that legacy CUDA IPC cannot export
// (expandable segments / VMM, cudaMallocAsync pools) is refused with the reason.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace refit {

struct IpcExport {
    std::string handle;  // the cudaIpcMemHandle_t's bytes (CUDA_IPC_HANDLE_SIZE)
    int64_t offset = 0;  // of the exported address inside the allocation
    int64_t allocation_bytes = 0;
};

// Exports the allocation holding device address `address` (on the current device). Throws
// std::invalid_argument, naming why, when that memory cannot be shared over legacy CUDA IPC.
IpcExport export_allocation(uintptr_t address);

// A peer's allocation mapped into this process (cudaIpcOpenMemHandle). CUDA maps one
// allocation at most once per process, so mappings are shared: open() returns the live
// mapping of the same handle if there is one, and the allocation is unmapped when the last
// owner drops it (plans hold them; dropping a plan closes its handles).
class IpcMapping {
   public:
    static std::shared_ptr<IpcMapping> open(const std::string& handle, int device);
    ~IpcMapping();
    IpcMapping(const IpcMapping&) = delete;
    IpcMapping& operator=(const IpcMapping&) = delete;

    uintptr_t base() const { return reinterpret_cast<uintptr_t>(base_); }

   private:
    IpcMapping(void* base, std::string handle, int device)
        : base_(base), handle_(std::move(handle)), device_(device) {}
    void* base_;
    std::string handle_;
    int device_;
};

}  // namespace refit
