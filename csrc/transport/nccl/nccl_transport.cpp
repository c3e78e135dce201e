#include "transport/nccl/nccl_transport.h"

#include <cuda_runtime.h>

#include <cstring>
#include <stdexcept>

#include "common/check.h"
#include "transport/nccl/nccl_api.h"

namespace refit {

std::string NcclTransport::unique_id() {
    ncclUniqueId id;
    REFIT_NCCL_CHECK(nccl().get_unique_id(&id));
    return std::string(id.internal, sizeof(id.internal));
}

NcclTransport::NcclTransport(const std::string& id, int nranks, int rank, int device)
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

NcclTransport::~NcclTransport() {
    if (comm_) nccl().comm_destroy(comm_);  // NOTE: errors in a destructor can only be dropped
}

ncclResult_t NcclTransport::async_result() const {
    if (!comm_) return ncclInvalidUsage;
    ncclResult_t state = ncclSuccess;
    REFIT_NCCL_CHECK(nccl().comm_get_async_error(comm_, &state));
    return state;
}

std::string NcclTransport::async_error() const {
    const ncclResult_t state = async_result();
    if (state == ncclSuccess || state == ncclInProgress) return "";
    return std::string("NCCL asynchronous error: ") + nccl().error_string(state);
}

void NcclTransport::begin_exchange() {
    if (!comm_) throw std::runtime_error("NCCL communicator was aborted");
    REFIT_NCCL_CHECK(nccl().group_start());
}

void NcclTransport::end_exchange() { REFIT_NCCL_CHECK(nccl().group_end()); }

void NcclTransport::post_recv(int64_t peer, void* dst, size_t bytes, cudaStream_t stream) {
    REFIT_NCCL_CHECK(nccl().recv(dst, bytes, ncclUint8, int(peer), comm_, stream));
}

void NcclTransport::post_send(int64_t peer, const void* src, size_t bytes, cudaStream_t stream) {
    REFIT_NCCL_CHECK(nccl().send(src, bytes, ncclUint8, int(peer), comm_, stream));
}

void NcclTransport::abort() {
    if (comm_) {
        // NOTE: not checked: abort runs while handling a failure, whose error is the one to
        // report; the communicator is unusable either way.
        nccl().comm_abort(comm_);
        comm_ = nullptr;
    }
}

}  // namespace refit
