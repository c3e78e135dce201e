// The NCCL transport: a communicator created from a unique id the caller exchanged (over its
// torch.distributed group), through the dlopen'ed NCCL of nccl_api.h. One bucket's messages
// are one NCCL group of send/recv, so their order within the bucket cannot deadlock.
//
// The communicator is non-blocking (ncclConfig_t::blocking = 0) so that the host waits on it
// run to a deadline: its creation and each group's end (NCCL launches the group, connecting a
// pair of peers on its first use, on its own thread) return at once and are polled here, up
// to `timeout_s` for the creation and for all groups of one refit together; past it the
// communicator is aborted and the call throws. A blocking communicator would leave a rank
// whose peer never joins (it failed before ncclCommInitRank, or hangs) inside NCCL for ever.
// (ncclCommAbort itself is not bounded by us: NCCL joins its own threads there.)
#pragma once

#include <nccl.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "transport/transport.h"

namespace refit {

class NcclTransport final : public Transport {
   public:
    static std::string unique_id();  // NCCL_UNIQUE_ID_BYTES bytes
    // Waits up to timeout_s for every rank to join; throws (the communicator aborted) if one
    // does not, or if NCCL fails.
    NcclTransport(const std::string& id, int nranks, int rank, int device, double timeout_s);
    ~NcclTransport() override;
    NcclTransport(const NcclTransport&) = delete;
    NcclTransport& operator=(const NcclTransport&) = delete;

    ncclComm_t get() const { return comm_; }
    int rank() const { return rank_; }
    int size() const { return nranks_; }
    double timeout_s() const { return timeout_s_; }
    // ncclSuccess, or the asynchronous error NCCL recorded (a peer died, a network error);
    // ncclInvalidUsage once aborted.
    ncclResult_t async_result() const;

    std::string name() const override { return "NCCL communicator"; }
    void begin_run() override;
    void begin_exchange() override;
    void end_exchange() override;
    void cancel_exchange() noexcept override;
    void post_recv(int64_t peer, void* dst, size_t bytes, cudaStream_t stream) override;
    void post_send(int64_t peer, const void* src, size_t bytes, cudaStream_t stream) override;
    std::string async_error() const override;
    void abort() override;
    bool aborted() const override { return comm_ == nullptr; }

   private:
    // Polls the communicator until NCCL's work in progress (`what`) ends: returns on success,
    // aborts and throws on an error, or when timeout_s has passed `since` (saying `if_late`).
    void wait_ready(const std::string& what, std::chrono::steady_clock::time_point since,
                    const std::string& if_late);

    ncclComm_t comm_ = nullptr;
    int rank_;
    int nranks_;
    double timeout_s_;
    std::chrono::steady_clock::time_point run_started_ = std::chrono::steady_clock::now();
};

}  // namespace refit
