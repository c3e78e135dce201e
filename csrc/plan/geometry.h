// Boxes of global tensors, their intersection, and their reduction to pitched 2-D copies.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "plan/types.h"

namespace refit {

struct Box {
    int ndim = 0;
    Index start{};
    Index extent{};

    int64_t volume() const;
    bool empty() const { return volume() == 0; }
    bool same_as(const Box& other) const;
    std::string str() const;
};

Box piece_box(const Piece& piece, int ndim);

// The common part of two boxes (empty when they do not overlap).
Box intersect(const Box& a, const Box& b);

// Lowest and one-past-highest buffer element that `piece` touches (its footprint's hull).
struct Span {
    int64_t lo;
    int64_t hi;
};
Span footprint_hull(const Piece& piece, int ndim);

// Calls `emit` once per contiguous run of buffer elements that `piece` occupies, in
// increasing box order: emit(first_element, run_length).
void for_each_run(const Piece& piece, int ndim, const std::function<void(int64_t, int64_t)>& emit);

// Copies of `box` (a sub-box of both pieces) from `src` to `dst` as pitched 2-D copies in
// bytes. Dimensions that are contiguous in both pieces are merged, so a box that is one
// contiguous block on both sides becomes a single row. More than two dimensions left after
// merging (rare: e.g. a 3-D box that is strided on both sides) give one copy per outer index.
// The innermost dimension must be contiguous in both pieces (checked by validation).
void for_each_copy(const Box& box, const Piece& src, const Piece& dst, int64_t itemsize,
                   const std::function<void(int64_t src_offset, int64_t src_pitch,
                                            int64_t dst_offset, int64_t dst_pitch, int64_t rows,
                                            int64_t row_bytes)>& emit);

}  // namespace refit
