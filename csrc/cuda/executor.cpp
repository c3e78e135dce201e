#include "cuda/executor.h"

#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

#include "common/check.h"

namespace refit {

CudaExecutor::CudaExecutor(int device, PeerTransports transports)
    : device_(device), transports_(std::move(transports)) {
    REFIT_CUDA_CHECK(cudaSetDevice(device_));
    for (cudaStream_t* s : {&pack_stream_, &comm_stream_, &unpack_stream_}) {
        REFIT_CUDA_CHECK(cudaStreamCreateWithFlags(s, cudaStreamNonBlocking));
    }
    start_ = event();
    done_ = event();
    sync_ = event();
}

CudaExecutor::~CudaExecutor() {
    // NOTE: destructors cannot throw; release what we can.
    if (graph_exec_) cudaGraphExecDestroy(graph_exec_);
    for (auto* list : {&packed_, &exchanged_, &unpacked_}) {
        for (cudaEvent_t e : *list) cudaEventDestroy(e);
    }
    for (cudaEvent_t e : {start_, done_, sync_}) {
        if (e) cudaEventDestroy(e);
    }
    for (cudaStream_t s : {pack_stream_, comm_stream_, unpack_stream_}) {
        if (s) cudaStreamDestroy(s);
    }
}

cudaEvent_t CudaExecutor::event() {
    cudaEvent_t e = nullptr;
    REFIT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return e;
}

void CudaExecutor::set_local(std::shared_ptr<SegmentTable> local) {
    if (graph_exec_) throw std::logic_error("cannot change the local copies after capturing a graph");
    local_ = std::move(local);
    if (local_ && ordering_) local_->skip_when(ordering_->failed_flag());
}

void CudaExecutor::set_local_transform(std::shared_ptr<TransformTable> local) {
    if (graph_exec_) throw std::logic_error("cannot change the local copies after capturing a graph");
    local_transform_ = std::move(local);
    if (local_transform_ && ordering_) local_transform_->skip_when(ordering_->failed_flag());
}

void CudaExecutor::set_finish(std::shared_ptr<TransformTable> finish) {
    if (graph_exec_) throw std::logic_error("cannot change the finish step after capturing a graph");
    finish_ = std::move(finish);
}

void CudaExecutor::set_ordering(std::shared_ptr<StreamOrdering> ordering) {
    if (graph_exec_) throw std::logic_error("cannot change the ordering after capturing a graph");
    ordering_ = std::move(ordering);
    // The local tables read peers' memory (CUDA IPC): never after a failed ordering wait.
    if (local_ && ordering_) local_->skip_when(ordering_->failed_flag());
    if (local_transform_ && ordering_) local_transform_->skip_when(ordering_->failed_flag());
}

void CudaExecutor::add_bucket(Bucket bucket) {
    if (graph_exec_) throw std::logic_error("cannot add buckets after capturing a graph");
    if (transports_.empty() && (!bucket.sends.empty() || !bucket.recvs.empty())) {
        throw std::invalid_argument(
            "bucket has messages but the executor has no transport (no communicator was given)");
    }
    // Sorted by transport once here, so run() (and each graph capture) only posts.
    std::vector<Exchange> exchanges;
    for (Transport* t : transports_.distinct()) exchanges.push_back({t, {}, {}});
    auto place = [&](const DeviceMessage& m, bool recv) {
        Transport* t = transports_.of(m.peer);
        if (!t) {
            throw std::invalid_argument("bucket has a message " + std::string(recv ? "from" : "to") +
                                        " peer " + std::to_string(m.peer) +
                                        ", which has no transport");
        }
        for (Exchange& x : exchanges) {
            if (x.transport == t) (recv ? x.recvs : x.sends).push_back(m);
        }
    };
    for (const DeviceMessage& m : bucket.recvs) place(m, true);
    for (const DeviceMessage& m : bucket.sends) place(m, false);
    std::vector<Exchange> used;
    for (Exchange& x : exchanges) {
        if (!x.recvs.empty() || !x.sends.empty()) used.push_back(std::move(x));
    }
    buckets_.push_back(std::move(bucket));
    exchanges_.push_back(std::move(used));
    packed_.push_back(event());
    exchanged_.push_back(event());
    unpacked_.push_back(event());
}

void CudaExecutor::exchange(size_t b) {
    if (buckets_[b].exchange) buckets_[b].exchange->launch(comm_stream_);
    for (const Exchange& x : exchanges_[b]) {
        // NOTE: receives before sends, in one bracket per transport: inside an NCCL group the
        // order does not matter, and a transport without groups then has every receive posted
        // before a send could wait for it.
        x.transport->begin_exchange();
        try {
            for (const DeviceMessage& m : x.recvs) {
                x.transport->post_recv(m.peer, reinterpret_cast<void*>(m.address),
                                       size_t(m.bytes), comm_stream_);
            }
            for (const DeviceMessage& m : x.sends) {
                x.transport->post_send(m.peer, reinterpret_cast<const void*>(m.address),
                                       size_t(m.bytes), comm_stream_);
            }
        } catch (...) {
            // A half-posted bracket left open would nest every later one (NCCL's group depth
            // is per thread): close it, and the transport with it.
            x.transport->cancel_exchange();
            throw;
        }
        x.transport->end_exchange();
    }
}

std::string CudaExecutor::abort_all() {
    std::string aborted;
    for (Transport* t : transports_.distinct()) {
        t->abort();
        aborted += "; " + t->name() + " aborted";
    }
    return aborted;
}

void CudaExecutor::run(cudaStream_t stream) {
    REFIT_CUDA_CHECK(cudaSetDevice(device_));
    if (ordering_) {
        // A failed ordering wait is sticky (the peers' epochs no longer match): never again.
        const std::string failed = ordering_->error();
        if (!failed.empty()) throw std::runtime_error(failed);
        ordering_->enter(stream);
    }
    for (Transport* t : transports_.distinct()) t->begin_run();
    REFIT_CUDA_CHECK(cudaEventRecord(start_, stream));
    for (cudaStream_t s : {pack_stream_, comm_stream_, unpack_stream_}) {
        REFIT_CUDA_CHECK(cudaStreamWaitEvent(s, start_, 0));
    }
    // Local copies first on the unpack stream: it idles until bucket 0 has arrived.
    if (local_) local_->launch(unpack_stream_);
    if (local_transform_) local_transform_->launch(unpack_stream_);
    for (size_t b = 0; b < buckets_.size(); ++b) {
        const Bucket& bucket = buckets_[b];
        // NOTE: staging buffer b % 2 is shared with bucket b - 2: pack may overwrite the send
        // side only after that bucket's exchange read it, and the exchange may overwrite the
        // receive side only after that bucket was unpacked.
        if (b >= 2) REFIT_CUDA_CHECK(cudaStreamWaitEvent(pack_stream_, exchanged_[b - 2], 0));
        if (bucket.pack) bucket.pack->launch(pack_stream_);
        if (bucket.pack_transform) bucket.pack_transform->launch(pack_stream_);
        REFIT_CUDA_CHECK(cudaEventRecord(packed_[b], pack_stream_));

        REFIT_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, packed_[b], 0));
        if (b >= 2) REFIT_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, unpacked_[b - 2], 0));
        exchange(b);
        REFIT_CUDA_CHECK(cudaEventRecord(exchanged_[b], comm_stream_));

        REFIT_CUDA_CHECK(cudaStreamWaitEvent(unpack_stream_, exchanged_[b], 0));
        if (bucket.unpack) bucket.unpack->launch(unpack_stream_);
        if (bucket.unpack_transform) bucket.unpack_transform->launch(unpack_stream_);
        REFIT_CUDA_CHECK(cudaEventRecord(unpacked_[b], unpack_stream_));
    }
    // Assembled destinations are complete once the unpack stream's copies are done.
    if (finish_) finish_->launch(unpack_stream_);
    // The unpack stream's last work follows every exchange, which follows every pack: joining
    // it back into the caller's stream ends the refit.
    REFIT_CUDA_CHECK(cudaEventRecord(done_, unpack_stream_));
    REFIT_CUDA_CHECK(cudaStreamWaitEvent(stream, done_, 0));
    if (ordering_) ordering_->leave(stream);
}

void CudaExecutor::capture(cudaStream_t stream) {
    REFIT_CUDA_CHECK(cudaSetDevice(device_));
    if (graph_exec_) {
        REFIT_CUDA_CHECK(cudaGraphExecDestroy(graph_exec_));
        graph_exec_ = nullptr;
    }
    // Capturing on the legacy default stream is not allowed: use a private one.
    cudaStream_t capture_stream = nullptr;
    REFIT_CUDA_CHECK(cudaStreamCreateWithFlags(&capture_stream, cudaStreamNonBlocking));
    REFIT_CUDA_CHECK(cudaStreamBeginCapture(capture_stream, cudaStreamCaptureModeRelaxed));
    try {
        run(capture_stream);
    } catch (...) {
        cudaGraph_t broken = nullptr;
        cudaStreamEndCapture(capture_stream, &broken);
        if (broken) cudaGraphDestroy(broken);
        cudaStreamDestroy(capture_stream);
        throw;
    }
    cudaGraph_t graph = nullptr;
    REFIT_CUDA_CHECK(cudaStreamEndCapture(capture_stream, &graph));
    REFIT_CUDA_CHECK(cudaStreamDestroy(capture_stream));
    // The executable graph does not need the graph it was made from.
    const cudaError_t instantiated = cudaGraphInstantiate(&graph_exec_, graph, 0);
    REFIT_CUDA_CHECK(cudaGraphDestroy(graph));
    REFIT_CUDA_CHECK(instantiated);
    replay(stream);
}

void CudaExecutor::replay(cudaStream_t stream) {
    if (!graph_exec_) throw std::logic_error("no graph captured: call capture() first");
    REFIT_CUDA_CHECK(cudaSetDevice(device_));
    if (ordering_) {
        const std::string failed = ordering_->error();
        if (!failed.empty()) throw std::runtime_error(failed);
    }
    REFIT_CUDA_CHECK(cudaGraphLaunch(graph_exec_, stream));
}

void CudaExecutor::wait(cudaStream_t stream, double timeout_s) {
    REFIT_CUDA_CHECK(cudaSetDevice(device_));
    REFIT_CUDA_CHECK(cudaEventRecord(sync_, stream));
    const auto start = std::chrono::steady_clock::now();
    while (true) {
        const cudaError_t state = cudaEventQuery(sync_);
        if (state == cudaSuccess) {
            // NOTE: a failed ordering wait ends its kernel at its own deadline and the copies
            // after it skip, so the stream completes: done is not success until the ordering
            // says so too (else a dead peer's refit returned with its destination unwritten).
            if (ordering_) {
                const std::string failed = ordering_->error();
                if (!failed.empty()) throw std::runtime_error(failed + abort_all());
            }
            return;
        }
        if (state != cudaErrorNotReady) REFIT_CUDA_CHECK(state);
        if (ordering_) {
            const std::string failed = ordering_->error();
            if (!failed.empty()) throw std::runtime_error(failed + abort_all());
        }
        for (Transport* t : transports_.distinct()) {
            if (t->aborted()) continue;
            std::string err;
            try {
                err = t->async_error();
            } catch (...) {  // could not even ask: treat the transports as failed
                abort_all();
                throw;
            }
            if (!err.empty()) throw std::runtime_error(err + abort_all());
        }
        const double waited =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (waited > timeout_s) {
            throw std::runtime_error("refit did not finish within " + std::to_string(timeout_s) +
                                     " s" + abort_all());
        }
        std::this_thread::sleep_for(std::chrono::microseconds(waited < 0.01 ? 20 : 500));
    }
}

}  // namespace refit
