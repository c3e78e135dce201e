#include "plan/geometry.h"

#include <algorithm>
#include <sstream>

namespace refit {

int64_t Box::volume() const {
    int64_t v = 1;
    for (int d = 0; d < ndim; ++d) v *= extent[d];
    return v;
}

bool Box::same_as(const Box& other) const {
    if (ndim != other.ndim) return false;
    for (int d = 0; d < ndim; ++d) {
        if (start[d] != other.start[d] || extent[d] != other.extent[d]) return false;
    }
    return true;
}

std::string Box::str() const {
    std::ostringstream out;
    out << "[";
    for (int d = 0; d < ndim; ++d) {
        // Error messages show boxes that failed validation: the end may not fit in int64.
        int64_t end;
        out << (d ? ", " : "") << start[d] << ":";
        if (__builtin_add_overflow(start[d], extent[d], &end)) {
            out << "+" << extent[d];
        } else {
            out << end;
        }
    }
    out << "]";
    return out.str();
}

Box piece_box(const Piece& piece, int ndim) {
    Box box;
    box.ndim = ndim;
    box.start = piece.start;
    box.extent = piece.extent;
    return box;
}

Box intersect(const Box& a, const Box& b) {
    Box out;
    out.ndim = a.ndim;
    for (int d = 0; d < a.ndim; ++d) {
        const int64_t lo = std::max(a.start[d], b.start[d]);
        const int64_t hi = std::min(a.start[d] + a.extent[d], b.start[d] + b.extent[d]);
        out.start[d] = lo;
        out.extent[d] = hi > lo ? hi - lo : 0;
    }
    return out;
}

Span footprint_hull(const Piece& piece, int ndim) {
    int64_t lo = piece.local_offset;
    int64_t hi = piece.local_offset;
    for (int d = 0; d < ndim; ++d) {
        if (piece.extent[d] == 0) return {piece.local_offset, piece.local_offset};
        const int64_t reach = (piece.extent[d] - 1) * piece.local_stride[d];
        if (reach < 0) lo += reach; else hi += reach;
    }
    return {lo, hi + 1};
}

namespace {

// Dimensions of a copy after merging: extents and per-side strides (elements), innermost last.
// One slot more than a box has dims, for the unit row that merged_dims may append.
struct Dims {
    using Slots = std::array<int64_t, kMaxDims + 1>;
    int n = 0;
    Slots extent{};
    Slots src_stride{};
    Slots dst_stride{};
};

// Drops unit dimensions and merges neighbours that are contiguous on both sides, so the
// copy has as few (and as long) rows as the two layouts allow. The result always ends in a
// dimension of unit stride on both sides (a unit one is appended when the layouts have none),
// so its innermost dimension is the row of a pitched copy.
Dims merged_dims(const Box& box, const Index& src_stride, const Index& dst_stride) {
    Dims dims;
    for (int d = 0; d < box.ndim; ++d) {
        if (box.extent[d] == 1) continue;
        const int prev = dims.n - 1;
        // extent * stride can pass int64 (a dimension with a huge stride, reaching the end of
        // a huge buffer, after a small one): such a dimension does not continue the previous.
        int64_t src_step, dst_step;
        if (prev >= 0 && !__builtin_mul_overflow(box.extent[d], src_stride[d], &src_step) &&
            !__builtin_mul_overflow(box.extent[d], dst_stride[d], &dst_step) &&
            dims.src_stride[prev] == src_step && dims.dst_stride[prev] == dst_step) {
            dims.extent[prev] *= box.extent[d];  // dim d continues the previous one
            dims.src_stride[prev] = src_stride[d];
            dims.dst_stride[prev] = dst_stride[d];
            continue;
        }
        dims.extent[dims.n] = box.extent[d];
        dims.src_stride[dims.n] = src_stride[d];
        dims.dst_stride[dims.n] = dst_stride[d];
        ++dims.n;
    }
    const int inner = dims.n - 1;
    if (inner < 0 || dims.src_stride[inner] != 1 || dims.dst_stride[inner] != 1) {
        dims.extent[dims.n] = 1;
        dims.src_stride[dims.n] = 1;
        dims.dst_stride[dims.n] = 1;
        ++dims.n;
    }
    return dims;
}

// Visits every index of the outer `n` dims of `dims` (row-major), passing the element
// offsets on each side.
template <typename F>
void for_each_outer(const Dims& dims, int n, int64_t src_base, int64_t dst_base, F&& visit) {
    Dims::Slots idx{};
    while (true) {
        int64_t s = src_base, t = dst_base;
        for (int d = 0; d < n; ++d) {
            s += idx[d] * dims.src_stride[d];
            t += idx[d] * dims.dst_stride[d];
        }
        visit(s, t);
        int d = n - 1;
        for (; d >= 0; --d) {
            if (++idx[d] < dims.extent[d]) break;
            idx[d] = 0;
        }
        if (d < 0) return;
    }
}

}  // namespace

void for_each_run(const Piece& piece, int ndim,
                  const std::function<void(int64_t, int64_t)>& emit) {
    const Box box = piece_box(piece, ndim);
    if (box.empty()) return;
    const Dims dims = merged_dims(box, piece.local_stride, piece.local_stride);
    const int inner = dims.n - 1;
    for_each_outer(dims, inner, piece.local_offset, piece.local_offset,
                   [&](int64_t offset, int64_t) { emit(offset, dims.extent[inner]); });
}

void for_each_copy(const Box& box, const Piece& src, const Piece& dst, int64_t itemsize,
                   const std::function<void(int64_t, int64_t, int64_t, int64_t, int64_t,
                                            int64_t)>& emit) {
    if (box.empty()) return;
    int64_t src_base = src.local_offset;
    int64_t dst_base = dst.local_offset;
    for (int d = 0; d < box.ndim; ++d) {
        src_base += (box.start[d] - src.start[d]) * src.local_stride[d];
        dst_base += (box.start[d] - dst.start[d]) * dst.local_stride[d];
    }
    const Dims dims = merged_dims(box, src.local_stride, dst.local_stride);
    const int inner = dims.n - 1;
    const int64_t row_bytes = dims.extent[inner] * itemsize;
    if (dims.n == 1) {  // one contiguous block on both sides
        emit(src_base * itemsize, row_bytes, dst_base * itemsize, row_bytes, 1, row_bytes);
        return;
    }
    const int row_dim = inner - 1;
    const int64_t rows = dims.extent[row_dim];
    const int64_t src_pitch = dims.src_stride[row_dim] * itemsize;
    const int64_t dst_pitch = dims.dst_stride[row_dim] * itemsize;
    for_each_outer(dims, row_dim, src_base, dst_base, [&](int64_t s, int64_t t) {
        emit(s * itemsize, src_pitch, t * itemsize, dst_pitch, rows, row_bytes);
    });
}

}  // namespace refit
