// The plan compiler: from every rank's source and destination layout to, for each rank, its
// local copies and its ordered send and receive segments per peer, cut into buckets.
//
// Every rank runs the same deterministic computation on the same gathered layouts, so a
// sender and its receiver derive matching segment lists without talking to each other.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "plan/geometry.h"
#include "plan/types.h"

namespace refit {

class Planner {
   public:
    // Validates both sides (throws PlanError naming tensor, ranks and reason) and indexes them.
    Planner(Side src, Side dst, PlanOptions options);

    // The plan of one rank (a rank holding nothing gets an empty plan).
    RankPlan plan_rank(int64_t rank) const;
    // Every rank's plan, in one pass over all transfers.
    std::vector<RankPlan> plan_all() const;

    // All ranks that hold a buffer on either side, ascending.
    const std::vector<int64_t>& ranks() const { return ranks_; }
    const Side& src() const { return src_; }
    const Side& dst() const { return dst_; }
    const PlanOptions& options() const { return options_; }
    // Seconds the constructor spent in each phase, in order (for benchmarks).
    const std::vector<std::pair<std::string, double>>& timings() const { return timings_; }

   private:
    // The source replicas of one box of a tensor, in ascending rank: usually the holders of
    // one piece, read in place; several pieces with the same box are merged into a list.
    struct ReplicaGroup {
        Box box;
        int64_t piece;   // the piece whose holders these are, or -1 when merged
        int64_t first;   // into src_.holders (one piece) or merged_* (merged)
        int64_t count;
    };
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

    // Per buffer of one side, tallied while checking pieces ("uses"): how many pieces it holds
    // (the low bits: 0, 1, or kSeveral) and, on the destination, whether its first piece left
    // elements unwritten.
    static constexpr uint8_t kPieceCount = 3, kSeveral = 2, kPartlyFilled = 4;
    using BufferUses = std::vector<uint8_t>;
    // A destination piece and the span of buffer elements it reaches.
    struct Placed {
        Span hull;
        int64_t piece;
    };

    void check_tensors();
    // Checks every piece and its holders' buffers; marks the holders' ranks in `holds`.
    void check_pieces(const Side& side, const char* side_name, BufferUses& uses,
                      std::vector<uint8_t>& holds) const;
    // Checks the buffers no piece refers to (a destination one would never be written).
    void check_unused_buffers(const Side& side, const char* side_name, const BufferUses& uses,
                              std::vector<uint8_t>& holds) const;
    void index_source_replicas();
    void check_destination_buffers(const BufferUses& uses);
    // Raises when pieces placed in destination buffer `b` overlap (reorders `placed`).
    void check_disjoint(int64_t b, std::vector<Placed>& placed) const;
    // The first destination piece held in `buffer` (for messages), or -1.
    int64_t first_piece_in(int64_t buffer) const;
    void index_ranks(const std::vector<uint8_t>& holds);
    // Destination tensors that `rank` holds on either side, ascending.
    std::vector<int64_t> tensors_of_rank(int64_t rank) const;

    int64_t member_piece(const ReplicaGroup& group, int64_t i) const {
        return group.piece >= 0 ? group.piece : merged_pieces_[group.first + i];
    }
    int64_t member_buffer(const ReplicaGroup& group, int64_t i) const {
        return group.piece >= 0 ? src_.holders[group.first + i] : merged_buffers_[group.first + i];
    }
    int64_t member_rank(const ReplicaGroup& group, int64_t i) const {
        return src_.buffers[member_buffer(group, i)].rank;
    }

    // The first member of `group` whose rank is not below `rank` (count if none).
    int64_t first_member_from(const ReplicaGroup& group, int64_t rank) const;
    // Where `rank` is among the holders of `piece` (of `side`), or -1.
    int64_t holder_position(const Side& side, const Piece& piece, int64_t rank) const;

    // Calls emit(const Transfer&) for every transfer of destination tensor `t` that involves
    // `only_rank` (every transfer when it is -1), choosing a source replica for each holder of
    // each destination piece: the holder's own copy first, otherwise replicas in turn, among
    // those on the holder's node if there are any (deterministic, spreads senders' load, keeps
    // traffic on NVLink). A holder's turn is its position among all holders asking that
    // replica group, so one rank's requests are found by binary search; only groups the rank
    // holds a replica of are walked holder by holder, to find whom it serves.
    template <typename Emit>
    void for_each_transfer(int64_t t, int64_t only_rank, Emit&& emit) const;

    // Appends the pitched copies of `transfer` to the plan(s) it belongs to.
    void add_transfer(const Transfer& transfer, RankPlan* sender, RankPlan* receiver) const;
    // Cuts a rank's send and receive lists into buckets and lays out its staging.
    void assign_buckets(RankPlan& plan) const;

    std::vector<int64_t> holder_ranks(const Side& side, int64_t tensor) const;

    Side src_;
    Side dst_;
    PlanOptions options_;
    std::vector<int64_t> src_of_dst_;          // destination tensor -> source tensor
    std::vector<int64_t> dst_piece_first_;     // CSR of destination pieces by tensor
    std::vector<int64_t> dst_piece_order_;
    std::vector<int64_t> src_piece_first_;     // CSR of source pieces by tensor
    std::vector<int64_t> src_piece_order_;
    std::vector<int64_t> group_first_;         // CSR of replica groups by source tensor
    std::vector<ReplicaGroup> groups_;
    std::vector<int64_t> merged_pieces_;       // members of merged groups: piece and buffer,
    std::vector<int64_t> merged_buffers_;      // ascending rank within a group
    std::vector<int64_t> dst_of_src_;          // source tensor -> destination tensor
    std::vector<int64_t> ranks_;
    std::vector<std::pair<std::string, double>> timings_;
};

}  // namespace refit
