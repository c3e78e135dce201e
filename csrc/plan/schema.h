// The column schemas of every table that crosses the binding, in one place: the layout tables
// Python builds (tensors, buffers, pieces) and the plan tables it gets back (segments,
// messages). Column indices are named here; the names, in column order, are exported as
// _core.TENSOR_FIELDS, BUFFER_FIELDS, PIECE_FIELDS, SEGMENT_FIELDS and MESSAGE_FIELDS, so Python
// reads fields by name. A per-dimension field "f" spans kMaxDims columns "f.0" .. "f.<kMaxDims-1>"
// (unused dimensions are 0). The static_asserts tie each in-place table to its struct's layout.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <string>
#include <vector>

#include "plan/types.h"

namespace refit {
namespace schema {

// One row per tensor: copied into TensorSpec.
struct TensorCols {
    static constexpr int kNdim = 0;
    static constexpr int kItemsize = 1;
    static constexpr int kDtypeCode = 2;
    static constexpr int kShape = 3;  // kMaxDims columns
    static constexpr int kCount = kShape + kMaxDims;
};

// One row per local tensor (buffer): read in place as Buffer.
struct BufferCols {
    static constexpr int kRank = 0;
    static constexpr int kNumel = 1;
    static constexpr int kItemsize = 2;
    static constexpr int kCount = 3;
};

// One row per piece: read in place as Piece.
struct PieceCols {
    static constexpr int kTensor = 0;
    static constexpr int kHoldersFirst = 1;
    static constexpr int kHoldersCount = 2;
    static constexpr int kLocalOffset = 3;
    static constexpr int kStart = 4;                   // kMaxDims columns each
    static constexpr int kExtent = kStart + kMaxDims;
    static constexpr int kStride = kExtent + kMaxDims;  // local strides, in elements
    static constexpr int kCount = kStride + kMaxDims;
};

// The plan tables are Segment and Message rows, copied out whole.
constexpr int kSegmentCols = kSegmentFields;
constexpr int kMessageCols = kMessageFields;

#define REFIT_SCHEMA_COLUMN(Struct, member, column)                                  \
    static_assert(offsetof(Struct, member) == size_t(column) * sizeof(int64_t),      \
                  #Struct "::" #member " must be table column " #column)
REFIT_SCHEMA_COLUMN(Buffer, rank, BufferCols::kRank);
REFIT_SCHEMA_COLUMN(Buffer, numel, BufferCols::kNumel);
REFIT_SCHEMA_COLUMN(Buffer, itemsize, BufferCols::kItemsize);
static_assert(sizeof(Buffer) == BufferCols::kCount * sizeof(int64_t), "Buffer must match a row");
REFIT_SCHEMA_COLUMN(Piece, tensor, PieceCols::kTensor);
REFIT_SCHEMA_COLUMN(Piece, holders_first, PieceCols::kHoldersFirst);
REFIT_SCHEMA_COLUMN(Piece, holders_count, PieceCols::kHoldersCount);
REFIT_SCHEMA_COLUMN(Piece, local_offset, PieceCols::kLocalOffset);
REFIT_SCHEMA_COLUMN(Piece, start, PieceCols::kStart);
REFIT_SCHEMA_COLUMN(Piece, extent, PieceCols::kExtent);
REFIT_SCHEMA_COLUMN(Piece, local_stride, PieceCols::kStride);
static_assert(sizeof(Piece) == PieceCols::kCount * sizeof(int64_t), "Piece must match a row");
REFIT_SCHEMA_COLUMN(Segment, tensor, 0);
REFIT_SCHEMA_COLUMN(Segment, row_bytes, kSegmentCols - 1);
REFIT_SCHEMA_COLUMN(Message, peer, 0);
REFIT_SCHEMA_COLUMN(Message, bytes, kMessageCols - 1);
#undef REFIT_SCHEMA_COLUMN

// "name" for a scalar field, "name.0" .. for a per-dimension one (a trailing '*').
inline std::vector<std::string> expand_fields(std::initializer_list<const char*> fields) {
    std::vector<std::string> out;
    for (const char* field : fields) {
        std::string name = field;
        if (!name.empty() && name.back() == '*') {
            name.pop_back();
            for (int d = 0; d < kMaxDims; ++d) out.push_back(name + "." + std::to_string(d));
        } else {
            out.push_back(name);
        }
    }
    return out;
}

// Field names in column order (sizes: the kCount above).
inline std::vector<std::string> tensor_fields() {
    return expand_fields({"ndim", "itemsize", "dtype_code", "shape*"});
}
inline std::vector<std::string> buffer_fields() {
    return expand_fields({"rank", "numel", "itemsize"});
}
inline std::vector<std::string> piece_fields() {
    return expand_fields(
        {"tensor", "holders_first", "holders_count", "local_offset", "start*", "extent*", "stride*"});
}
inline std::vector<std::string> segment_fields() {
    return {"tensor",     "peer",       "bucket",    "src_buffer", "src_offset", "src_pitch",
            "dst_buffer", "dst_offset", "dst_pitch", "rows",       "row_bytes"};
}
inline std::vector<std::string> message_fields() { return {"peer", "bucket", "offset", "bytes"}; }

}  // namespace schema
}  // namespace refit
