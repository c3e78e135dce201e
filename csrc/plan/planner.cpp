#include "plan/planner.h"

#include <algorithm>
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
    check_tensors();
    check_pieces(src_, "source");
    check_pieces(dst_, "destination");
    bucket_by_key(
        dst_.pieces.size(), dst_.tensors.size(), [&](int64_t i) { return dst_.pieces[i].tensor; },
        dst_piece_first_, dst_piece_order_);
    bucket_by_key(
        src_.pieces.size(), src_.tensors.size(), [&](int64_t i) { return src_.pieces[i].tensor; },
        src_piece_first_, src_piece_order_);
    index_source_replicas();
    check_destination_buffers();
    index_ranks();
}

std::vector<int64_t> Planner::holder_ranks(const Side& side, int64_t tensor) const {
    std::vector<int64_t> ranks;
    for (const Piece& piece : side.pieces) {
        if (piece.tensor == tensor) ranks.push_back(side.buffers[piece.buffer].rank);
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
        auto it = src_index.find(name);
        if (it == src_index.end()) {
            throw PlanError(name, holder_ranks(dst_, t),
                            "destination tensor has no source: missing from the source layout");
        }
        if (src_used[it->second]) {  // names are unique on the source side, so t is a repeat
            throw PlanError(name, holder_ranks(dst_, t), "appears twice in the destination layout");
        }
        const TensorSpec& a = src_.tensors[it->second];
        const TensorSpec& b = dst_.tensors[t];
        if (a.ndim != b.ndim || !std::equal(a.shape.begin(), a.shape.begin() + a.ndim,
                                            b.shape.begin())) {
            std::vector<int64_t> ranks = holder_ranks(src_, it->second);
            std::vector<int64_t> more = holder_ranks(dst_, t);
            ranks.insert(ranks.end(), more.begin(), more.end());
            throw PlanError(name, sorted_unique(ranks),
                            "global shape differs: source " + index_str(a.shape, a.ndim) +
                                ", destination " + index_str(b.shape, b.ndim));
        }
        if (a.dtype_code != b.dtype_code || a.itemsize != b.itemsize) {
            std::vector<int64_t> ranks = holder_ranks(src_, it->second);
            std::vector<int64_t> more = holder_ranks(dst_, t);
            ranks.insert(ranks.end(), more.begin(), more.end());
            throw PlanError(name, sorted_unique(ranks),
                            "dtype differs between source and destination (dtype codes " +
                                std::to_string(a.dtype_code) + " and " +
                                std::to_string(b.dtype_code) + ")");
        }
        src_of_dst_[t] = it->second;
        src_used[it->second] = true;
    }
    for (size_t s = 0; s < src_used.size(); ++s) {
        if (!src_used[s]) {
            throw PlanError(src_.names[s], holder_ranks(src_, s),
                            "source tensor is not in the destination layout (extra tensor)");
        }
    }
}

void Planner::check_pieces(const Side& side, const char* side_name) {
    const std::string where = side_name;
    for (const Buffer& buffer : side.buffers) {
        if (buffer.rank < 0 || buffer.numel < 0 || buffer.itemsize <= 0) {
            throw PlanError("*", {buffer.rank}, where + " buffer has a negative rank or size");
        }
    }
    for (const Piece& piece : side.pieces) {
        if (piece.tensor < 0 || piece.tensor >= int64_t(side.tensors.size()) ||
            piece.buffer < 0 || piece.buffer >= int64_t(side.buffers.size())) {
            throw PlanError("*", {}, where + " piece refers to a tensor or buffer that does not exist");
        }
        const TensorSpec& spec = side.tensors[piece.tensor];
        const Buffer& buffer = side.buffers[piece.buffer];
        const std::string& name = side.names[piece.tensor];
        const Box box = piece_box(piece, spec.ndim);
        for (int d = 0; d < spec.ndim; ++d) {
            if (piece.start[d] < 0 || piece.extent[d] <= 0 ||
                piece.start[d] + piece.extent[d] > spec.shape[d]) {
                throw PlanError(name, {buffer.rank},
                                where + " piece " + box.str() + " lies outside the global shape " +
                                    index_str(spec.shape, spec.ndim));
            }
        }
        if (buffer.itemsize != spec.itemsize) {
            throw PlanError(name, {buffer.rank},
                            where + " local tensor has element size " +
                                std::to_string(buffer.itemsize) + " but the tensor has " +
                                std::to_string(spec.itemsize));
        }
        const int last = spec.ndim - 1;
        if (last >= 0 && piece.extent[last] > 1 && piece.local_stride[last] != 1) {
            throw PlanError(name, {buffer.rank},
                            where + " local tensor is not contiguous in its last dimension "
                                    "(stride " + std::to_string(piece.local_stride[last]) + ")");
        }
        const Span hull = footprint_hull(piece, spec.ndim);
        if (hull.lo < 0 || hull.hi > buffer.numel) {
            throw PlanError(name, {buffer.rank},
                            where + " piece " + box.str() + " reaches elements [" +
                                std::to_string(hull.lo) + ", " + std::to_string(hull.hi) +
                                ") of a local tensor of " + std::to_string(buffer.numel) +
                                " elements");
        }
    }
}

void Planner::index_source_replicas() {
    group_first_.assign(src_.tensors.size() + 1, 0);
    std::vector<int64_t> pieces;  // scratch, reused for every tensor
    for (size_t s = 0; s < src_.tensors.size(); ++s) {
        const TensorSpec& spec = src_.tensors[s];
        const int ndim = spec.ndim;
        // Sort this tensor's pieces by box, then by rank: equal boxes become one replica group.
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
            const int64_t rx = src_.buffers[x.buffer].rank, ry = src_.buffers[y.buffer].rank;
            return rx != ry ? rx < ry : a < b;
        });
        const size_t first_group = groups_.size();
        int64_t covered = 0;
        for (size_t i = 0; i < pieces.size();) {
            const Box box = piece_box(src_.pieces[pieces[i]], ndim);
            size_t j = i;
            while (j < pieces.size() && piece_box(src_.pieces[pieces[j]], ndim).same_as(box)) {
                group_pieces_.push_back(pieces[j]);
                group_ranks_.push_back(src_.buffers[src_.pieces[pieces[j]].buffer].rank);
                ++j;
            }
            groups_.push_back({box, int64_t(group_pieces_.size() - (j - i)), int64_t(j - i)});
            covered += box.volume();
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
                    throw PlanError(
                        src_.names[s],
                        sorted_unique({src_.buffers[src_.pieces[group_pieces_[groups_[a].first]].buffer].rank,
                                       src_.buffers[src_.pieces[group_pieces_[groups_[b].first]].buffer].rank}),
                        "source pieces " + box.str() + " and " + groups_[b].box.str() +
                            " overlap without being the same box");
                }
            }
        }
        if (covered != numel(spec)) {
            std::vector<int64_t> ranks;
            for (int64_t p : pieces) ranks.push_back(src_.buffers[src_.pieces[p].buffer].rank);
            throw PlanError(src_.names[s], sorted_unique(ranks),
                            "source pieces cover " + std::to_string(covered) + " of " +
                                std::to_string(numel(spec)) +
                                " elements (a shard is missing or sizes do not divide)");
        }
        group_first_[s + 1] = groups_.size();
    }
}

void Planner::check_destination_buffers() {
    // Every destination element written exactly once: the pieces in each local tensor must be
    // disjoint and fill it. Since source boxes tile each tensor, each piece is then written once.
    std::vector<int64_t> first, order;
    bucket_by_key(
        dst_.pieces.size(), dst_.buffers.size(), [&](int64_t i) { return dst_.pieces[i].buffer; },
        first, order);
    struct Placed {
        Span hull;
        int64_t piece;
    };
    std::vector<Placed> placed;  // reused across buffers: most hold a single piece
    for (size_t b = 0; b < dst_.buffers.size(); ++b) {
        const Buffer& buffer = dst_.buffers[b];
        placed.clear();
        int64_t volume = 0;
        for (int64_t i = first[b]; i < first[b + 1]; ++i) {
            const Piece& piece = dst_.pieces[order[i]];
            const int ndim = dst_.tensors[piece.tensor].ndim;
            placed.push_back({footprint_hull(piece, ndim), order[i]});
            volume += piece_box(piece, ndim).volume();
        }
        if (volume != buffer.numel) {
            const std::string name = placed.empty()
                                         ? std::string("*")
                                         : dst_.names[dst_.pieces[placed[0].piece].tensor];
            throw PlanError(name, {buffer.rank},
                            "destination local tensor has " + std::to_string(buffer.numel) +
                                " elements but its pieces cover " + std::to_string(volume) +
                                ": some elements would never be written");
        }
        std::sort(placed.begin(), placed.end(),
                  [](const Placed& a, const Placed& b) { return a.hull.lo < b.hull.lo; });
        bool hulls_disjoint = true;
        for (size_t i = 1; i < placed.size(); ++i) {
            if (placed[i].hull.lo < placed[i - 1].hull.hi) hulls_disjoint = false;
        }
        if (hulls_disjoint) continue;
        // Interleaved pieces (strided views): compare their contiguous runs exactly.
        std::vector<std::pair<Span, int64_t>> runs;
        for (const Placed& p : placed) {
            const Piece& piece = dst_.pieces[p.piece];
            for_each_run(piece, dst_.tensors[piece.tensor].ndim, [&](int64_t lo, int64_t len) {
                runs.push_back({{lo, lo + len}, p.piece});
            });
        }
        std::sort(runs.begin(), runs.end(),
                  [](const auto& a, const auto& b) { return a.first.lo < b.first.lo; });
        for (size_t i = 1; i < runs.size(); ++i) {
            if (runs[i].first.lo < runs[i - 1].first.hi) {
                throw PlanError(dst_.names[dst_.pieces[runs[i].second].tensor], {buffer.rank},
                                "destination pieces of tensors '" +
                                    dst_.names[dst_.pieces[runs[i - 1].second].tensor] + "' and '" +
                                    dst_.names[dst_.pieces[runs[i].second].tensor] +
                                    "' overlap in one local tensor: elements would be written twice");
            }
        }
    }
}

void Planner::index_ranks() {
    std::vector<bool> holds;  // by rank: ranks are small dense integers
    for (const Side* side : {&src_, &dst_}) {
        for (const Buffer& buffer : side->buffers) {
            if (buffer.rank >= int64_t(holds.size())) holds.resize(buffer.rank + 1, false);
            holds[buffer.rank] = true;
        }
    }
    ranks_.clear();
    for (size_t r = 0; r < holds.size(); ++r) {
        if (holds[r]) ranks_.push_back(r);
    }
    dst_of_src_.resize(src_.tensors.size());
    for (size_t t = 0; t < src_of_dst_.size(); ++t) dst_of_src_[src_of_dst_[t]] = t;
}

std::vector<int64_t> Planner::tensors_of_rank(int64_t rank) const {
    // One pass over both sides' pieces: cheaper than keeping a rank index for every rank.
    std::vector<int64_t> tensors;
    for (const Piece& piece : src_.pieces) {
        if (src_.buffers[piece.buffer].rank == rank) tensors.push_back(dst_of_src_[piece.tensor]);
    }
    for (const Piece& piece : dst_.pieces) {
        if (dst_.buffers[piece.buffer].rank == rank) tensors.push_back(piece.tensor);
    }
    return sorted_unique(std::move(tensors));
}

template <typename Emit>
void Planner::for_each_transfer(int64_t t, Emit&& emit) const {
    const int64_t s = src_of_dst_[t];
    const int ndim = dst_.tensors[t].ndim;
    const int64_t g0 = group_first_[s], g1 = group_first_[s + 1];
    // How many remote ranks have asked each replica group so far: the next one gets the next
    // replica. Offset by the tensor index so the first asker is not always served by the
    // lowest rank.
    std::vector<int64_t> asked(g1 - g0, 0);
    for (int64_t i = dst_piece_first_[t]; i < dst_piece_first_[t + 1]; ++i) {
        const int64_t p = dst_piece_order_[i];
        const Piece& dst_piece = dst_.pieces[p];
        const int64_t dst_rank = dst_.buffers[dst_piece.buffer].rank;
        const Box want = piece_box(dst_piece, ndim);
        for (int64_t g = g0; g < g1; ++g) {
            const ReplicaGroup& group = groups_[g];
            Box box = intersect(want, group.box);
            if (box.empty()) continue;
            // Replicas are sorted by rank, so the local one and those on the destination's node
            // are found by binary search: groups of DP replicas run to hundreds of ranks.
            const int64_t* replicas = group_pieces_.data() + group.first;
            const int64_t* ranks = group_ranks_.data() + group.first;
            const int64_t* end = ranks + group.count;
            const int64_t* local = std::lower_bound(ranks, end, dst_rank);
            int64_t chosen = -1;
            if (local != end && *local == dst_rank) {
                chosen = replicas[local - ranks];
            } else {
                // Next replica in turn, among those on the destination's node if there are any.
                const int64_t turn = asked[g - g0]++ + t;
                const int64_t* lo = ranks;
                const int64_t* hi = end;
                if (options_.ranks_per_node > 0) {
                    const int64_t node = dst_rank / options_.ranks_per_node;
                    const int64_t* a = std::lower_bound(ranks, end, node * options_.ranks_per_node);
                    const int64_t* b = std::lower_bound(a, end, (node + 1) * options_.ranks_per_node);
                    if (a != b) lo = a, hi = b;
                }
                chosen = replicas[(lo - ranks) + turn % (hi - lo)];
            }
            emit(Transfer{t, chosen, p, src_.buffers[src_.pieces[chosen].buffer].rank, dst_rank,
                          box});
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
                      Segment seg{x.dst_tensor, 0,         0,          src_piece.buffer,
                                  src_offset,   src_pitch, dst_piece.buffer, dst_offset,
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
        for_each_transfer(tensor, [&](const Transfer& x) {
            if (x.src_rank != rank && x.dst_rank != rank) return;
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
        for_each_transfer(t, [&](const Transfer& x) {
            add_transfer(x, slot(x.src_rank), slot(x.dst_rank));
        });
    }
    for (RankPlan& plan : plans) assign_buckets(plan);
    return plans;
}

}  // namespace refit
