// Assembly: turning the transfers replica choice makes into RankPlans — each transfer's
// pitched copies appended as a local copy, a send or a receive, then every plan bucketed.
#pragma once

#include <cstdint>
#include <vector>

#include "plan/replicas.h"
#include "plan/types.h"

namespace refit {

// Appends the pitched copies of `transfer` to the plan(s) it belongs to: the receiver's local
// list when both ranks are one, else the sender's send list (peer: the receiver) and the
// receiver's recv list (peer: the sender). A null plan is one not being assembled here.
void add_transfer(const Side& src, const Side& dst, const Transfer& transfer, RankPlan* sender,
                  RankPlan* receiver);

// Source tensor -> destination tensor, the inverse of check_tensors' map.
std::vector<int64_t> dst_of_src(const std::vector<int64_t>& src_of_dst);

// Destination tensors that `rank` holds on either side, ascending.
std::vector<int64_t> tensors_of_rank(const Side& src, const Side& dst,
                                     const std::vector<int64_t>& dst_of_src, int64_t rank);

// The plan of one rank (a rank holding nothing gets an empty plan), bucketed.
RankPlan assemble_rank(const TransferInputs& in, const std::vector<int64_t>& dst_of_src,
                       int64_t rank, int64_t bucket_bytes);
// Every one of `ranks` (ascending, covering every holder) planned in one pass over all
// transfers, bucketed; in the order of `ranks`.
std::vector<RankPlan> assemble_all(const TransferInputs& in, const std::vector<int64_t>& ranks,
                                   int64_t bucket_bytes);

}  // namespace refit
