#include "plan/assemble.h"

#include <algorithm>

#include "plan/buckets.h"
#include "plan/geometry.h"

namespace refit {

void add_transfer(const Side& src, const Side& dst, const Transfer& x, RankPlan* sender,
                  RankPlan* receiver) {
    const Piece& src_piece = src.pieces[x.src_piece];
    const Piece& dst_piece = dst.pieces[x.dst_piece];
    const int64_t itemsize = dst.tensors[x.dst_tensor].itemsize;
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

std::vector<int64_t> dst_of_src(const std::vector<int64_t>& src_of_dst) {
    std::vector<int64_t> out(src_of_dst.size());
    for (size_t t = 0; t < src_of_dst.size(); ++t) out[src_of_dst[t]] = int64_t(t);
    return out;
}

std::vector<int64_t> tensors_of_rank(const Side& src, const Side& dst,
                                     const std::vector<int64_t>& dst_of_src, int64_t rank) {
    // Holders are rank-sorted within a piece, so each piece is one binary search: cheaper than
    // keeping a rank index for every rank.
    std::vector<int64_t> tensors;
    for (const Piece& piece : src.pieces) {
        if (holder_position(src, piece, rank) >= 0) tensors.push_back(dst_of_src[piece.tensor]);
    }
    for (const Piece& piece : dst.pieces) {
        if (holder_position(dst, piece, rank) >= 0) tensors.push_back(piece.tensor);
    }
    std::sort(tensors.begin(), tensors.end());
    tensors.erase(std::unique(tensors.begin(), tensors.end()), tensors.end());
    return tensors;
}

RankPlan assemble_rank(const TransferInputs& in, const std::vector<int64_t>& dst_of_src,
                       int64_t rank, int64_t bucket_bytes) {
    RankPlan plan;
    plan.rank = rank;
    for (int64_t tensor : tensors_of_rank(in.src, in.dst, dst_of_src, rank)) {
        for_each_transfer(in, tensor, rank, [&](const Transfer& x) {
            add_transfer(in.src, in.dst, x, x.src_rank == rank ? &plan : nullptr,
                         x.dst_rank == rank ? &plan : nullptr);
        });
    }
    assign_buckets(plan, bucket_bytes);
    return plan;
}

std::vector<RankPlan> assemble_all(const TransferInputs& in, const std::vector<int64_t>& ranks,
                                   int64_t bucket_bytes) {
    std::vector<RankPlan> plans(ranks.size());
    for (size_t r = 0; r < ranks.size(); ++r) plans[r].rank = ranks[r];
    auto slot = [&](int64_t rank) {
        return &plans[std::lower_bound(ranks.begin(), ranks.end(), rank) - ranks.begin()];
    };
    for (size_t t = 0; t < in.dst.tensors.size(); ++t) {
        for_each_transfer(in, int64_t(t), -1, [&](const Transfer& x) {
            add_transfer(in.src, in.dst, x, slot(x.src_rank), slot(x.dst_rank));
        });
    }
    for (RankPlan& plan : plans) assign_buckets(plan, bucket_bytes);
    return plans;
}

}  // namespace refit
