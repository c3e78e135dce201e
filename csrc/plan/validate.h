// Validation of both sides' layout tables: every check the planner makes before it trusts a
// layout, each raising PlanError naming the tensor, the ranks and the reason. The Planner runs
// them in this order (the first error found is the one reported): check_options,
// check_tensors, check_pieces (source, then destination), check_unused_buffers (both), then,
// while indexing replicas (replicas.h), check_source_tiling per source tensor, and last
// check_destination_coverage. check_layouts runs the steps that need no index.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "plan/geometry.h"
#include "plan/types.h"

namespace refit {

struct ReplicaIndex;  // replicas.h

// Dtype names by code, for messages: the planner compares codes only (equal codes, equal
// dtypes). refit_engine/dtypes.py assigns the codes and checks this table against its own at
// import (exported as _core.DTYPE_NAMES).
inline constexpr const char* kDtypeNames[] = {
    "bool",    "uint8",   "int8",          "int16",       "int32",  "int64",  "float16", "bfloat16",
    "float32", "float64", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"};
constexpr int64_t kNumDtypeNames = int64_t(sizeof(kDtypeNames) / sizeof(kDtypeNames[0]));

// The name of dtype `code` ("dtype code 42" for a code outside the table).
std::string dtype_name(int64_t code);

// Ranks are process ranks: dense, and far below this (it bounds the planner's per-rank index).
constexpr int64_t kMaxRank = int64_t(1) << 24;

// Per buffer of one side, tallied while checking pieces ("uses"): how many pieces it holds
// (the low bits: 0, 1, or kSeveral) and, on the destination, whether its first piece left
// elements unwritten.
constexpr uint8_t kPieceCount = 3, kSeveral = 2, kPartlyFilled = 4;
using BufferUses = std::vector<uint8_t>;
// Per rank (ranks are small dense integers): whether it holds any buffer.
using RankMarks = std::vector<uint8_t>;

void check_options(const PlanOptions& options);

// Names unique and matched one to one, global shapes addressable and equal on both sides,
// dtypes equal. Returns, per destination tensor, its source tensor.
std::vector<int64_t> check_tensors(const Side& src, const Side& dst);

// Checks every piece of `side` and its holders' buffers (boxes inside the shape, strides that
// keep elements apart and inside the buffer, holders in ascending rank; on the destination,
// no local tensor filled by one piece and written by another). Tallies `uses` (one entry per
// buffer) and marks the holders' ranks in `holds`.
void check_pieces(const Side& side, const char* side_name, bool destination, BufferUses& uses,
                  RankMarks& holds);
// Checks the buffers no piece refers to (a destination one would never be written).
void check_unused_buffers(const Side& side, const char* side_name, bool destination,
                          const BufferUses& uses, RankMarks& holds);

// The distinct boxes of replica groups [first_group, end_group) of source tensor `tensor`
// (sorted by start, as index_replicas makes them) must tile it: some exist, pairwise
// disjoint, adding up to the whole tensor.
void check_source_tiling(const Side& src, int64_t tensor, const ReplicaIndex& replicas,
                         int64_t first_group, int64_t end_group);

// Every destination element written exactly once: the pieces in each local tensor disjoint
// and filling it (`uses` as check_pieces tallied them for the destination).
void check_destination_coverage(const Side& dst, const BufferUses& uses);

// The ranks marked in `holds`, ascending.
std::vector<int64_t> marked_ranks(const RankMarks& holds);

// What check_layouts learns, for the later stages.
struct CheckedLayouts {
    std::vector<int64_t> src_of_dst;  // destination tensor -> source tensor
    BufferUses dst_uses;              // for check_destination_coverage
    std::vector<int64_t> ranks;       // every rank holding a buffer on either side, ascending
};
// check_tensors, check_pieces and check_unused_buffers on both sides, in the Planner's order.
CheckedLayouts check_layouts(const Side& src, const Side& dst);

}  // namespace refit
