#include "transport/ipc/ipc_ordering.h"

#include <cuda/atomic>

#include <random>
#include <stdexcept>

#include "common/check.h"

namespace refit {

namespace {

std::string event_handle(cudaEvent_t event) {
    cudaIpcEventHandle_t h;
    REFIT_CUDA_CHECK(cudaIpcGetEventHandle(&h, event));
    return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

cudaEvent_t open_event(const std::string& handle) {
    if (handle.size() != sizeof(cudaIpcEventHandle_t)) {
        throw std::invalid_argument("an IPC event handle has " +
                                    std::to_string(sizeof(cudaIpcEventHandle_t)) + " bytes");
    }
    cudaIpcEventHandle_t h;
    std::copy(handle.begin(), handle.end(), reinterpret_cast<char*>(&h));
    cudaEvent_t e = nullptr;
    REFIT_CUDA_CHECK(cudaIpcOpenEventHandle(&e, h));
    return e;
}

cudaEvent_t interprocess_event() {
    cudaEvent_t e = nullptr;
    REFIT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventInterprocess));
    return e;
}

// Which wait of IpcFlags failed (status word 0).
constexpr int kOwnersLate = 1, kReadersLate = 2, kOwnerLost = 3;

__device__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

using SystemFlag = cuda::atomic_ref<int64_t, cuda::thread_scope_system>;

__device__ void fail(int64_t* block, int* status, int which, int64_t peer_rank) {
    reinterpret_cast<volatile int64_t*>(block)[3] = which;  // copies skip
    volatile int* s = status;
    s[1] = int(peer_rank);
    __threadfence_system();
    s[0] = which;
}

// A flag holds its rank's nonce + epoch, never the epoch alone: memory that is not a live
// peer's flag (a peer that died, its pages gone) matches with probability 2^-64 instead of
// passing a `>=` test. Epochs advance in lockstep, so an exact match is what a wait needs:
// no peer can publish epoch e + 1 before every rank waiting on its epoch e has seen it.
// Peers' blocks: n addresses, n ranks, n nonces in `peers`.
__device__ int64_t flag_of(const int64_t* peers, int64_t count, int64_t i, int mine) {
    return SystemFlag(reinterpret_cast<int64_t*>(peers[i])[mine]).load(cuda::memory_order_acquire);
}

// Publishes nonce + `epoch` in slot `mine` of this rank's block, then spins until slot `mine`
// of every peer's block holds that peer's nonce + `epoch`.
__device__ bool publish_and_wait(int64_t* block, int64_t nonce, int mine, int64_t epoch,
                                 const int64_t* peers, int64_t count, int64_t timeout_ns,
                                 int* status, int which) {
    // Everything this stream did before (the previous kernels' writes) is visible before the
    // flag is: stream order ends them before this kernel; the fence orders this thread's view.
    __threadfence_system();
    SystemFlag(block[mine]).store(int64_t(uint64_t(nonce) + uint64_t(epoch)),
                                  cuda::memory_order_release);
    const uint64_t start = global_ns();
    for (int64_t i = 0; i < count; ++i) {
        const int64_t want = int64_t(uint64_t(peers[2 * count + i]) + uint64_t(epoch));
        while (flag_of(peers, count, i, mine) != want) {
            if (int64_t(global_ns() - start) > timeout_ns) {
                fail(block, status, which, peers[count + i]);
                return false;
            }
            __nanosleep(256);
        }
    }
    return true;
}

__global__ void enter_kernel(int64_t* block, int64_t nonce, const int64_t* owners,
                             int64_t count, int64_t timeout_ns, int* status) {
    if (*static_cast<volatile int*>(status) != 0) return;  // an earlier refit failed
    const int64_t epoch = block[2] + 1;
    block[2] = epoch;
    publish_and_wait(block, nonce, 0, epoch, owners, count, timeout_ns, status, kOwnersLate);
}

__global__ void leave_kernel(int64_t* block, int64_t nonce, const int64_t* owners,
                             int64_t owner_count, const int64_t* readers, int64_t count,
                             int64_t timeout_ns, int* status) {
    if (*static_cast<volatile int*>(status) != 0) return;
    const int64_t epoch = block[2];
    // Every owner read from must still be there, its flag unchanged: one that died during
    // the copies (its memory gone) makes this refit fail rather than pass what it read.
    for (int64_t i = 0; i < owner_count; ++i) {
        const int64_t want = int64_t(uint64_t(owners[2 * owner_count + i]) + uint64_t(epoch));
        if (flag_of(owners, owner_count, i, 0) != want) {
            fail(block, status, kOwnerLost, owners[owner_count + i]);
            return;
        }
    }
    publish_and_wait(block, nonce, 1, epoch, readers, count, timeout_ns, status, kReadersLate);
}

}  // namespace

IpcEvents::IpcEvents(int device) : device_(device) {
    REFIT_CUDA_CHECK(cudaSetDevice(device_));
    ready_ = interprocess_event();
    done_ = interprocess_event();
    ready_handle_ = event_handle(ready_);
    done_handle_ = event_handle(done_);
}

IpcEvents::~IpcEvents() {
    for (auto* list : {&owners_ready_, &readers_done_}) {
        for (cudaEvent_t e : *list) cudaEventDestroy(e);
    }
    for (cudaEvent_t e : {ready_, done_}) {
        if (e) cudaEventDestroy(e);
    }
}

void IpcEvents::connect(const std::vector<std::string>& owners_ready,
                        const std::vector<std::string>& readers_done) {
    REFIT_CUDA_CHECK(cudaSetDevice(device_));
    for (const auto& h : owners_ready) owners_ready_.push_back(open_event(h));
    for (const auto& h : readers_done) readers_done_.push_back(open_event(h));
}

void IpcEvents::signal_ready(cudaStream_t stream) {
    REFIT_CUDA_CHECK(cudaEventRecord(ready_, stream));
}

void IpcEvents::wait_owners(cudaStream_t stream) {
    for (cudaEvent_t e : owners_ready_) REFIT_CUDA_CHECK(cudaStreamWaitEvent(stream, e, 0));
}

void IpcEvents::signal_done(cudaStream_t stream) {
    REFIT_CUDA_CHECK(cudaEventRecord(done_, stream));
}

void IpcEvents::wait_readers(cudaStream_t stream) {
    for (cudaEvent_t e : readers_done_) REFIT_CUDA_CHECK(cudaStreamWaitEvent(stream, e, 0));
}

IpcFlags::IpcFlags(int device, double timeout_s)
    : device_(device), timeout_ns_(int64_t(timeout_s * 1e9)) {
    REFIT_CUDA_CHECK(cudaSetDevice(device_));
    void* block = nullptr;
    // NOTE: its own cudaMalloc (not a caching allocator's block), so the handle names exactly
    // this block and the peers' flags are at offset 0.
    REFIT_CUDA_CHECK(cudaMalloc(&block, 4 * sizeof(int64_t)));
    block_ = static_cast<int64_t*>(block);
    REFIT_CUDA_CHECK(cudaMemset(block_, 0, 4 * sizeof(int64_t)));
    cudaIpcMemHandle_t h;
    REFIT_CUDA_CHECK(cudaIpcGetMemHandle(&h, block_));
    handle_.assign(reinterpret_cast<const char*>(&h), sizeof(h));
    std::random_device entropy;
    nonce_ = int64_t((uint64_t(entropy()) << 32) ^ uint64_t(entropy()));
    void* status = nullptr;
    REFIT_CUDA_CHECK(cudaHostAlloc(&status, 2 * sizeof(int), cudaHostAllocMapped));
    status_ = static_cast<int*>(status);
    status_[0] = status_[1] = 0;
    REFIT_CUDA_CHECK(cudaDeviceSynchronize());  // the zeroed block before any peer looks
}

IpcFlags::~IpcFlags() {
    for (Peers* p : {&owners_, &readers_}) {
        if (p->device) cudaFree(p->device);
    }
    if (block_) cudaFree(block_);
    if (status_) cudaFreeHost(status_);
}

void IpcFlags::upload(Peers& peers, const std::vector<int64_t>& ranks,
                      const std::vector<std::string>& handles,
                      const std::vector<int64_t>& nonces) {
    if (ranks.size() != handles.size() || ranks.size() != nonces.size()) {
        throw std::invalid_argument("one handle and one nonce per peer rank");
    }
    std::vector<int64_t> host;
    for (const auto& h : handles) {
        peers.mappings.push_back(IpcMapping::open(h, device_));
        host.push_back(int64_t(peers.mappings.back()->base()));
    }
    host.insert(host.end(), ranks.begin(), ranks.end());
    host.insert(host.end(), nonces.begin(), nonces.end());
    peers.count = int64_t(ranks.size());
    if (host.empty()) return;
    void* dev = nullptr;
    REFIT_CUDA_CHECK(cudaMalloc(&dev, host.size() * sizeof(int64_t)));
    peers.device = static_cast<int64_t*>(dev);
    REFIT_CUDA_CHECK(cudaMemcpy(dev, host.data(), host.size() * sizeof(int64_t),
                                cudaMemcpyHostToDevice));
}

void IpcFlags::connect(const std::vector<int64_t>& owner_ranks,
                       const std::vector<std::string>& owners,
                       const std::vector<int64_t>& owner_nonces,
                       const std::vector<int64_t>& reader_ranks,
                       const std::vector<std::string>& readers,
                       const std::vector<int64_t>& reader_nonces) {
    REFIT_CUDA_CHECK(cudaSetDevice(device_));
    upload(owners_, owner_ranks, owners, owner_nonces);
    upload(readers_, reader_ranks, readers, reader_nonces);
}

void IpcFlags::enter(cudaStream_t stream) {
    enter_kernel<<<1, 1, 0, stream>>>(block_, nonce_, owners_.device, owners_.count,
                                      timeout_ns_, status_);
    REFIT_CUDA_CHECK(cudaGetLastError());
}

void IpcFlags::leave(cudaStream_t stream) {
    leave_kernel<<<1, 1, 0, stream>>>(block_, nonce_, owners_.device, owners_.count,
                                      readers_.device, readers_.count, timeout_ns_, status_);
    REFIT_CUDA_CHECK(cudaGetLastError());
}

std::string IpcFlags::error() const {
    const volatile int* s = status_;
    const int which = s[0];
    if (which == 0) return "";
    const int peer = s[1];
    const double seconds = double(timeout_ns_) / 1e9;
    if (which == kOwnerLost) {
        return "CUDA IPC: rank " + std::to_string(peer) + " went away while this rank read its " +
               "memory (its flag changed during the refit: the peer died); what was read is " +
               "not trusted";
    }
    if (which == kOwnersLate) {
        return "CUDA IPC: rank " + std::to_string(peer) + " did not publish its sources within " +
               std::to_string(seconds) + " s (the peer died, or is late into this refit)";
    }
    return "CUDA IPC: rank " + std::to_string(peer) + " did not finish reading this rank's " +
           "memory within " + std::to_string(seconds) + " s (the peer died, or is stuck)";
}

}  // namespace refit
