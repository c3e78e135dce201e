// The plan compiler: from every rank's source and destination layout to, for each rank, its
// local copies and its ordered send and receive segments per peer, cut into buckets.
//
// Every rank runs the same deterministic computation on the same gathered layouts, so a
// sender and its receiver derive matching segment lists without talking to each other.
//
// The Planner only composes the stages, each callable alone through its header:
//   validate.h  layout tables checked (PlanError naming tensor, ranks and reason);
//   replicas.h  source replicas indexed, and which one feeds each destination holder;
//   assemble.h  transfers turned into each rank's segments;
//   buckets.h   segments cut into messages and buckets, staging laid out.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "plan/replicas.h"
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
    TransferInputs inputs() const {
        return {src_, dst_, src_of_dst_, dst_pieces_, replicas_, options_.ranks_per_node};
    }

    Side src_;
    Side dst_;
    PlanOptions options_;
    std::vector<int64_t> src_of_dst_;  // destination tensor -> source tensor
    std::vector<int64_t> dst_of_src_;  // source tensor -> destination tensor
    PieceIndex dst_pieces_;
    ReplicaIndex replicas_;
    std::vector<int64_t> ranks_;
    std::vector<std::pair<std::string, double>> timings_;
};

}  // namespace refit
