// The NCCL transport: a communicator created from a unique id the caller exchanged (over its
// torch.distributed group), through the dlopen'ed NCCL of nccl_api.h. One bucket's messages
// are one NCCL group of send/recv, so their order within the bucket cannot deadlock.
#pragma once

#include <nccl.h>

#include <cstdint>
#include <string>

#include "transport/transport.h"

namespace refit {

class NcclTransport final : public Transport {
   public:
    static std::string unique_id();  // NCCL_UNIQUE_ID_BYTES bytes
    NcclTransport(const std::string& id, int nranks, int rank, int device);
    ~NcclTransport() override;
    NcclTransport(const NcclTransport&) = delete;
    NcclTransport& operator=(const NcclTransport&) = delete;

    ncclComm_t get() const { return comm_; }
    int rank() const { return rank_; }
    int size() const { return nranks_; }
    // ncclSuccess, or the asynchronous error NCCL recorded (a peer died, a network error);
    // ncclInvalidUsage once aborted.
    ncclResult_t async_result() const;

    std::string name() const override { return "NCCL communicator"; }
    void begin_exchange() override;
    void end_exchange() override;
    void post_recv(int64_t peer, void* dst, size_t bytes, cudaStream_t stream) override;
    void post_send(int64_t peer, const void* src, size_t bytes, cudaStream_t stream) override;
    std::string async_error() const override;
    void abort() override;
    bool aborted() const override { return comm_ == nullptr; }

   private:
    ncclComm_t comm_ = nullptr;
    int rank_;
    int nranks_;
};

}  // namespace refit
