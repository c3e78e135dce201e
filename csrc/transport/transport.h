// The exchange interface of the CUDA executor: how one bucket's messages move between this
// rank and its peers. The executor knows only this class; each mechanism is one implementation
// in its own folder (transport/nccl/ today; a CUDA IPC transport for peers on this node is the
// next), and the bindings say which one carries each peer (PeerTransports below).
//
// What an implementation must guarantee (the executor's overlap and graph capture rely on it):
//  - Stream order. post_send / post_recv only enqueue work on `stream`: the transfer starts
//    after the work enqueued there before it, and work enqueued there after end_exchange()
//    starts only once every message posted since begin_exchange() has fully arrived (recv) or
//    been read (send): the executor reuses staging buffers on that promise. The host never
//    waits for the peer's data inside these calls; end_exchange() may wait for the
//    transport's own setup (NCCL connects a pair of peers on its first use), bounded by the
//    transport's deadline, which begin_run() restarts for each refit.
//  - Graph capture. When `stream` is capturing a CUDA graph, the posted work is captured
//    (replayed later with the same addresses and sizes) instead of run; nothing may be done on
//    the host at capture time that replay would need to repeat.
//  - Pairing. Both sides of a message post it in the same bucket, sender and receiver with
//    equal byte counts; within one exchange, messages to one peer arrive in posting order. Any
//    order of posts inside begin_exchange() / end_exchange() must be deadlock-free (NCCL's
//    group semantics): the executor posts all receives of a bucket, then all sends.
//  - Failure. async_error() and aborted() never block (the executor's wait polls them between
//    queries of its stream, against a deadline). abort() makes every operation in flight end (with an error or not), so a stream waiting
//    on a dead peer drains; the transport is unusable afterwards, and posting to it throws.
//  - Errors of a call throw std::runtime_error (common/check.h formats library codes).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace refit {

class Transport {
   public:
    virtual ~Transport() = default;

    // What the transport is, for errors: "<name> aborted" ("NCCL communicator aborted").
    virtual std::string name() const = 0;

    // A refit starts: waits inside its exchanges share one deadline from now.
    virtual void begin_run() {}
    // Brackets one bucket's messages over this transport; posts happen only inside a bracket.
    virtual void begin_exchange() = 0;
    virtual void end_exchange() = 0;
    // Closes a bracket whose posting failed part-way: what it posted must never run, so the
    // transport ends the bracket and aborts itself. Never throws.
    virtual void cancel_exchange() noexcept = 0;
    // `bytes` from `peer` into device memory at `dst` / from `src` to `peer`, on `stream`.
    // `peer` is the peer's rank in the transport's group (what the plan's messages carry).
    virtual void post_recv(int64_t peer, void* dst, size_t bytes, cudaStream_t stream) = 0;
    virtual void post_send(int64_t peer, const void* src, size_t bytes, cudaStream_t stream) = 0;

    // Empty while healthy, otherwise why the transport failed on its own (a peer died, a
    // network error), e.g. "NCCL asynchronous error: ...". Throws if it cannot even tell.
    virtual std::string async_error() const = 0;
    // Ends every operation in flight; idempotent. Errors are dropped: abort runs while another
    // failure is being reported.
    virtual void abort() = 0;
    virtual bool aborted() const = 0;
};

// Which transport carries the messages to and from each peer: by_peer[p] for group rank p
// (nullptr, or p past the end: no transport, so no message may name p). One transport may
// serve many peers; `distinct()` lists each once, in order of first appearance, which is
// also the order in which a bucket's exchanges are bracketed.
class PeerTransports {
   public:
    PeerTransports() = default;
    explicit PeerTransports(std::vector<std::shared_ptr<Transport>> by_peer)
        : by_peer_(std::move(by_peer)) {
        for (const auto& t : by_peer_) {
            bool seen = false;
            for (Transport* d : distinct_) seen |= d == t.get();
            if (t && !seen) distinct_.push_back(t.get());
        }
    }
    // Every one of `peers` group ranks over `transport` (none when it is null).
    static PeerTransports all(int64_t peers, std::shared_ptr<Transport> transport) {
        if (!transport) return {};
        return PeerTransports(std::vector<std::shared_ptr<Transport>>(size_t(peers), transport));
    }

    Transport* of(int64_t peer) const {
        return peer >= 0 && peer < int64_t(by_peer_.size()) ? by_peer_[size_t(peer)].get()
                                                            : nullptr;
    }
    const std::vector<Transport*>& distinct() const { return distinct_; }
    bool empty() const { return distinct_.empty(); }

   private:
    std::vector<std::shared_ptr<Transport>> by_peer_;  // owns the transports
    std::vector<Transport*> distinct_;
};

}  // namespace refit
