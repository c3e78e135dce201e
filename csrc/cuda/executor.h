// The CUDA refit executor: per bucket one fused pack kernel, one exchange (an NCCL group of
// send/recv, or a device copy for the loopback executor), one fused unpack kernel; local copies
// alongside. Buckets are double-buffered on three streams, so bucket k+1 packs while bucket k is
// on the wire and bucket k-1 unpacks. A whole refit can be captured as one CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "cuda/segment_table.h"

namespace refit {

class NcclCommunicator;  // nccl/communicator.h; absent in builds without nccl.h

// One message of a bucket: `bytes` at device address `address`, to or from group rank `peer`.
struct DeviceMessage {
    int64_t peer;
    int64_t address;
    int64_t bytes;
};

struct Bucket {
    std::shared_ptr<SegmentTable> pack;      // sources -> send staging (may be empty)
    std::vector<DeviceMessage> sends, recvs;  // NCCL transport
    std::shared_ptr<SegmentTable> exchange;  // loopback transport: send staging -> recv staging
    std::shared_ptr<SegmentTable> unpack;    // recv staging -> destinations
};

class CudaExecutor {
   public:
    CudaExecutor(int device, std::shared_ptr<NcclCommunicator> comm);
    ~CudaExecutor();
    CudaExecutor(const CudaExecutor&) = delete;
    CudaExecutor& operator=(const CudaExecutor&) = delete;

    void set_local(std::shared_ptr<SegmentTable> local) { local_ = std::move(local); }
    void add_bucket(Bucket bucket);

    // Enqueues one refit after the work already on `stream`; work enqueued on `stream` later
    // runs after the refit. Returns at once.
    void run(cudaStream_t stream);
    // Captures run() into a CUDA graph (replaces an earlier capture), then replays it.
    void capture(cudaStream_t stream);
    void replay(cudaStream_t stream);
    bool captured() const { return graph_exec_ != nullptr; }
    // Blocks until the work enqueued so far on `stream` is done; polls NCCL for asynchronous
    // errors. On an error or after `timeout_s` it aborts the communicator and throws.
    void wait(cudaStream_t stream, double timeout_s);

    int num_buckets() const { return int(buckets_.size()); }

   private:
    void exchange(const Bucket& bucket);
    cudaEvent_t event();

    int device_;
    std::shared_ptr<NcclCommunicator> comm_;
    std::shared_ptr<SegmentTable> local_;
    std::vector<Bucket> buckets_;
    cudaStream_t pack_stream_ = nullptr, comm_stream_ = nullptr, unpack_stream_ = nullptr;
    cudaEvent_t start_ = nullptr, done_ = nullptr, sync_ = nullptr;
    std::vector<cudaEvent_t> packed_, exchanged_, unpacked_;
    cudaGraphExec_t graph_exec_ = nullptr;
};

}  // namespace refit
