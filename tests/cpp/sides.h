// Hand-built layouts for the stage tests: a side that owns its tables (a refit::Side only
// views buffers, pieces and holders), filled row by row.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "plan/types.h"

namespace refit_test {

inline refit::Index idx(std::initializer_list<int64_t> values) {
    refit::Index out{};
    int d = 0;
    for (int64_t v : values) out[d++] = v;
    return out;
}

struct OwnedSide {
    std::vector<std::string> names;
    std::vector<refit::TensorSpec> tensors;
    std::vector<refit::Buffer> buffers;
    std::vector<refit::Piece> pieces;
    std::vector<int64_t> holders;

    int64_t tensor(const std::string& name, std::initializer_list<int64_t> shape, int itemsize,
                   int64_t dtype_code = 1) {
        refit::TensorSpec spec;
        spec.ndim = int32_t(shape.size());
        spec.itemsize = itemsize;
        spec.dtype_code = dtype_code;
        spec.shape = idx(shape);
        names.push_back(name);
        tensors.push_back(spec);
        return int64_t(tensors.size()) - 1;
    }
    int64_t buffer(int64_t rank, int64_t numel, int64_t itemsize) {
        buffers.push_back({rank, numel, itemsize});
        return int64_t(buffers.size()) - 1;
    }
    // A piece of `tensor` held in each of `in_buffers` (ascending rank) at the same place.
    int64_t piece(int64_t tensor, std::initializer_list<int64_t> in_buffers, int64_t local_offset,
                  refit::Index start, refit::Index extent, refit::Index stride) {
        refit::Piece p;
        p.tensor = tensor;
        p.holders_first = int64_t(holders.size());
        p.holders_count = int64_t(in_buffers.size());
        p.local_offset = local_offset;
        p.start = start;
        p.extent = extent;
        p.local_stride = stride;
        holders.insert(holders.end(), in_buffers.begin(), in_buffers.end());
        pieces.push_back(p);
        return int64_t(pieces.size()) - 1;
    }
    // The view the stages read; valid while this object lives and is not changed.
    refit::Side side() const {
        refit::Side s;
        s.names = names;
        s.tensors = tensors;
        s.buffers = refit::View<refit::Buffer>(buffers);
        s.pieces = refit::View<refit::Piece>(pieces);
        s.holders = refit::View<int64_t>(holders);
        return s;
    }
};

// Tensor "w", shape (4, 6), 2-byte elements. Source: rows split over ranks 0 and 1 (TP on
// dim 0); destination: columns split over ranks 0 and 1 (TP on dim 1).
inline OwnedSide tp_rows() {
    OwnedSide s;
    const int64_t w = s.tensor("w", {4, 6}, 2);
    s.piece(w, {s.buffer(0, 12, 2)}, 0, idx({0, 0}), idx({2, 6}), idx({6, 1}));
    s.piece(w, {s.buffer(1, 12, 2)}, 0, idx({2, 0}), idx({2, 6}), idx({6, 1}));
    return s;
}
inline OwnedSide tp_columns() {
    OwnedSide s;
    const int64_t w = s.tensor("w", {4, 6}, 2);
    s.piece(w, {s.buffer(0, 12, 2)}, 0, idx({0, 0}), idx({4, 3}), idx({3, 1}));
    s.piece(w, {s.buffer(1, 12, 2)}, 0, idx({0, 3}), idx({4, 3}), idx({3, 1}));
    return s;
}

}  // namespace refit_test
