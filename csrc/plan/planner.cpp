#include "plan/planner.h"

#include <chrono>

#include "plan/assemble.h"
#include "plan/validate.h"

namespace refit {

Planner::Planner(Side src, Side dst, PlanOptions options)
    : src_(std::move(src)), dst_(std::move(dst)), options_(options) {
    check_options(options_);
    auto clock = std::chrono::steady_clock::now();
    auto lap = [&](const char* phase) {
        const auto now = std::chrono::steady_clock::now();
        timings_.push_back({phase, std::chrono::duration<double>(now - clock).count()});
        clock = now;
    };
    // check_layouts' steps one by one, to time each (the phases benchmarks report).
    src_of_dst_ = check_tensors(src_, dst_);
    lap("tensors");
    RankMarks holds;
    BufferUses src_uses(src_.buffers.size(), 0), dst_uses(dst_.buffers.size(), 0);
    check_pieces(src_, "source", false, src_uses, holds);
    lap("source pieces");
    check_pieces(dst_, "destination", true, dst_uses, holds);
    lap("destination pieces");
    check_unused_buffers(src_, "source", false, src_uses, holds);
    check_unused_buffers(dst_, "destination", true, dst_uses, holds);
    lap("unused buffers");
    dst_pieces_ = pieces_by_tensor(dst_);
    replicas_ = index_replicas(src_, pieces_by_tensor(src_));
    lap("source replicas");
    check_destination_coverage(dst_, dst_uses);
    lap("destination buffers");
    ranks_ = marked_ranks(holds);
    dst_of_src_ = dst_of_src(src_of_dst_);
}

RankPlan Planner::plan_rank(int64_t rank) const {
    return assemble_rank(inputs(), dst_of_src_, rank, options_.bucket_bytes);
}

std::vector<RankPlan> Planner::plan_all() const {
    return assemble_all(inputs(), ranks_, options_.bucket_bytes);
}

}  // namespace refit
