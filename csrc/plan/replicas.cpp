#include "plan/replicas.h"

#include <algorithm>
#include <numeric>

#include "plan/validate.h"

namespace refit {

PieceIndex pieces_by_tensor(const Side& side) {
    // A stable counting sort of piece indices by tensor.
    PieceIndex index;
    const int64_t num_pieces = int64_t(side.pieces.size());
    index.first.assign(side.tensors.size() + 1, 0);
    for (int64_t i = 0; i < num_pieces; ++i) ++index.first[side.pieces[i].tensor + 1];
    std::partial_sum(index.first.begin(), index.first.end(), index.first.begin());
    index.order.resize(num_pieces);
    std::vector<int64_t> next(index.first.begin(), index.first.end() - 1);
    for (int64_t i = 0; i < num_pieces; ++i) index.order[next[side.pieces[i].tensor]++] = i;
    return index;
}

int64_t ReplicaIndex::first_member_from(const Side& src, const ReplicaGroup& group,
                                        int64_t rank) const {
    int64_t lo = 0, hi = group.count;
    while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (member_rank(src, group, mid) < rank) lo = mid + 1; else hi = mid;
    }
    return lo;
}

ReplicaIndex index_replicas(const Side& src, const PieceIndex& src_pieces) {
    ReplicaIndex index;
    index.first.assign(src.tensors.size() + 1, 0);
    std::vector<int64_t> pieces;  // scratch, reused for every tensor
    struct Member {
        int64_t rank, piece, buffer;
    };
    std::vector<Member> members;  // scratch for merging pieces of one box
    auto rank_of = [&](int64_t piece, int64_t i) {
        return src.buffers[src.holders[src.pieces[piece].holders_first + i]].rank;
    };
    for (size_t s = 0; s < src.tensors.size(); ++s) {
        const int ndim = src.tensors[s].ndim;
        // Sort this tensor's pieces by box: pieces with equal boxes make one replica group.
        pieces.assign(src_pieces.order.begin() + src_pieces.first[s],
                      src_pieces.order.begin() + src_pieces.first[s + 1]);
        std::sort(pieces.begin(), pieces.end(), [&](int64_t a, int64_t b) {
            const Piece& x = src.pieces[a];
            const Piece& y = src.pieces[b];
            for (int d = 0; d < ndim; ++d) {
                if (x.start[d] != y.start[d]) return x.start[d] < y.start[d];
            }
            for (int d = 0; d < ndim; ++d) {
                if (x.extent[d] != y.extent[d]) return x.extent[d] < y.extent[d];
            }
            return a < b;
        });
        const int64_t first_group = int64_t(index.groups.size());
        for (size_t i = 0; i < pieces.size();) {
            const Box box = piece_box(src.pieces[pieces[i]], ndim);
            size_t j = i + 1;
            while (j < pieces.size() && piece_box(src.pieces[pieces[j]], ndim).same_as(box)) ++j;
            if (j == i + 1) {  // the common case: one piece, its holders already rank-sorted
                const Piece& piece = src.pieces[pieces[i]];
                index.groups.push_back({box, pieces[i], piece.holders_first, piece.holders_count});
            } else {
                members.clear();
                for (size_t k = i; k < j; ++k) {
                    const Piece& piece = src.pieces[pieces[k]];
                    for (int64_t h = 0; h < piece.holders_count; ++h) {
                        members.push_back({rank_of(pieces[k], h), pieces[k],
                                           src.holders[piece.holders_first + h]});
                    }
                }
                std::stable_sort(members.begin(), members.end(),
                                 [](const Member& a, const Member& b) { return a.rank < b.rank; });
                index.groups.push_back(
                    {box, -1, int64_t(index.merged_pieces.size()), int64_t(members.size())});
                for (const Member& m : members) {
                    index.merged_pieces.push_back(m.piece);
                    index.merged_buffers.push_back(m.buffer);
                }
            }
            i = j;
        }
        // NOTE: per tensor, before the next is indexed, so the first bad tensor is the one named.
        check_source_tiling(src, int64_t(s), index, first_group, int64_t(index.groups.size()));
        index.first[s + 1] = int64_t(index.groups.size());
    }
    return index;
}

int64_t holder_position(const Side& side, const Piece& piece, int64_t rank) {
    const int64_t* first = side.holders.begin() + piece.holders_first;
    const int64_t* last = first + piece.holders_count;
    const int64_t* it = std::lower_bound(
        first, last, rank, [&](int64_t buffer, int64_t r) { return side.buffers[buffer].rank < r; });
    return it != last && side.buffers[*it].rank == rank ? it - first : -1;
}

void for_each_transfer(const TransferInputs& in, int64_t t, int64_t only_rank,
                       const std::function<void(const Transfer&)>& emit) {
    const Side& src = in.src;
    const Side& dst = in.dst;
    const ReplicaIndex& replicas = in.replicas;
    const std::vector<ReplicaGroup>& groups = replicas.groups;
    const int64_t s = in.src_of_dst[t];
    const int ndim = dst.tensors[t].ndim;
    const int64_t g0 = replicas.first[s], g1 = replicas.first[s + 1];
    const int64_t per_node = in.ranks_per_node;
    auto rank_of = [&](const ReplicaGroup& group, int64_t i) {
        return replicas.member_rank(src, group, i);
    };
    auto first_from = [&](const ReplicaGroup& group, int64_t rank) {
        return replicas.first_member_from(src, group, rank);
    };
    // The replica serving the holder at `position` of a piece asking a group: its own copy
    // (`own` < count and of its rank) if it has one; otherwise, taking turns over all holders
    // that asked the group before it, the next of the replicas on its node [near, far), or of
    // all replicas when its node has none. Turns are offset by the tensor index so the first
    // asker is not always served by the lowest rank. Positions count every asker, so the
    // turn of one holder is known without walking the others.
    auto pick = [&](const ReplicaGroup& group, int64_t dst_rank, int64_t turn, int64_t own,
                    int64_t near, int64_t far) {
        if (own < group.count && rank_of(group, own) == dst_rank) return own;
        if (near == far) return turn % group.count;
        return near + turn % (far - near);
    };
    std::vector<int64_t> asked(g1 - g0, 0);      // holders that asked each group so far
    std::vector<bool> has_only(g1 - g0, false);  // whether `only_rank` holds a replica
    if (only_rank >= 0) {
        for (int64_t g = g0; g < g1; ++g) {
            const int64_t m = first_from(groups[g], only_rank);
            has_only[g - g0] = m < groups[g].count && rank_of(groups[g], m) == only_rank;
        }
    }
    for (int64_t i = in.dst_pieces.first[t]; i < in.dst_pieces.first[t + 1]; ++i) {
        const int64_t q = in.dst_pieces.order[i];
        const Piece& dst_piece = dst.pieces[q];
        const int64_t* dst_buffers = dst.holders.begin() + dst_piece.holders_first;
        const Box want = piece_box(dst_piece, ndim);
        for (int64_t g = g0; g < g1; ++g) {
            const ReplicaGroup& group = groups[g];
            const Box box = intersect(want, group.box);
            if (box.empty()) continue;
            const int64_t base = asked[g - g0] + t;
            asked[g - g0] += dst_piece.holders_count;
            auto emit_for = [&](int64_t h, int64_t chosen) {
                emit(Transfer{t, replicas.member_piece(group, chosen),
                              replicas.member_buffer(src, group, chosen), q, dst_buffers[h],
                              rank_of(group, chosen), dst.buffers[dst_buffers[h]].rank, box});
            };
            if (only_rank >= 0 && !has_only[g - g0]) {
                // `only_rank` sends nothing of this group: at most its own request concerns it.
                const int64_t h = holder_position(dst, dst_piece, only_rank);
                if (h < 0) continue;
                int64_t near = 0, far = 0;
                if (per_node > 0) {
                    const int64_t node_first = only_rank / per_node * per_node;
                    near = first_from(group, node_first);
                    far = first_from(group, node_first + per_node);
                }
                emit_for(h, pick(group, only_rank, base + h, group.count, near, far));
                continue;
            }
            // Walk every asking holder. Both lists ascend by rank, so `own` (the first replica
            // not below the asker) and [near, far) (the replicas on its node) only move forward.
            int64_t own = 0, near = 0, far = 0;
            for (int64_t h = 0; h < dst_piece.holders_count; ++h) {
                const int64_t dst_rank = dst.buffers[dst_buffers[h]].rank;
                while (own < group.count && rank_of(group, own) < dst_rank) ++own;
                if (per_node > 0) {
                    const int64_t node_first = dst_rank / per_node * per_node;
                    while (near < group.count && rank_of(group, near) < node_first) ++near;
                    far = std::max(far, near);
                    while (far < group.count && rank_of(group, far) < node_first + per_node) ++far;
                }
                const int64_t chosen = pick(group, dst_rank, base + h, own, near, far);
                if (only_rank >= 0 && rank_of(group, chosen) != only_rank && dst_rank != only_rank) {
                    continue;
                }
                emit_for(h, chosen);
            }
        }
    }
}

}  // namespace refit
