// Cross-process ordering around a refit, for transports whose peers touch this rank's memory
// directly (CUDA IPC): the reader's copy kernel reads the owner's source tensors, so
//  - a reader must not read before the work already queued on the owner's stream (the
//    training step that wrote the sources) is done, and
//  - the owner's next write (work it queues after the refit) must not overtake a reader.
// The executor calls enter() first thing in a refit, on the caller's stream, and leave() last;
// both only enqueue work (so a refit with them is captured into one CUDA graph), and neither
// waits on the host. error() never blocks: the executor's wait polls it against its deadline.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace refit {

class StreamOrdering {
   public:
    virtual ~StreamOrdering() = default;
    // Work enqueued on `stream` after enter() runs only once every owner this rank reads from
    // has finished the work it had queued before its own enter().
    virtual void enter(cudaStream_t stream) = 0;
    // Work enqueued on `stream` after leave() runs only once every reader of this rank's
    // memory has finished the reads it had queued before its own leave().
    virtual void leave(cudaStream_t stream) = 0;
    // Empty while healthy, otherwise why an ordering wait failed ("rank 3 did not ...").
    virtual std::string error() const = 0;
    // A device word that is nonzero once error() is not empty: copy kernels given it skip
    // their work, so a failed wait never reads a dead peer's memory.
    virtual const int64_t* failed_flag() const = 0;
};

}  // namespace refit
