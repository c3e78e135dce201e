// An NCCL communicator created from a unique id the caller exchanged (over its torch.distributed
// group), through the dlopen'ed NCCL of nccl_api.h.
#pragma once

#include <nccl.h>

#include <string>

namespace refit {

class NcclCommunicator {
   public:
    static std::string unique_id();  // NCCL_UNIQUE_ID_BYTES bytes
    NcclCommunicator(const std::string& id, int nranks, int rank, int device);
    ~NcclCommunicator();
    NcclCommunicator(const NcclCommunicator&) = delete;
    NcclCommunicator& operator=(const NcclCommunicator&) = delete;

    ncclComm_t get() const { return comm_; }
    int rank() const { return rank_; }
    int size() const { return nranks_; }
    // ncclSuccess, or the asynchronous error NCCL recorded (a peer died, a network error).
    ncclResult_t async_error() const;
    // Ends every operation in flight; the communicator is unusable afterwards.
    void abort();
    bool aborted() const { return comm_ == nullptr; }

   private:
    ncclComm_t comm_ = nullptr;
    int rank_;
    int nranks_;
};

}  // namespace refit
