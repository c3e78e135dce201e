// The two ways ranks that read each other's memory over CUDA IPC keep order (see
// transport/ordering.h for the promise):
//  - IpcEvents: interprocess CUDA events. Each rank records "sources ready" and "reads done"
//    events on its stream and the peers' streams wait on them. A peer can only wait on a
//    record it knows was made, so the caller puts a host barrier between each record and the
//    waits (two per refit): cheap, but a host step.
//  - IpcFlags: device-side flags in IPC-shared memory. One thread on the stream bumps this
//    rank's refit epoch, publishes it ("ready") and spins until every owner it reads from has
//    published the same epoch; at the end it publishes "done" and spins on its readers. No
//    host step, so the whole refit, ordering included, is one CUDA graph. Every spin has a
//    deadline (the GPU's global timer): a dead or late peer sets a host-visible error word
//    that the executor's wait reports and that makes the copy kernels skip their work.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "transport/ipc/ipc_memory.h"
#include "transport/ordering.h"

namespace refit {

class IpcEvents {
   public:
    explicit IpcEvents(int device);
    ~IpcEvents();
    IpcEvents(const IpcEvents&) = delete;
    IpcEvents& operator=(const IpcEvents&) = delete;

    std::string ready_handle() const { return ready_handle_; }
    std::string done_handle() const { return done_handle_; }
    // The "ready" events of the owners this rank reads from, the "done" events of the readers
    // of its memory (handles from their ready_handle() / done_handle()).
    void connect(const std::vector<std::string>& owners_ready,
                 const std::vector<std::string>& readers_done);

    void signal_ready(cudaStream_t stream);
    void wait_owners(cudaStream_t stream);
    void signal_done(cudaStream_t stream);
    void wait_readers(cudaStream_t stream);

   private:
    int device_;
    cudaEvent_t ready_ = nullptr, done_ = nullptr;
    std::string ready_handle_, done_handle_;
    std::vector<cudaEvent_t> owners_ready_, readers_done_;
};

class IpcFlags : public StreamOrdering {
   public:
    IpcFlags(int device, double timeout_s);
    ~IpcFlags() override;
    IpcFlags(const IpcFlags&) = delete;
    IpcFlags& operator=(const IpcFlags&) = delete;

    // This rank's flag block and its random nonce (flags hold nonce + epoch), for the peers'
    // connect().
    std::string handle() const { return handle_; }
    int64_t nonce() const { return nonce_; }
    // Peers by global rank (named in errors), the handles of their flag blocks, their nonces.
    void connect(const std::vector<int64_t>& owner_ranks, const std::vector<std::string>& owners,
                 const std::vector<int64_t>& owner_nonces,
                 const std::vector<int64_t>& reader_ranks, const std::vector<std::string>& readers,
                 const std::vector<int64_t>& reader_nonces);

    void enter(cudaStream_t stream) override;
    void leave(cudaStream_t stream) override;
    std::string error() const override;
    const int64_t* failed_flag() const override { return block_ + 3; }

   private:
    struct Peers {
        std::vector<std::shared_ptr<IpcMapping>> mappings;
        int64_t* device = nullptr;  // n flag-block addresses, then n ranks, then n nonces
        int64_t count = 0;
    };
    void upload(Peers& peers, const std::vector<int64_t>& ranks,
                const std::vector<std::string>& handles, const std::vector<int64_t>& nonces);

    int device_;
    int64_t timeout_ns_;
    // [0] ready epoch, [1] done epoch (read by peers), [2] this rank's epoch, [3] failed (device)
    int64_t* block_ = nullptr;
    std::string handle_;
    int64_t nonce_ = 0;
    int* status_ = nullptr;     // host-mapped: [0] 0 or which wait failed, [1] the late peer
    Peers owners_, readers_;
};

}  // namespace refit
