// Plain data shared by the planner, the executors and the bindings.
//
// A *side* (source model or destination model) is four tables:
//   tensors: the logical tensors (canonical name, global shape, element size, dtype code);
//   buffers: the local tensors that ranks hold (rank, element count, element size);
//   pieces:  "these ranks each hold this box of global tensor T, at this strided place in
//            their own buffer";
//   holders: the buffers of each piece's holders, a run per piece, in ascending rank.
// Every parallel layout (TP, partition stride, packed blocks, EP, ETP, PP, DP, rank offsets)
// reduces to pieces, so the planner knows nothing about parallelism. DP replicas of a shard are
// one piece with many holders: at 2048 GPUs that is ~60 k pieces a side instead of ~2.5 M.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace refit {

constexpr int kMaxDims = 4;

using Index = std::array<int64_t, kMaxDims>;

struct TensorSpec {
    int32_t ndim = 0;
    int32_t itemsize = 0;
    int64_t dtype_code = 0;  // opaque: equal codes mean equal dtypes
    Index shape{};
};

struct Buffer {  // the row layout of the buffer table: rank, numel, itemsize
    int64_t rank = 0;
    int64_t numel = 0;
    int64_t itemsize = 0;
};

// A box of a global tensor held by `holders_count` ranks (replicas), each at the same place in
// its own buffer: holders[holders_first + i] is the i-th holder's buffer. Local strides are in
// elements; the box's element at global index start + i lives at buffer element
// local_offset + sum_d i[d] * local_stride[d].
struct Piece {
    int64_t tensor = 0;
    int64_t holders_first = 0;
    int64_t holders_count = 0;
    int64_t local_offset = 0;
    Index start{};
    Index extent{};
    Index local_stride{};
};

// A read-only view of `size()` items. A Side's big tables (millions of pieces at cluster scale)
// are read where the caller keeps them (NumPy arrays from Python) instead of being copied.
template <typename T>
class View {
   public:
    View() = default;
    View(const T* data, size_t size) : data_(data), size_(size) {}
    explicit View(const std::vector<T>& v) : data_(v.data()), size_(v.size()) {}
    size_t size() const { return size_; }
    bool empty() const { return size_ == 0; }
    const T& operator[](size_t i) const { return data_[i]; }
    const T* begin() const { return data_; }
    const T* end() const { return data_ + size_; }

   private:
    const T* data_ = nullptr;
    size_t size_ = 0;
};

struct Side {
    std::vector<std::string> names;
    std::vector<TensorSpec> tensors;
    View<Buffer> buffers;  // views: into the caller's memory, which must outlive the Planner
    View<Piece> pieces;
    View<int64_t> holders;  // buffer indices; ascending rank within each piece's run
};

// One pitched 2-D copy: `rows` rows of `row_bytes`, rows `*_pitch` bytes apart.
// Buffer -1 means the staging buffer of the segment's bucket; its offset is then
// relative to the start of that bucket's staging area.
struct Segment {
    int64_t tensor;      // destination-side tensor index (for names in errors and stats)
    int64_t peer;        // the other rank (this rank for local copies)
    int64_t bucket;
    int64_t src_buffer;  // source-side buffer index, or -1 for staging
    int64_t src_offset;  // bytes
    int64_t src_pitch;   // bytes
    int64_t dst_buffer;  // destination-side buffer index, or -1 for staging
    int64_t dst_offset;  // bytes
    int64_t dst_pitch;   // bytes
    int64_t rows;
    int64_t row_bytes;

    int64_t bytes() const { return rows * row_bytes; }
};
constexpr int kSegmentFields = 11;
static_assert(sizeof(Segment) == kSegmentFields * sizeof(int64_t), "Segment must be packed int64s");

// One message: everything this rank sends to (or receives from) `peer` in `bucket`,
// at `offset` in that bucket's staging area.
struct Message {
    int64_t peer;
    int64_t bucket;
    int64_t offset;
    int64_t bytes;
};
constexpr int kMessageFields = 4;
static_assert(sizeof(Message) == kMessageFields * sizeof(int64_t), "Message must be packed int64s");

struct RankPlan {
    int64_t rank = 0;
    std::vector<Segment> local;  // source buffer -> destination buffer on this rank
    std::vector<Segment> send;   // source buffer -> staging, ordered per peer
    std::vector<Segment> recv;   // staging -> destination buffer, ordered per peer
    std::vector<Message> send_messages;
    std::vector<Message> recv_messages;
    std::vector<int64_t> send_staging_bytes;  // per bucket
    std::vector<int64_t> recv_staging_bytes;  // per bucket
    int64_t num_buckets = 0;
};

struct PlanOptions {
    // Largest message between one pair of ranks in one bucket. Segments are cut (by rows,
    // then within a row) so no message exceeds it; staging per bucket is at most this
    // times the number of peers.
    int64_t bucket_bytes = int64_t(64) << 20;
    // Ranks per node (consecutive ranks share a node). When > 0, a source replica on the
    // destination's node is preferred over one across the network (NVLink over the NIC);
    // 0 treats every remote replica alike (round-robin among them).
    int64_t ranks_per_node = 0;
};

}  // namespace refit
