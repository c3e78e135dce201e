#include "transport/nccl/nccl_transport.h"

#include <cuda_runtime.h>

#include <chrono>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "common/check.h"
#include "transport/nccl/nccl_api.h"

namespace refit {

std::string NcclTransport::unique_id() {
    ncclUniqueId id;
    REFIT_NCCL_CHECK(nccl().get_unique_id(&id));
    return std::string(id.internal, sizeof(id.internal));
}

NcclTransport::NcclTransport(const std::string& id, int nranks, int rank, int device,
                             double timeout_s)
    : rank_(rank), nranks_(nranks), timeout_s_(timeout_s) {
    if (!(timeout_s > 0)) throw std::invalid_argument("timeout_s must be positive");
    if (id.size() != sizeof(ncclUniqueId)) {
        throw std::invalid_argument("NCCL unique id must be " +
                                    std::to_string(sizeof(ncclUniqueId)) + " bytes");
    }
    ncclUniqueId uid;
    std::memcpy(uid.internal, id.data(), sizeof(uid.internal));
    REFIT_CUDA_CHECK(cudaSetDevice(device));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t started = nccl().comm_init_rank_config(&comm_, nranks, uid, rank, &config);
    if (started != ncclSuccess && started != ncclInProgress) {
        abort();  // a half-made communicator, if NCCL returned one
        REFIT_NCCL_CHECK(started);
    }
    wait_ready("creating the communicator (rank " + std::to_string(rank) + " of " +
                   std::to_string(nranks) + ")",
               std::chrono::steady_clock::now(), "a peer never joined or stopped responding");
}

void NcclTransport::wait_ready(const std::string& what,
                               std::chrono::steady_clock::time_point since,
                               const std::string& if_late) {
    // Poll fast at first (a group end is usually ready within microseconds), then gently: a
    // slow creation or connection takes seconds and must not keep a core busy.
    constexpr auto kFirstPolls = std::chrono::microseconds(20);
    constexpr auto kLaterPolls = std::chrono::milliseconds(1);
    constexpr double kFastPhaseS = 0.01;
    while (true) {
        ncclResult_t state = ncclSuccess;
        const ncclResult_t asked = nccl().comm_get_async_error(comm_, &state);
        if (asked != ncclSuccess) state = asked;
        if (state == ncclSuccess) return;
        const double waited =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
        if (state != ncclInProgress) {
            const std::string reason = nccl().error_string(state);
            abort();
            throw std::runtime_error("NCCL failed " + what + ": " + reason +
                                     "; NCCL communicator aborted");
        }
        if (waited > timeout_s_) {
            abort();
            std::ostringstream seconds;
            seconds << timeout_s_;
            throw std::runtime_error("NCCL did not finish " + what + " within " + seconds.str() +
                                     " s: " + if_late + "; NCCL communicator aborted");
        }
        if (waited < kFastPhaseS) {
            std::this_thread::sleep_for(kFirstPolls);
        } else {
            std::this_thread::sleep_for(kLaterPolls);
        }
    }
}

NcclTransport::~NcclTransport() {
    if (!comm_) return;
    // NOTE: errors in a destructor can only be dropped. A communicator in error (or with work
    // still in progress) must be aborted: ncclCommDestroy would flush work that can no longer
    // finish.
    ncclResult_t state = ncclSuccess;
    if (nccl().comm_get_async_error(comm_, &state) != ncclSuccess || state != ncclSuccess) {
        abort();
    } else {
        nccl().comm_destroy(comm_);
    }
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

void NcclTransport::begin_run() { run_started_ = std::chrono::steady_clock::now(); }

void NcclTransport::end_exchange() {
    // A non-blocking communicator's group may end in progress: NCCL launches it (connecting
    // a pair of peers on its first use) on its own thread. The stream holds the operations
    // once the communicator is ready again; every group of one refit shares one deadline.
    const ncclResult_t ended = nccl().group_end();
    if (ended == ncclInProgress) {
        wait_ready("launching a send/recv group", run_started_,
                   "a peer did not post its side of the bucket, or stopped responding");
        return;
    }
    if (ended != ncclSuccess) {
        abort();  // the group's operations are in an unknown state
        REFIT_NCCL_CHECK(ended);
    }
}

void NcclTransport::cancel_exchange() noexcept {
    nccl().group_end();  // NOTE: not checked: it closes the bracket; its work is aborted next
    abort();
}

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
