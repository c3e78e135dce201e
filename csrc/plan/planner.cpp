#include "plan/planner.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <numeric>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>

#include "plan/error.h"

namespace refit {

namespace {

std::string index_str(const Index& index, int ndim) {
    std::ostringstream out;
    out << "(";
    for (int d = 0; d < ndim; ++d) out << (d ? ", " : "") << index[d];
    out << (ndim == 1 ? ",)" : ")");
    return out.str();
}

int64_t numel(const TensorSpec& spec) {
    int64_t n = 1;
    for (int d = 0; d < spec.ndim; ++d) n *= spec.shape[d];
    return n;
}

// Stable counting sort of item indices by key: fills CSR `first` (size num_keys + 1) and `order`.
template <typename KeyOf>
void bucket_by_key(int64_t num_items, int64_t num_keys, KeyOf key_of, std::vector<int64_t>& first,
                   std::vector<int64_t>& order) {
    first.assign(num_keys + 1, 0);
    for (int64_t i = 0; i < num_items; ++i) ++first[key_of(i) + 1];
    std::partial_sum(first.begin(), first.end(), first.begin());
    order.resize(num_items);
    std::vector<int64_t> next(first.begin(), first.end() - 1);
    for (int64_t i = 0; i < num_items; ++i) order[next[key_of(i)]++] = i;
}

std::vector<int64_t> sorted_unique(std::vector<int64_t> v) {
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    return v;
}

}  // namespace

Planner::Planner(Side src, Side dst, PlanOptions options)
    : src_(std::move(src)), dst_(std::move(dst)), options_(options) {
    if (options_.bucket_bytes <= 0) {
        throw PlanError("*", {}, "bucket_bytes must be positive, got " +
                                     std::to_string(options_.bucket_bytes));
    }
    if (options_.ranks_per_node < 0) {
        throw PlanError("*", {}, "ranks_per_node must be 0 (no node preference) or positive, got " +
                                     std::to_string(options_.ranks_per_node));
    }
    auto clock = std::chrono::steady_clock::now();
    auto lap = [&](const char* phase) {
        const auto now = std::chrono::steady_clock::now();
        timings_.push_back({phase, std::chrono::duration<double>(now - clock).count()});
        clock = now;
    };
    check_tensors();
    lap("tensors");
    std::vector<uint8_t> holds;  // by rank: ranks are small dense integers
    BufferUses src_uses(src_.buffers.size(), 0), dst_uses(dst_.buffers.size(), 0);
    check_pieces(src_, "source", src_uses, holds);
    lap("source pieces");
    check_pieces(dst_, "destination", dst_uses, holds);
    lap("destination pieces");
    check_unused_buffers(src_, "source", src_uses, holds);
    check_unused_buffers(dst_, "destination", dst_uses, holds);
    lap("unused buffers");
    bucket_by_key(
        dst_.pieces.size(), dst_.tensors.size(), [&](int64_t i) { return dst_.pieces[i].tensor; },
        dst_piece_first_, dst_piece_order_);
    bucket_by_key(
        src_.pieces.size(), src_.tensors.size(), [&](int64_t i) { return src_.pieces[i].tensor; },
        src_piece_first_, src_piece_order_);
    index_source_replicas();
    lap("source replicas");
    check_destination_buffers(dst_uses);
    lap("destination buffers");
    index_ranks(holds);
}

std::vector<int64_t> Planner::holder_ranks(const Side& side, int64_t tensor) const {
    // For messages, possibly before the pieces are validated: skips what does not exist.
    std::vector<int64_t> ranks;
    const int64_t num_holders = int64_t(side.holders.size());
    const int64_t num_buffers = int64_t(side.buffers.size());
    for (const Piece& piece : side.pieces) {
        if (piece.tensor != tensor || piece.holders_first < 0 || piece.holders_count < 0 ||
            piece.holders_first >= num_holders) {
            continue;
        }
        // No overflow: holders_first < num_holders (a huge first + count wrapped around).
        const int64_t end =
            piece.holders_first + std::min(piece.holders_count, num_holders - piece.holders_first);
        for (int64_t i = piece.holders_first; i < end; ++i) {
            const int64_t b = side.holders[i];
            if (b >= 0 && b < num_buffers) ranks.push_back(side.buffers[b].rank);
        }
    }
    return sorted_unique(std::move(ranks));
}

void Planner::check_tensors() {
    for (const Side* side : {&src_, &dst_}) {
        if (side->names.size() != side->tensors.size()) {
            throw PlanError("*", {}, "layout has " + std::to_string(side->names.size()) +
                                         " names for " + std::to_string(side->tensors.size()) +
                                         " tensors");
        }
    }
    for (const Side* side : {&src_, &dst_}) {
        for (size_t t = 0; t < side->tensors.size(); ++t) {
            const TensorSpec& spec = side->tensors[t];
            int64_t bytes = spec.itemsize;
            bool fits = spec.itemsize > 0;
            for (int d = 0; d < spec.ndim && fits; ++d) {
                fits = spec.shape[d] >= 0 && !__builtin_mul_overflow(bytes, spec.shape[d], &bytes);
            }
            if (!fits) {
                throw PlanError(side->names[t], {},
                                "global shape " + index_str(spec.shape, spec.ndim) + " of " +
                                    std::to_string(spec.itemsize) +
                                    "-byte elements is negative or too large to address");
            }
        }
    }
    // Views into src_.names, which outlive the map.
    std::unordered_map<std::string_view, int64_t> src_index;
    src_index.reserve(src_.names.size() * 2);
    for (size_t i = 0; i < src_.names.size(); ++i) {
        if (!src_index.emplace(src_.names[i], i).second) {
            throw PlanError(src_.names[i], {}, "appears twice in the source layout");
        }
    }
    std::vector<bool> src_used(src_.names.size(), false);
    src_of_dst_.resize(dst_.names.size());
    for (size_t t = 0; t < dst_.names.size(); ++t) {
        const std::string& name = dst_.names[t];
        // Both sides usually list tensors in the same order: try that before hashing.
        int64_t s = -1;
        if (t < src_.names.size() && src_.names[t] == name) {
            s = int64_t(t);
        } else if (auto it = src_index.find(name); it != src_index.end()) {
            s = it->second;
        }
        if (s < 0) {
            throw PlanError(name, holder_ranks(dst_, t),
                            "destination tensor has no source: missing from the source layout");
        }
        if (src_used[s]) {  // names are unique on the source side, so t is a repeat
            throw PlanError(name, holder_ranks(dst_, t), "appears twice in the destination layout");
        }
        const TensorSpec& a = src_.tensors[s];
        const TensorSpec& b = dst_.tensors[t];
        if (a.ndim != b.ndim || !std::equal(a.shape.begin(), a.shape.begin() + a.ndim,
                                            b.shape.begin())) {
            std::vector<int64_t> ranks = holder_ranks(src_, s);
            std::vector<int64_t> more = holder_ranks(dst_, t);
            ranks.insert(ranks.end(), more.begin(), more.end());
            throw PlanError(name, sorted_unique(ranks),
                            "global shape differs: source " + index_str(a.shape, a.ndim) +
                                ", destination " + index_str(b.shape, b.ndim));
        }
        if (a.dtype_code != b.dtype_code || a.itemsize != b.itemsize) {
            std::vector<int64_t> ranks = holder_ranks(src_, s);
            std::vector<int64_t> more = holder_ranks(dst_, t);
            ranks.insert(ranks.end(), more.begin(), more.end());
            throw PlanError(name, sorted_unique(ranks),
                            "dtype differs between source and destination (dtype codes " +
                                std::to_string(a.dtype_code) + " and " +
                                std::to_string(b.dtype_code) + ")");
        }
        src_of_dst_[t] = s;
        src_used[s] = true;
    }
    for (size_t s = 0; s < src_used.size(); ++s) {
        if (!src_used[s]) {
            throw PlanError(src_.names[s], holder_ranks(src_, s),
                            "source tensor is not in the destination layout (extra tensor)");
        }
    }
}

namespace {

// Ranks are process ranks: dense, and far below this (it bounds the planner's per-rank index).
constexpr int64_t kMaxRank = int64_t(1) << 24;

// Raises the error of a buffer row that check_buffer found bad (kept out of line: the check
// runs once per holder, millions of times at cluster scale).
[[noreturn]] __attribute__((noinline)) void reject_buffer(const Buffer& buffer,
                                                           const char* side_name) {
    const std::string side = side_name;
    if (buffer.rank < 0 || buffer.numel < 0 || buffer.itemsize <= 0) {
        throw PlanError("*", {buffer.rank}, side + " buffer has a negative rank or size");
    }
    if (buffer.rank >= kMaxRank) {
        throw PlanError("*", {buffer.rank},
                        side + " buffer's rank " + std::to_string(buffer.rank) +
                            " is out of range (at most " + std::to_string(kMaxRank - 1) + ")");
    }
    throw PlanError("*", {buffer.rank},
                    side + " buffer of " + std::to_string(buffer.numel) +
                        " elements is too large to address in bytes");
}

inline void check_buffer(const Buffer& buffer, const char* side_name) {
    int64_t bytes;
    if (buffer.rank < 0 || buffer.rank >= kMaxRank || buffer.numel < 0 || buffer.itemsize <= 0 ||
        __builtin_mul_overflow(buffer.numel, buffer.itemsize, &bytes)) {
        reject_buffer(buffer, side_name);
    }
}

// Whether every offset `piece` reaches (local_offset + sum of (extent - 1) * stride, per
// sign) fits in int64, and one past the highest too, so the hull and the copies' pitches
// cannot wrap around.
bool footprint_in_range(const Piece& piece, int ndim) {
    int64_t lo = piece.local_offset, hi = piece.local_offset, span = 0;
    for (int d = 0; d < ndim; ++d) {
        int64_t reach = 0;
        if (piece.local_stride[d] == INT64_MIN) return false;  // has no absolute value
        if (__builtin_mul_overflow(piece.extent[d] - 1, piece.local_stride[d], &reach)) return false;
        if (__builtin_add_overflow(reach < 0 ? lo : hi, reach, reach < 0 ? &lo : &hi)) return false;
    }
    // hi < INT64_MAX: the hull ends at hi + 1.
    return hi < INT64_MAX && !__builtin_sub_overflow(hi, lo, &span);  // the sum of |reach|, too
}

// Whether `piece`'s elements land on distinct buffer elements: taking the dimensions in
// increasing stride, each stride must step past everything the smaller ones reach. (Sufficient,
// and what every real layout satisfies; it rejects e.g. a zero stride on a dimension.)
bool strides_separate_elements(const Piece& piece, int ndim) {
    std::array<std::pair<int64_t, int64_t>, kMaxDims> dims{};  // (|stride|, extent)
    int n = 0;
    for (int d = 0; d < ndim; ++d) {
        if (piece.extent[d] > 1) dims[n++] = {std::abs(piece.local_stride[d]), piece.extent[d]};
    }
    std::sort(dims.begin(), dims.begin() + n);
    int64_t reach = 0;  // the largest offset the smaller dimensions reach
    for (int k = 0; k < n; ++k) {
        if (dims[k].first <= reach) return false;
        reach += (dims[k].second - 1) * dims[k].first;
    }
    return true;
}

void mark_rank(std::vector<uint8_t>& holds, int64_t rank) {
    if (rank >= int64_t(holds.size())) holds.resize(rank + 1, 0);
    holds[rank] = 1;
}

}  // namespace

void Planner::check_unused_buffers(const Side& side, const char* side_name,
                                   const BufferUses& uses, std::vector<uint8_t>& holds) const {
    const bool destination = &side == &dst_;
    for (size_t b = 0; b < side.buffers.size(); ++b) {
        if (uses[b]) continue;
        const Buffer& buffer = side.buffers[b];
        check_buffer(buffer, side_name);
        mark_rank(holds, buffer.rank);
        if (destination && buffer.numel > 0) {
            throw PlanError("*", {buffer.rank},
                            "destination local tensor has " + std::to_string(buffer.numel) +
                                " elements but no piece: they would never be written");
        }
    }
}

void Planner::check_pieces(const Side& side, const char* side_name, BufferUses& uses,
                           std::vector<uint8_t>& holds) const {
    // One pass over every holder's buffer row: at cluster scale the buffer table is the
    // largest thing the planner reads (one row per rank and local tensor).
    const std::string where = side_name;
    const int64_t num_holders = int64_t(side.holders.size());
    for (const Piece& piece : side.pieces) {
        if (piece.tensor < 0 || piece.tensor >= int64_t(side.tensors.size())) {
            throw PlanError("*", {}, where + " piece refers to a tensor that does not exist");
        }
        const TensorSpec& spec = side.tensors[piece.tensor];
        const std::string& name = side.names[piece.tensor];
        if (piece.holders_count <= 0 || piece.holders_first < 0 ||
            piece.holders_first > num_holders - piece.holders_count) {
            throw PlanError(name, {}, where + " piece has no holders or refers to holders [" +
                                          std::to_string(piece.holders_first) + ", +" +
                                          std::to_string(piece.holders_count) +
                                          ") that do not exist");
        }
        const int64_t* holders = side.holders.begin() + piece.holders_first;
        for (int64_t i = 0; i < piece.holders_count; ++i) {
            if (holders[i] < 0 || holders[i] >= int64_t(side.buffers.size())) {
                throw PlanError(name, {}, where + " piece refers to a buffer that does not exist");
            }
        }
        const int64_t first_rank = side.buffers[holders[0]].rank;
        const Box box = piece_box(piece, spec.ndim);
        for (int d = 0; d < spec.ndim; ++d) {
            if (piece.start[d] < 0 || piece.extent[d] <= 0 ||
                piece.extent[d] > spec.shape[d] - piece.start[d]) {  // no overflow: both >= 0
                throw PlanError(name, {first_rank},
                                where + " piece " + box.str() + " lies outside the global shape " +
                                    index_str(spec.shape, spec.ndim));
            }
        }
        const int last = spec.ndim - 1;
        if (last >= 0 && piece.extent[last] > 1 && piece.local_stride[last] != 1) {
            throw PlanError(name, {first_rank},
                            where + " local tensor is not contiguous in its last dimension "
                                    "(stride " + std::to_string(piece.local_stride[last]) + ")");
        }
        if (!footprint_in_range(piece, spec.ndim)) {
            throw PlanError(name, {first_rank},
                            where + " piece " + box.str() + " has a local offset or strides "
                                    "reaching past the range of 64-bit offsets");
        }
        if (!strides_separate_elements(piece, spec.ndim)) {
            throw PlanError(name, {first_rank},
                            where + " piece " + box.str() + " has local strides under which "
                                    "its elements overlap");
        }
        const Span hull = footprint_hull(piece, spec.ndim);
        const int64_t volume = box.volume();
        int64_t previous_rank = -1;
        for (int64_t i = 0; i < piece.holders_count; ++i) {
            const Buffer& buffer = side.buffers[holders[i]];
            check_buffer(buffer, side_name);
            if (buffer.itemsize != spec.itemsize) {
                throw PlanError(name, {buffer.rank},
                                where + " local tensor has element size " +
                                    std::to_string(buffer.itemsize) + " but the tensor has " +
                                    std::to_string(spec.itemsize));
            }
            if (hull.lo < 0 || hull.hi > buffer.numel) {
                throw PlanError(name, {buffer.rank},
                                where + " piece " + box.str() + " reaches elements [" +
                                    std::to_string(hull.lo) + ", " + std::to_string(hull.hi) +
                                    ") of a local tensor of " + std::to_string(buffer.numel) +
                                    " elements");
            }
            // Ascending ranks let a transfer find a holder's own replica and its node's replicas
            // by merging two sorted lists; a rank twice in one piece is a duplicate piece.
            if (buffer.rank <= previous_rank) {
                throw PlanError(name, sorted_unique({previous_rank, buffer.rank}),
                                where + " piece " + box.str() + " lists its holders out of rank "
                                        "order or one rank twice");
            }
            previous_rank = buffer.rank;
            mark_rank(holds, buffer.rank);
            uint8_t& use = uses[holders[i]];
            if (&side == &dst_) {
                // A first piece as large as its local tensor fills it (its elements are distinct
                // and inside it): any second piece there writes some element twice. Local
                // tensors whose first piece is smaller are compared piece by piece later.
                if (!(use & kPieceCount)) {
                    if (volume != buffer.numel) use |= kPartlyFilled;
                } else if (!(use & kPartlyFilled)) {
                    throw PlanError(name, {buffer.rank},
                                    "destination pieces of tensors '" +
                                        dst_.names[dst_.pieces[first_piece_in(holders[i])].tensor] +
                                        "' and '" + name +
                                        "' overlap in one local tensor: elements would be "
                                        "written twice");
                }
            }
            if ((use & kPieceCount) < kSeveral) ++use;
        }
    }
}

void Planner::index_source_replicas() {
    group_first_.assign(src_.tensors.size() + 1, 0);
    std::vector<int64_t> pieces;  // scratch, reused for every tensor
    struct Member {
        int64_t rank, piece, buffer;
    };
    std::vector<Member> members;  // scratch for merging pieces of one box
    auto rank_of = [&](int64_t piece, int64_t i) {
        return src_.buffers[src_.holders[src_.pieces[piece].holders_first + i]].rank;
    };
    for (size_t s = 0; s < src_.tensors.size(); ++s) {
        const TensorSpec& spec = src_.tensors[s];
        const int ndim = spec.ndim;
        // Sort this tensor's pieces by box: pieces with equal boxes make one replica group.
        pieces.assign(src_piece_order_.begin() + src_piece_first_[s],
                      src_piece_order_.begin() + src_piece_first_[s + 1]);
        if (pieces.empty()) {
            throw PlanError(src_.names[s], {}, "no source rank holds any part of the tensor");
        }
        std::sort(pieces.begin(), pieces.end(), [&](int64_t a, int64_t b) {
            const Piece& x = src_.pieces[a];
            const Piece& y = src_.pieces[b];
            for (int d = 0; d < ndim; ++d) {
                if (x.start[d] != y.start[d]) return x.start[d] < y.start[d];
            }
            for (int d = 0; d < ndim; ++d) {
                if (x.extent[d] != y.extent[d]) return x.extent[d] < y.extent[d];
            }
            return a < b;
        });
        const size_t first_group = groups_.size();
        for (size_t i = 0; i < pieces.size();) {
            const Box box = piece_box(src_.pieces[pieces[i]], ndim);
            size_t j = i + 1;
            while (j < pieces.size() && piece_box(src_.pieces[pieces[j]], ndim).same_as(box)) ++j;
            if (j == i + 1) {  // the common case: one piece, its holders already rank-sorted
                const Piece& piece = src_.pieces[pieces[i]];
                groups_.push_back({box, pieces[i], piece.holders_first, piece.holders_count});
            } else {
                members.clear();
                for (size_t k = i; k < j; ++k) {
                    const Piece& piece = src_.pieces[pieces[k]];
                    for (int64_t h = 0; h < piece.holders_count; ++h) {
                        members.push_back({rank_of(pieces[k], h), pieces[k],
                                           src_.holders[piece.holders_first + h]});
                    }
                }
                std::stable_sort(members.begin(), members.end(),
                                 [](const Member& a, const Member& b) { return a.rank < b.rank; });
                groups_.push_back({box, -1, int64_t(merged_pieces_.size()), int64_t(members.size())});
                for (const Member& m : members) {
                    merged_pieces_.push_back(m.piece);
                    merged_buffers_.push_back(m.buffer);
                }
            }
            i = j;
        }
        // Distinct boxes must tile the tensor: pairwise disjoint and adding up to all of it.
        // Groups are sorted by start, so only groups starting before a box ends can overlap it.
        for (size_t a = first_group; a < groups_.size(); ++a) {
            const Box& box = groups_[a].box;
            const int64_t end0 = ndim ? box.start[0] + box.extent[0] : 1;
            for (size_t b = a + 1; b < groups_.size(); ++b) {
                if (ndim && groups_[b].box.start[0] >= end0) break;
                if (!intersect(box, groups_[b].box).empty()) {
                    throw PlanError(src_.names[s],
                                    sorted_unique({member_rank(groups_[a], 0),
                                                   member_rank(groups_[b], 0)}),
                                    "source pieces " + box.str() + " and " +
                                        groups_[b].box.str() + " overlap without being the same box");
                }
            }
        }
        // Disjoint boxes inside the shape: their volumes add up to at most numel, no overflow
        // (summed before the overlap check, overlapping huge boxes could pass int64).
        int64_t covered = 0;
        for (size_t g = first_group; g < groups_.size(); ++g) covered += groups_[g].box.volume();
        if (covered != numel(spec)) {
            throw PlanError(src_.names[s], holder_ranks(src_, s),
                            "source pieces cover " + std::to_string(covered) + " of " +
                                std::to_string(numel(spec)) +
                                " elements (a shard is missing or sizes do not divide)");
        }
        group_first_[s + 1] = groups_.size();
    }
}

int64_t Planner::first_piece_in(int64_t buffer) const {
    for (size_t p = 0; p < dst_.pieces.size(); ++p) {
        const Piece& piece = dst_.pieces[p];
        const int64_t* holders = dst_.holders.begin() + piece.holders_first;
        if (std::find(holders, holders + piece.holders_count, buffer) !=
            holders + piece.holders_count) {
            return int64_t(p);
        }
    }
    return -1;
}

void Planner::check_destination_buffers(const BufferUses& uses) {
    // Every destination element written exactly once: the pieces in each local tensor must be
    // disjoint and fill it. Since source boxes tile each tensor, each piece is then written once.
    // A local tensor with one piece was settled while checking pieces (filled, or smaller than
    // its tensor); only those holding several are indexed and compared here.
    const size_t num_buffers = dst_.buffers.size();
    auto never_written = [&](int64_t b, int64_t covered) {
        const int64_t numel = dst_.buffers[b].numel;
        return PlanError(dst_.names[dst_.pieces[first_piece_in(b)].tensor], {dst_.buffers[b].rank},
                         "destination local tensor has " + std::to_string(numel) +
                             " elements but its pieces cover " + std::to_string(covered) +
                             ": some elements would never be written");
    };
    bool any_shared = false;  // a local tensor holding several pieces
    for (size_t b = 0; b < num_buffers; ++b) {
        const uint8_t use = uses[b];
        if ((use & kPieceCount) == 1 && (use & kPartlyFilled)) {
            const Piece& only = dst_.pieces[first_piece_in(b)];
            throw never_written(b, piece_box(only, dst_.tensors[only.tensor].ndim).volume());
        }
        any_shared |= (use & kPieceCount) == kSeveral;
    }
    if (!any_shared) return;
    // The pieces of each shared local tensor, grouped by buffer: (buffer, piece) packed in one
    // integer, since sorting plain integers is several times faster than sorting pairs.
    const int piece_bits = std::max(1, int(std::ceil(std::log2(double(dst_.pieces.size()) + 1))));
    std::vector<uint64_t> pairs;
    for (size_t p = 0; p < dst_.pieces.size(); ++p) {
        const Piece& piece = dst_.pieces[p];
        const int64_t* holders = dst_.holders.begin() + piece.holders_first;
        for (int64_t i = 0; i < piece.holders_count; ++i) {
            if ((uses[holders[i]] & kPieceCount) == kSeveral) {
                pairs.push_back(uint64_t(holders[i]) << piece_bits | uint64_t(p));
            }
        }
    }
    std::sort(pairs.begin(), pairs.end());
    const uint64_t piece_mask = (uint64_t(1) << piece_bits) - 1;
    std::vector<Placed> placed;
    for (size_t i = 0; i < pairs.size();) {
        const int64_t b = int64_t(pairs[i] >> piece_bits);
        placed.clear();
        for (; i < pairs.size() && int64_t(pairs[i] >> piece_bits) == b; ++i) {
            const int64_t p = int64_t(pairs[i] & piece_mask);
            const Piece& piece = dst_.pieces[p];
            placed.push_back({footprint_hull(piece, dst_.tensors[piece.tensor].ndim), p});
        }
        check_disjoint(b, placed);
        // Disjoint pieces inside the local tensor: their volumes add up to at most its size
        // (summed before the check, overlapping huge pieces could pass int64).
        int64_t covered = 0;
        for (const Placed& x : placed) {
            const Piece& piece = dst_.pieces[x.piece];
            covered += piece_box(piece, dst_.tensors[piece.tensor].ndim).volume();
        }
        if (covered != dst_.buffers[b].numel) throw never_written(b, covered);
    }
}

void Planner::check_disjoint(int64_t b, std::vector<Placed>& placed) const {
    std::sort(placed.begin(), placed.end(),
              [](const Placed& x, const Placed& y) { return x.hull.lo < y.hull.lo; });
    bool hulls_disjoint = true;
    for (size_t k = 1; k < placed.size(); ++k) {
        if (placed[k].hull.lo < placed[k - 1].hull.hi) hulls_disjoint = false;
    }
    if (hulls_disjoint) return;
    // Interleaved pieces (strided views): compare their contiguous runs exactly.
    std::vector<std::pair<Span, int64_t>> runs;
    for (const Placed& p : placed) {
        const Piece& piece = dst_.pieces[p.piece];
        for_each_run(piece, dst_.tensors[piece.tensor].ndim, [&](int64_t lo, int64_t len) {
            runs.push_back({{lo, lo + len}, p.piece});
        });
    }
    std::sort(runs.begin(), runs.end(),
              [](const auto& x, const auto& y) { return x.first.lo < y.first.lo; });
    for (size_t k = 1; k < runs.size(); ++k) {
        if (runs[k].first.lo < runs[k - 1].first.hi) {
            throw PlanError(dst_.names[dst_.pieces[runs[k].second].tensor], {dst_.buffers[b].rank},
                            "destination pieces of tensors '" +
                                dst_.names[dst_.pieces[runs[k - 1].second].tensor] + "' and '" +
                                dst_.names[dst_.pieces[runs[k].second].tensor] +
                                "' overlap in one local tensor: elements would be written twice");
        }
    }
}

void Planner::index_ranks(const std::vector<uint8_t>& holds) {
    ranks_.clear();
    for (size_t r = 0; r < holds.size(); ++r) {
        if (holds[r]) ranks_.push_back(int64_t(r));
    }
    dst_of_src_.resize(src_.tensors.size());
    for (size_t t = 0; t < src_of_dst_.size(); ++t) dst_of_src_[src_of_dst_[t]] = t;
}

std::vector<int64_t> Planner::tensors_of_rank(int64_t rank) const {
    // Holders are rank-sorted within a piece, so each piece is one binary search: cheaper than
    // keeping a rank index for every rank.
    std::vector<int64_t> tensors;
    for (const Piece& piece : src_.pieces) {
        if (holder_position(src_, piece, rank) >= 0) tensors.push_back(dst_of_src_[piece.tensor]);
    }
    for (const Piece& piece : dst_.pieces) {
        if (holder_position(dst_, piece, rank) >= 0) tensors.push_back(piece.tensor);
    }
    return sorted_unique(std::move(tensors));
}

int64_t Planner::first_member_from(const ReplicaGroup& group, int64_t rank) const {
    int64_t lo = 0, hi = group.count;
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (member_rank(group, mid) < rank) lo = mid + 1; else hi = mid;
    }
    return lo;
}

int64_t Planner::holder_position(const Side& side, const Piece& piece, int64_t rank) const {
    const int64_t* first = side.holders.begin() + piece.holders_first;
    const int64_t* last = first + piece.holders_count;
    const int64_t* it = std::lower_bound(
        first, last, rank, [&](int64_t buffer, int64_t r) { return side.buffers[buffer].rank < r; });
    return it != last && side.buffers[*it].rank == rank ? it - first : -1;
}

template <typename Emit>
void Planner::for_each_transfer(int64_t t, int64_t only_rank, Emit&& emit) const {
    const int64_t s = src_of_dst_[t];
    const int ndim = dst_.tensors[t].ndim;
    const int64_t g0 = group_first_[s], g1 = group_first_[s + 1];
    const int64_t per_node = options_.ranks_per_node;
    // The replica serving the holder at `position` of a piece asking a group: its own copy
    // (`own` < count and of its rank) if it has one; otherwise, taking turns over all holders
    // that asked the group before it, the next of the replicas on its node [near, far), or of
    // all replicas when its node has none. Turns are offset by the tensor index so the first
    // asker is not always served by the lowest rank. Positions count every asker, so the
    // turn of one holder is known without walking the others.
    auto pick = [&](const ReplicaGroup& group, int64_t dst_rank, int64_t turn, int64_t own,
                    int64_t near, int64_t far) {
        if (own < group.count && member_rank(group, own) == dst_rank) return own;
        if (near == far) return turn % group.count;
        return near + turn % (far - near);
    };
    std::vector<int64_t> asked(g1 - g0, 0);  // holders that asked each group so far
    std::vector<bool> has_only(g1 - g0, false);  // whether `only_rank` holds a replica
    if (only_rank >= 0) {
        for (int64_t g = g0; g < g1; ++g) {
            const int64_t m = first_member_from(groups_[g], only_rank);
            has_only[g - g0] = m < groups_[g].count && member_rank(groups_[g], m) == only_rank;
        }
    }
    for (int64_t i = dst_piece_first_[t]; i < dst_piece_first_[t + 1]; ++i) {
        const int64_t q = dst_piece_order_[i];
        const Piece& dst_piece = dst_.pieces[q];
        const int64_t* dst_buffers = dst_.holders.begin() + dst_piece.holders_first;
        const Box want = piece_box(dst_piece, ndim);
        for (int64_t g = g0; g < g1; ++g) {
            const ReplicaGroup& group = groups_[g];
            const Box box = intersect(want, group.box);
            if (box.empty()) continue;
            const int64_t base = asked[g - g0] + t;
            asked[g - g0] += dst_piece.holders_count;
            auto emit_for = [&](int64_t h, int64_t chosen) {
                emit(Transfer{t, member_piece(group, chosen), member_buffer(group, chosen), q,
                              dst_buffers[h], member_rank(group, chosen),
                              dst_.buffers[dst_buffers[h]].rank, box});
            };
            if (only_rank >= 0 && !has_only[g - g0]) {
                // `only_rank` sends nothing of this group: at most its own request concerns it.
                const int64_t h = holder_position(dst_, dst_piece, only_rank);
                if (h < 0) continue;
                int64_t near = 0, far = 0;
                if (per_node > 0) {
                    const int64_t node_first = only_rank / per_node * per_node;
                    near = first_member_from(group, node_first);
                    far = first_member_from(group, node_first + per_node);
                }
                emit_for(h, pick(group, only_rank, base + h, group.count, near, far));
                continue;
            }
            // Walk every asking holder. Both lists ascend by rank, so `own` (the first replica
            // not below the asker) and [near, far) (the replicas on its node) only move forward.
            int64_t own = 0, near = 0, far = 0;
            for (int64_t h = 0; h < dst_piece.holders_count; ++h) {
                const int64_t dst_rank = dst_.buffers[dst_buffers[h]].rank;
                while (own < group.count && member_rank(group, own) < dst_rank) ++own;
                if (per_node > 0) {
                    const int64_t node_first = dst_rank / per_node * per_node;
                    while (near < group.count && member_rank(group, near) < node_first) ++near;
                    far = std::max(far, near);
                    while (far < group.count && member_rank(group, far) < node_first + per_node) ++far;
                }
                const int64_t chosen = pick(group, dst_rank, base + h, own, near, far);
                if (only_rank >= 0 && member_rank(group, chosen) != only_rank &&
                    dst_rank != only_rank) {
                    continue;
                }
                emit_for(h, chosen);
            }
        }
    }
}

void Planner::add_transfer(const Transfer& x, RankPlan* sender, RankPlan* receiver) const {
    const Piece& src_piece = src_.pieces[x.src_piece];
    const Piece& dst_piece = dst_.pieces[x.dst_piece];
    const int64_t itemsize = dst_.tensors[x.dst_tensor].itemsize;
    for_each_copy(x.box, src_piece, dst_piece, itemsize,
                  [&](int64_t src_offset, int64_t src_pitch, int64_t dst_offset, int64_t dst_pitch,
                      int64_t rows, int64_t row_bytes) {
                      Segment seg{x.dst_tensor, 0,         0,            x.src_buffer,
                                  src_offset,   src_pitch, x.dst_buffer, dst_offset,
                                  dst_pitch,    rows,      row_bytes};
                      if (x.src_rank == x.dst_rank) {
                          seg.peer = x.dst_rank;
                          if (receiver) receiver->local.push_back(seg);
                          return;
                      }
                      if (sender) {
                          seg.peer = x.dst_rank;
                          sender->send.push_back(seg);
                      }
                      if (receiver) {
                          seg.peer = x.src_rank;
                          receiver->recv.push_back(seg);
                      }
                  });
}

namespace {

// Cuts one peer's ordered segments into messages of at most `limit` bytes. Segments are split
// between rows, and rows longer than a whole message are split within the row. The staging
// side of each piece (`staged_src` says which side) is packed contiguously.
void cut_into_buckets(const std::vector<Segment>& in, int64_t limit, bool staged_src,
                      std::vector<Segment>& out, std::vector<Message>& messages) {
    int64_t bucket = 0, used = 0;
    const int64_t peer = in.empty() ? 0 : in.front().peer;
    auto close = [&]() {
        if (used > 0) messages.push_back({peer, bucket, 0, used});
        ++bucket;
        used = 0;
    };
    auto put = [&](Segment seg) {  // seg fits in the space left
        seg.bucket = bucket;
        if (staged_src) {
            seg.src_buffer = -1;
            seg.src_offset = used;
            seg.src_pitch = seg.row_bytes;
        } else {
            seg.dst_buffer = -1;
            seg.dst_offset = used;
            seg.dst_pitch = seg.row_bytes;
        }
        used += seg.bytes();
        out.push_back(seg);
    };
    for (Segment seg : in) {
        if (seg.row_bytes > limit) {  // rows bigger than a message: one row at a time, in pieces
            for (int64_t r = 0; r < seg.rows; ++r) {
                int64_t done = 0;
                while (done < seg.row_bytes) {
                    if (used == limit) close();
                    const int64_t take = std::min(limit - used, seg.row_bytes - done);
                    Segment part = seg;
                    part.rows = 1;
                    part.row_bytes = take;
                    part.src_offset = seg.src_offset + r * seg.src_pitch + done;
                    part.dst_offset = seg.dst_offset + r * seg.dst_pitch + done;
                    part.src_pitch = part.dst_pitch = take;
                    put(part);
                    done += take;
                }
            }
            continue;
        }
        while (seg.rows > 0) {
            int64_t fit = (limit - used) / seg.row_bytes;
            if (fit == 0) {
                close();
                continue;
            }
            Segment part = seg;
            part.rows = std::min(fit, seg.rows);
            put(part);
            seg.rows -= part.rows;
            if (seg.rows == 0) break;  // no next row: its offset may not fit in int64
            seg.src_offset += part.rows * seg.src_pitch;
            seg.dst_offset += part.rows * seg.dst_pitch;
        }
    }
    if (used > 0) messages.push_back({peer, bucket, 0, used});
}

// Groups `segs` by peer (stable), cuts each peer's run into buckets, then orders everything by
// (bucket, peer) and gives each message its offset in its bucket's staging area.
void bucket_side(std::vector<Segment>& segs, std::vector<Message>& messages,
                 std::vector<int64_t>& staging, int64_t limit, bool staged_src) {
    std::stable_sort(segs.begin(), segs.end(),
                     [](const Segment& a, const Segment& b) { return a.peer < b.peer; });
    std::vector<Segment> out;
    out.reserve(segs.size());
    messages.clear();
    std::vector<Segment> run;
    for (size_t i = 0; i < segs.size();) {
        size_t j = i;
        while (j < segs.size() && segs[j].peer == segs[i].peer) ++j;
        run.assign(segs.begin() + i, segs.begin() + j);
        cut_into_buckets(run, limit, staged_src, out, messages);
        i = j;
    }
    auto by_bucket_peer = [](const auto& a, const auto& b) {
        return std::tie(a.bucket, a.peer) < std::tie(b.bucket, b.peer);
    };
    std::stable_sort(out.begin(), out.end(), by_bucket_peer);
    std::sort(messages.begin(), messages.end(), by_bucket_peer);
    int64_t num_buckets = messages.empty() ? 0 : messages.back().bucket + 1;
    staging.assign(num_buckets, 0);
    for (Message& m : messages) {
        m.offset = staging[m.bucket];
        staging[m.bucket] += m.bytes;
    }
    // Make each segment's staging offset relative to its bucket, not its message.
    size_t m = 0;
    for (Segment& seg : out) {
        while (messages[m].bucket != seg.bucket || messages[m].peer != seg.peer) ++m;
        (staged_src ? seg.src_offset : seg.dst_offset) += messages[m].offset;
    }
    segs.swap(out);
}

}  // namespace

void Planner::assign_buckets(RankPlan& plan) const {
    bucket_side(plan.send, plan.send_messages, plan.send_staging_bytes, options_.bucket_bytes,
                /*staged_src=*/false);
    bucket_side(plan.recv, plan.recv_messages, plan.recv_staging_bytes, options_.bucket_bytes,
                /*staged_src=*/true);
    plan.num_buckets = std::max(plan.send_staging_bytes.size(), plan.recv_staging_bytes.size());
}

RankPlan Planner::plan_rank(int64_t rank) const {
    RankPlan plan;
    plan.rank = rank;
    for (int64_t tensor : tensors_of_rank(rank)) {
        for_each_transfer(tensor, rank, [&](const Transfer& x) {
            add_transfer(x, x.src_rank == rank ? &plan : nullptr,
                         x.dst_rank == rank ? &plan : nullptr);
        });
    }
    assign_buckets(plan);
    return plan;
}

std::vector<RankPlan> Planner::plan_all() const {
    std::vector<RankPlan> plans(ranks_.size());
    for (size_t r = 0; r < ranks_.size(); ++r) plans[r].rank = ranks_[r];
    auto slot = [&](int64_t rank) {
        return &plans[std::lower_bound(ranks_.begin(), ranks_.end(), rank) - ranks_.begin()];
    };
    for (size_t t = 0; t < dst_.tensors.size(); ++t) {
        for_each_transfer(t, -1, [&](const Transfer& x) {
            add_transfer(x, slot(x.src_rank), slot(x.dst_rank));
        });
    }
    for (RankPlan& plan : plans) assign_buckets(plan);
    return plans;
}

}  // namespace refit
