// Replica choice: which source replica feeds each holder of each destination piece. The
// source side is indexed once into replica groups (the holders of one box of a tensor, in
// ascending rank); for_each_transfer then pairs every destination holder with one member of
// every group its piece overlaps, deterministically, so a sender and its receiver derive the
// same pairing alone.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "plan/geometry.h"
#include "plan/types.h"

namespace refit {

// CSR of a side's pieces by tensor: tensor t's pieces are order[first[t] .. first[t + 1]),
// in table order.
struct PieceIndex {
    std::vector<int64_t> first;
    std::vector<int64_t> order;
};
PieceIndex pieces_by_tensor(const Side& side);

// The source replicas of one box of a tensor, in ascending rank: usually the holders of one
// piece, read in place; several pieces with the same box are merged into a list.
struct ReplicaGroup {
    Box box;
    int64_t piece;  // the piece whose holders these are, or -1 when merged
    int64_t first;  // into src.holders (one piece) or merged_* (merged)
    int64_t count;
};

// Every source tensor's replica groups, sorted by box (start, then extent).
struct ReplicaIndex {
    std::vector<int64_t> first;  // CSR of groups by source tensor
    std::vector<ReplicaGroup> groups;
    std::vector<int64_t> merged_pieces;   // members of merged groups: piece and buffer,
    std::vector<int64_t> merged_buffers;  // ascending rank within a group

    int64_t member_piece(const ReplicaGroup& group, int64_t i) const {
        return group.piece >= 0 ? group.piece : merged_pieces[group.first + i];
    }
    int64_t member_buffer(const Side& src, const ReplicaGroup& group, int64_t i) const {
        return group.piece >= 0 ? src.holders[group.first + i] : merged_buffers[group.first + i];
    }
    int64_t member_rank(const Side& src, const ReplicaGroup& group, int64_t i) const {
        return src.buffers[member_buffer(src, group, i)].rank;
    }
    // The first member of `group` whose rank is not below `rank` (count if none).
    int64_t first_member_from(const Side& src, const ReplicaGroup& group, int64_t rank) const;
};

// Groups each source tensor's pieces by box. Checks that the boxes tile the tensor
// (check_source_tiling, validate.h) as each tensor is indexed; `src` must have passed
// check_pieces.
ReplicaIndex index_replicas(const Side& src, const PieceIndex& src_pieces);

// Where `rank` is among the holders of `piece` (of `side`), or -1.
int64_t holder_position(const Side& side, const Piece& piece, int64_t rank);

// One box of a destination tensor that one holder of a destination piece gets from one
// replica of a source piece.
struct Transfer {
    int64_t dst_tensor;
    int64_t src_piece;
    int64_t src_buffer;
    int64_t dst_piece;
    int64_t dst_buffer;
    int64_t src_rank;
    int64_t dst_rank;
    Box box;
};

// Everything replica choice reads: both (validated) sides and the indexes built over them.
struct TransferInputs {
    const Side& src;
    const Side& dst;
    const std::vector<int64_t>& src_of_dst;  // destination tensor -> source tensor
    const PieceIndex& dst_pieces;
    const ReplicaIndex& replicas;
    int64_t ranks_per_node;  // PlanOptions::ranks_per_node
};

// Calls emit for every transfer of destination tensor `t` that involves `only_rank` (every
// transfer when it is -1), choosing a source replica for each holder of each destination
// piece: the holder's own copy first, otherwise replicas in turn, among those on the holder's
// node if there are any (deterministic, spreads senders' load, keeps traffic on NVLink). A
// holder's turn is its position among all holders asking that replica group, so one rank's
// requests are found by binary search; only groups the rank holds a replica of are walked
// holder by holder, to find whom it serves. Transfers come in destination piece order (table
// order within the tensor), then group order, then holder order.
void for_each_transfer(const TransferInputs& in, int64_t t, int64_t only_rank,
                       const std::function<void(const Transfer&)>& emit);

}  // namespace refit
