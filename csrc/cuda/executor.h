// The CUDA refit executor: per bucket one fused pack kernel, one exchange (messages over each
// peer's Transport, or a device copy for the loopback executor), one fused unpack kernel; local
// copies alongside. Buckets are double-buffered on three streams, so bucket k+1 packs while bucket k is
// on the wire and bucket k-1 unpacks. A whole refit can be captured as one CUDA graph.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "cuda/segment_table.h"
#include "transform/transform_copy.h"
#include "transport/ordering.h"
#include "transport/transport.h"

namespace refit {

// One message of a bucket: `bytes` at device address `address`, to or from group rank `peer`.
struct DeviceMessage {
    int64_t peer;
    int64_t address;
    int64_t bytes;
};

struct Bucket {
    std::shared_ptr<SegmentTable> pack;      // sources -> send staging (may be empty)
    std::vector<DeviceMessage> sends, recvs;  // over the peers' transports
    std::shared_ptr<SegmentTable> exchange;  // loopback transport: send staging -> recv staging
    std::shared_ptr<SegmentTable> unpack;    // recv staging -> destinations
    // The same steps into destinations of another format (casts, FP8): run beside the plain
    // tables, in the same step (may be empty).
    std::shared_ptr<TransformTable> pack_transform, unpack_transform;
};

class CudaExecutor {
   public:
    // `transports` carries each peer's messages (empty: loopback and local copies only).
    CudaExecutor(int device, PeerTransports transports);
    ~CudaExecutor();
    CudaExecutor(const CudaExecutor&) = delete;
    CudaExecutor& operator=(const CudaExecutor&) = delete;

    // Local copies, and direct reads of peer memory (CUDA IPC): one fused kernel.
    void set_local(std::shared_ptr<SegmentTable> local);
    // Local copies and IPC reads into destinations of another format, beside set_local's.
    void set_local_transform(std::shared_ptr<TransformTable> local);
    // Runs after every copy of the refit: quantizes the destinations assembled in carriers.
    void set_finish(std::shared_ptr<TransformTable> finish);
    // Cross-process ordering for peers that read this rank's memory or whose memory it reads:
    // enter() starts every refit, leave() ends it (both inside a captured graph); its failure
    // makes the local table skip its copies and wait() raise.
    void set_ordering(std::shared_ptr<StreamOrdering> ordering);
    void add_bucket(Bucket bucket);

    // Enqueues one refit after the work already on `stream`; work enqueued on `stream` later
    // runs after the refit. Returns at once.
    void run(cudaStream_t stream);
    // Captures run() into a CUDA graph (replaces an earlier capture), then replays it.
    void capture(cudaStream_t stream);
    void replay(cudaStream_t stream);
    bool captured() const { return graph_exec_ != nullptr; }
    // Blocks until the work enqueued so far on `stream` is done; polls the transports for
    // asynchronous errors. On an error or after `timeout_s` it aborts every transport and throws.
    void wait(cudaStream_t stream, double timeout_s);

    int num_buckets() const { return int(buckets_.size()); }

   private:
    // One bucket's messages over one transport: one begin/end bracket.
    struct Exchange {
        Transport* transport;
        std::vector<DeviceMessage> recvs, sends;
    };

    void exchange(size_t b);
    cudaEvent_t event();
    // Aborts every transport; "; <name> aborted" for each, to end an error message.
    std::string abort_all();

    int device_;
    PeerTransports transports_;
    std::shared_ptr<StreamOrdering> ordering_;
    std::shared_ptr<SegmentTable> local_;
    std::shared_ptr<TransformTable> local_transform_, finish_;
    std::vector<Bucket> buckets_;
    std::vector<std::vector<Exchange>> exchanges_;  // per bucket, in transports_.distinct() order
    cudaStream_t pack_stream_ = nullptr, comm_stream_ = nullptr, unpack_stream_ = nullptr;
    cudaEvent_t start_ = nullptr, done_ = nullptr, sync_ = nullptr;
    std::vector<cudaEvent_t> packed_, exchanged_, unpacked_;
    cudaGraphExec_t graph_exec_ = nullptr;
};

}  // namespace refit
