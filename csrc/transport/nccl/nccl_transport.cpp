#include "nccl/communicator.h"

#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>

#include "cuda/check.h"
#include "nccl/nccl_api.h"

namespace refit {

std::string NcclCommunicator::unique_id() {
    ncclUniqueId id;
    REFIT_NCCL_CHECK(nccl().get_unique_id(&id));
    return std::string(id.internal, sizeof(id.internal));
}

NcclCommunicator::NcclCommunicator(const std::string& id, int nranks, int rank, int device)
    : rank_(rank), nranks_(nranks) {
    if (id.size() != sizeof(ncclUniqueId)) {
        throw std::invalid_argument("NCCL unique id must be " +
                                    std::to_string(sizeof(ncclUniqueId)) + " bytes");
    }
    ncclUniqueId uid;
    std::memcpy(uid.internal, id.data(), sizeof(uid.internal));
    REFIT_CUDA_CHECK(cudaSetDevice(device));
    REFIT_NCCL_CHECK(nccl().comm_init_rank(&comm_, nranks, uid, rank));
}

NcclCommunicator::~NcclCommunicator() {
    if (comm_) nccl().comm_destroy(comm_);  // NOTE: errors in a destructor can only be dropped
}

ncclResult_t NcclCommunicator::async_error() const {
    if (!comm_) return ncclInvalidUsage;
    ncclResult_t state = ncclSuccess;
    REFIT_NCCL_CHECK(nccl().comm_get_async_error(comm_, &state));
    return state;
}

void NcclCommunicator::abort() {
    if (comm_) {
        // NOTE: not checked: abort runs while handling a failure, whose error is the one to
        // report; the communicator is unusable either way.
        nccl().comm_abort(comm_);
        comm_ = nullptr;
    }
}

}  // namespace refit
