// The plan compiler: from every rank's source and destination layout to, for each rank, its
// local copies and its ordered send and receive segments per peer, cut into buckets.
//
// Every rank runs the same deterministic computation on the same gathered layouts, so a
// sender and its receiver derive matching segment lists without talking to each other.
#pragma once

#include <cstdint>
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

   private:
    // Source pieces of one tensor that hold the same box: replicas of each other.
    struct ReplicaGroup {
        Box box;
        int64_t first;  // into group_pieces_
        int64_t count;
    };
    struct Transfer {
        int64_t dst_tensor;
        int64_t src_piece;
        int64_t dst_piece;
        int64_t src_rank;
        int64_t dst_rank;
        Box box;
    };

    void check_tensors();
    void check_pieces(const Side& side, const char* side_name);
    void index_source_replicas();
    void check_destination_buffers();
    void index_ranks();
    // Destination tensors that `rank` holds on either side, ascending.
    std::vector<int64_t> tensors_of_rank(int64_t rank) const;

    // Calls emit(const Transfer&) for every transfer of destination tensor `t`, choosing a
    // source replica for each: the destination rank's own copy first, otherwise replicas in
    // turn over the ranks that ask for that box (deterministic, spreads senders' load).
    template <typename Emit>
    void for_each_transfer(int64_t t, Emit&& emit) const;

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
    std::vector<int64_t> group_pieces_;        // source pieces, sorted by rank within a group
    std::vector<int64_t> group_ranks_;         // the rank of each of group_pieces_
    std::vector<int64_t> dst_of_src_;          // source tensor -> destination tensor
    std::vector<int64_t> ranks_;
};

}  // namespace refit
