#include "plan/validate.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "plan/error.h"
#include "plan/replicas.h"

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

std::vector<int64_t> sorted_unique(std::vector<int64_t> v) {
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    return v;
}

// The ranks holding any piece of `tensor`, for error messages, possibly before the pieces are
// validated: skips what does not exist.
std::vector<int64_t> holder_ranks(const Side& side, int64_t tensor) {
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

// The ranks of both sides holding `s` (source) and `t` (destination), for error messages.
std::vector<int64_t> both_holder_ranks(const Side& src, int64_t s, const Side& dst, int64_t t) {
    std::vector<int64_t> ranks = holder_ranks(src, s);
    std::vector<int64_t> more = holder_ranks(dst, t);
    ranks.insert(ranks.end(), more.begin(), more.end());
    return sorted_unique(ranks);
}

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

void mark_rank(RankMarks& holds, int64_t rank) {
    if (rank >= int64_t(holds.size())) holds.resize(rank + 1, 0);
    holds[rank] = 1;
}

// The first destination piece held in `buffer` (for messages), or -1.
int64_t first_piece_in(const Side& dst, int64_t buffer) {
    for (size_t p = 0; p < dst.pieces.size(); ++p) {
        const Piece& piece = dst.pieces[p];
        const int64_t* holders = dst.holders.begin() + piece.holders_first;
        if (std::find(holders, holders + piece.holders_count, buffer) !=
            holders + piece.holders_count) {
            return int64_t(p);
        }
    }
    return -1;
}

// A destination piece and the span of buffer elements it reaches.
struct Placed {
    Span hull;
    int64_t piece;
};

// Raises when pieces placed in destination buffer `b` overlap (reorders `placed`).
void check_disjoint(const Side& dst, int64_t b, std::vector<Placed>& placed) {
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
        const Piece& piece = dst.pieces[p.piece];
        for_each_run(piece, dst.tensors[piece.tensor].ndim, [&](int64_t lo, int64_t len) {
            runs.push_back({{lo, lo + len}, p.piece});
        });
    }
    std::sort(runs.begin(), runs.end(),
              [](const auto& x, const auto& y) { return x.first.lo < y.first.lo; });
    for (size_t k = 1; k < runs.size(); ++k) {
        if (runs[k].first.lo < runs[k - 1].first.hi) {
            throw PlanError(dst.names[dst.pieces[runs[k].second].tensor], {dst.buffers[b].rank},
                            "destination pieces of tensors '" +
                                dst.names[dst.pieces[runs[k - 1].second].tensor] + "' and '" +
                                dst.names[dst.pieces[runs[k].second].tensor] +
                                "' overlap in one local tensor: elements would be written twice");
        }
    }
}

}  // namespace

std::string dtype_name(int64_t code) {
    if (code >= 0 && code < kNumDtypeNames) return kDtypeNames[code];
    return "dtype code " + std::to_string(code);
}

void check_options(const PlanOptions& options) {
    if (options.bucket_bytes <= 0) {
        throw PlanError("*", {}, "bucket_bytes must be positive, got " +
                                     std::to_string(options.bucket_bytes));
    }
    if (options.ranks_per_node < 0) {
        throw PlanError("*", {}, "ranks_per_node must be 0 (no node preference) or positive, got " +
                                     std::to_string(options.ranks_per_node));
    }
}

std::vector<int64_t> check_tensors(const Side& src, const Side& dst) {
    for (const Side* side : {&src, &dst}) {
        if (side->names.size() != side->tensors.size()) {
            throw PlanError("*", {}, "layout has " + std::to_string(side->names.size()) +
                                         " names for " + std::to_string(side->tensors.size()) +
                                         " tensors");
        }
    }
    for (const Side* side : {&src, &dst}) {
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
    // Views into src.names, which outlive the map.
    std::unordered_map<std::string_view, int64_t> src_index;
    src_index.reserve(src.names.size() * 2);
    for (size_t i = 0; i < src.names.size(); ++i) {
        if (!src_index.emplace(src.names[i], i).second) {
            throw PlanError(src.names[i], {}, "appears twice in the source layout");
        }
    }
    std::vector<bool> src_used(src.names.size(), false);
    std::vector<int64_t> src_of_dst(dst.names.size());
    for (size_t t = 0; t < dst.names.size(); ++t) {
        const std::string& name = dst.names[t];
        // Both sides usually list tensors in the same order: try that before hashing.
        int64_t s = -1;
        if (t < src.names.size() && src.names[t] == name) {
            s = int64_t(t);
        } else if (auto it = src_index.find(name); it != src_index.end()) {
            s = it->second;
        }
        if (s < 0) {
            throw PlanError(name, holder_ranks(dst, t),
                            "destination tensor has no source: missing from the source layout");
        }
        if (src_used[s]) {  // names are unique on the source side, so t is a repeat
            throw PlanError(name, holder_ranks(dst, t), "appears twice in the destination layout");
        }
        const TensorSpec& a = src.tensors[s];
        const TensorSpec& b = dst.tensors[t];
        if (a.ndim != b.ndim || !std::equal(a.shape.begin(), a.shape.begin() + a.ndim,
                                            b.shape.begin())) {
            throw PlanError(name, both_holder_ranks(src, s, dst, t),
                            "global shape differs: source " + index_str(a.shape, a.ndim) +
                                ", destination " + index_str(b.shape, b.ndim));
        }
        if (a.dtype_code != b.dtype_code || a.itemsize != b.itemsize) {
            throw PlanError(name, both_holder_ranks(src, s, dst, t),
                            "dtype differs between source and destination (" +
                                dtype_name(a.dtype_code) + " and " + dtype_name(b.dtype_code) +
                                ")");
        }
        src_of_dst[t] = s;
        src_used[s] = true;
    }
    for (size_t s = 0; s < src_used.size(); ++s) {
        if (!src_used[s]) {
            throw PlanError(src.names[s], holder_ranks(src, s),
                            "source tensor is not in the destination layout (extra tensor)");
        }
    }
    return src_of_dst;
}

void check_unused_buffers(const Side& side, const char* side_name, bool destination,
                          const BufferUses& uses, RankMarks& holds) {
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

void check_pieces(const Side& side, const char* side_name, bool destination, BufferUses& uses,
                  RankMarks& holds) {
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
            if (destination) {
                // A first piece as large as its local tensor fills it (its elements are distinct
                // and inside it): any second piece there writes some element twice. Local
                // tensors whose first piece is smaller are compared piece by piece later.
                if (!(use & kPieceCount)) {
                    if (volume != buffer.numel) use |= kPartlyFilled;
                } else if (!(use & kPartlyFilled)) {
                    throw PlanError(name, {buffer.rank},
                                    "destination pieces of tensors '" +
                                        side.names[side.pieces[first_piece_in(side, holders[i])].tensor] +
                                        "' and '" + name +
                                        "' overlap in one local tensor: elements would be "
                                        "written twice");
                }
            }
            if ((use & kPieceCount) < kSeveral) ++use;
        }
    }
}

void check_source_tiling(const Side& src, int64_t tensor, const ReplicaIndex& replicas,
                         int64_t first_group, int64_t end_group) {
    if (first_group == end_group) {
        throw PlanError(src.names[tensor], {}, "no source rank holds any part of the tensor");
    }
    const TensorSpec& spec = src.tensors[tensor];
    const int ndim = spec.ndim;
    const std::vector<ReplicaGroup>& groups = replicas.groups;
    // Groups are sorted by start, so only groups starting before a box ends can overlap it.
    for (int64_t a = first_group; a < end_group; ++a) {
        const Box& box = groups[a].box;
        const int64_t end0 = ndim ? box.start[0] + box.extent[0] : 1;
        for (int64_t b = a + 1; b < end_group; ++b) {
            if (ndim && groups[b].box.start[0] >= end0) break;
            if (!intersect(box, groups[b].box).empty()) {
                throw PlanError(src.names[tensor],
                                sorted_unique({replicas.member_rank(src, groups[a], 0),
                                               replicas.member_rank(src, groups[b], 0)}),
                                "source pieces " + box.str() + " and " + groups[b].box.str() +
                                    " overlap without being the same box");
            }
        }
    }
    // Disjoint boxes inside the shape: their volumes add up to at most numel, no overflow
    // (summed before the overlap check, overlapping huge boxes could pass int64).
    int64_t covered = 0;
    for (int64_t g = first_group; g < end_group; ++g) covered += groups[g].box.volume();
    if (covered != numel(spec)) {
        throw PlanError(src.names[tensor], holder_ranks(src, tensor),
                        "source pieces cover " + std::to_string(covered) + " of " +
                            std::to_string(numel(spec)) +
                            " elements (a shard is missing or sizes do not divide)");
    }
}

void check_destination_coverage(const Side& dst, const BufferUses& uses) {
    // Since source boxes tile each tensor, each piece is then written once. A local tensor
    // with one piece was settled while checking pieces (filled, or smaller than its tensor);
    // only those holding several are indexed and compared here.
    const size_t num_buffers = dst.buffers.size();
    auto never_written = [&](int64_t b, int64_t covered) {
        const int64_t numel = dst.buffers[b].numel;
        return PlanError(dst.names[dst.pieces[first_piece_in(dst, b)].tensor], {dst.buffers[b].rank},
                         "destination local tensor has " + std::to_string(numel) +
                             " elements but its pieces cover " + std::to_string(covered) +
                             ": some elements would never be written");
    };
    bool any_shared = false;  // a local tensor holding several pieces
    for (size_t b = 0; b < num_buffers; ++b) {
        const uint8_t use = uses[b];
        if ((use & kPieceCount) == 1 && (use & kPartlyFilled)) {
            const Piece& only = dst.pieces[first_piece_in(dst, b)];
            throw never_written(b, piece_box(only, dst.tensors[only.tensor].ndim).volume());
        }
        any_shared |= (use & kPieceCount) == kSeveral;
    }
    if (!any_shared) return;
    // The pieces of each shared local tensor, grouped by buffer: (buffer, piece) packed in one
    // integer, since sorting plain integers is several times faster than sorting pairs.
    const int piece_bits = std::max(1, int(std::ceil(std::log2(double(dst.pieces.size()) + 1))));
    std::vector<uint64_t> pairs;
    for (size_t p = 0; p < dst.pieces.size(); ++p) {
        const Piece& piece = dst.pieces[p];
        const int64_t* holders = dst.holders.begin() + piece.holders_first;
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
            const Piece& piece = dst.pieces[p];
            placed.push_back({footprint_hull(piece, dst.tensors[piece.tensor].ndim), p});
        }
        check_disjoint(dst, b, placed);
        // Disjoint pieces inside the local tensor: their volumes add up to at most its size
        // (summed before the check, overlapping huge pieces could pass int64).
        int64_t covered = 0;
        for (const Placed& x : placed) {
            const Piece& piece = dst.pieces[x.piece];
            covered += piece_box(piece, dst.tensors[piece.tensor].ndim).volume();
        }
        if (covered != dst.buffers[b].numel) throw never_written(b, covered);
    }
}

std::vector<int64_t> marked_ranks(const RankMarks& holds) {
    std::vector<int64_t> ranks;
    for (size_t r = 0; r < holds.size(); ++r) {
        if (holds[r]) ranks.push_back(int64_t(r));
    }
    return ranks;
}

CheckedLayouts check_layouts(const Side& src, const Side& dst) {
    CheckedLayouts out;
    out.src_of_dst = check_tensors(src, dst);
    RankMarks holds;
    BufferUses src_uses(src.buffers.size(), 0);
    out.dst_uses.assign(dst.buffers.size(), 0);
    check_pieces(src, "source", false, src_uses, holds);
    check_pieces(dst, "destination", true, out.dst_uses, holds);
    check_unused_buffers(src, "source", false, src_uses, holds);
    check_unused_buffers(dst, "destination", true, out.dst_uses, holds);
    out.ranks = marked_ranks(holds);
    return out;
}

}  // namespace refit
