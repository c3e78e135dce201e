// plan/replicas.h alone: replica groups (merged when pieces share a box), the tiling check,
// and which replica feeds each destination holder (own copy, node, round-robin).
#include "plan/replicas.h"

#include "check.h"
#include "plan/validate.h"
#include "sides.h"

using namespace refit;
using refit_test::idx;
using refit_test::OwnedSide;

namespace {

// Tensor "w" (8,) of 4-byte elements, whole on each of the source buffers' ranks (DP).
OwnedSide replicated(std::initializer_list<int64_t> ranks) {
    OwnedSide s;
    const int64_t w = s.tensor("w", {8}, 4);
    std::vector<int64_t> buffers;
    for (int64_t r : ranks) buffers.push_back(s.buffer(r, 8, 4));
    s.piece(w, {}, 0, idx({0}), idx({8}), idx({1}));
    s.pieces[0].holders_count = int64_t(buffers.size());
    s.holders = buffers;
    return s;
}

struct Chosen {
    int64_t src_rank, dst_rank;
};

std::vector<Chosen> choose(const OwnedSide& src_tables, const OwnedSide& dst_tables,
                           int64_t ranks_per_node, int64_t only_rank = -1) {
    const Side src = src_tables.side(), dst = dst_tables.side();
    const std::vector<int64_t> src_of_dst = check_tensors(src, dst);
    const PieceIndex dst_pieces = pieces_by_tensor(dst);
    const ReplicaIndex replicas = index_replicas(src, pieces_by_tensor(src));
    const TransferInputs in{src, dst, src_of_dst, dst_pieces, replicas, ranks_per_node};
    std::vector<Chosen> out;
    for_each_transfer(in, 0, only_rank, [&](const Transfer& x) {
        out.push_back({x.src_rank, x.dst_rank});
    });
    return out;
}

}  // namespace

static void pieces_by_tensor_is_stable_csr() {
    OwnedSide s;
    const int64_t a = s.tensor("a", {4}, 1), b = s.tensor("b", {4}, 1);
    const int64_t buf = s.buffer(0, 16, 1);
    s.piece(b, {buf}, 0, idx({0}), idx({4}), idx({1}));
    s.piece(a, {buf}, 4, idx({0}), idx({4}), idx({1}));
    s.piece(b, {buf}, 8, idx({0}), idx({4}), idx({1}));
    const PieceIndex index = pieces_by_tensor(s.side());
    CHECK(index.first == std::vector<int64_t>({0, 1, 3}));
    CHECK(index.order == std::vector<int64_t>({1, 0, 2}));
}

static void groups_merge_equal_boxes() {
    // Two pieces with the same box, held by ranks {0, 3} and {1}: one group, ranks ascending.
    OwnedSide s;
    const int64_t w = s.tensor("w", {8}, 4);
    const int64_t b0 = s.buffer(0, 8, 4), b1 = s.buffer(1, 8, 4), b3 = s.buffer(3, 8, 4);
    s.piece(w, {b0, b3}, 0, idx({0}), idx({8}), idx({1}));
    s.piece(w, {b1}, 0, idx({0}), idx({8}), idx({1}));
    const Side side = s.side();
    const ReplicaIndex index = index_replicas(side, pieces_by_tensor(side));
    CHECK_EQ(index.groups.size(), size_t(1));
    CHECK(index.first == std::vector<int64_t>({0, 1}));
    const ReplicaGroup& g = index.groups[0];
    CHECK_EQ(g.piece, -1);
    CHECK_EQ(g.count, 3);
    CHECK_EQ(index.member_rank(side, g, 0), 0);
    CHECK_EQ(index.member_rank(side, g, 1), 1);
    CHECK_EQ(index.member_rank(side, g, 2), 3);
    CHECK_EQ(index.member_piece(g, 1), 1);
    CHECK_EQ(index.member_buffer(side, g, 2), b3);
    CHECK_EQ(index.first_member_from(side, g, 2), 2);
    CHECK_EQ(index.first_member_from(side, g, 9), 3);
}

static void tiling_checked() {
    OwnedSide half = replicated({0});
    half.pieces[0].extent = idx({4});
    const Side side = half.side();
    CHECK_PLAN_ERROR(index_replicas(side, pieces_by_tensor(side)),
                     "source pieces cover 4 of 8 elements");
    OwnedSide overlap = replicated({0});
    overlap.piece(0, {0}, 0, idx({2}), idx({6}), idx({1}));
    const Side side2 = overlap.side();
    CHECK_PLAN_ERROR(index_replicas(side2, pieces_by_tensor(side2)),
                     "source pieces [0:8] and [2:8] overlap without being the same box");
}

static void choice_own_node_round_robin() {
    // Replicas on ranks 0 and 2; destination holders on ranks 1, 2 and 3 (one piece).
    const OwnedSide src = replicated({0, 2});
    const OwnedSide dst = replicated({1, 2, 3});
    // No node preference: rank 2 keeps its own copy; ranks 1 and 3 take turns 0 and 2 over
    // the two replicas (turn = holder position + tensor index).
    std::vector<Chosen> c = choose(src, dst, 0);
    CHECK_EQ(c.size(), size_t(3));
    CHECK_EQ(c[0].dst_rank, 1);
    CHECK_EQ(c[0].src_rank, 0);
    CHECK_EQ(c[1].dst_rank, 2);
    CHECK_EQ(c[1].src_rank, 2);
    CHECK_EQ(c[2].dst_rank, 3);
    CHECK_EQ(c[2].src_rank, 0);
    // Two ranks per node: rank 3 is served on its own node, by rank 2.
    c = choose(src, dst, 2);
    CHECK_EQ(c[2].dst_rank, 3);
    CHECK_EQ(c[2].src_rank, 2);
    // One rank's view: only transfers rank 0 sends or receives (it serves rank 1 alone).
    c = choose(src, dst, 2, /*only_rank=*/0);
    CHECK_EQ(c.size(), size_t(1));
    CHECK_EQ(c[0].src_rank, 0);
    CHECK_EQ(c[0].dst_rank, 1);
}

static void transfers_cut_boxes() {
    const OwnedSide src = refit_test::tp_rows(), dst = refit_test::tp_columns();
    const Side s = src.side(), d = dst.side();
    const std::vector<int64_t> src_of_dst = check_tensors(s, d);
    const PieceIndex dst_pieces = pieces_by_tensor(d);
    const ReplicaIndex replicas = index_replicas(s, pieces_by_tensor(s));
    const TransferInputs in{s, d, src_of_dst, dst_pieces, replicas, 0};
    std::vector<Transfer> all;
    for_each_transfer(in, 0, -1, [&](const Transfer& x) { all.push_back(x); });
    // Each destination column block meets both source row blocks.
    CHECK_EQ(all.size(), size_t(4));
    CHECK_EQ(all[1].dst_piece, 0);
    CHECK_EQ(all[1].src_piece, 1);
    CHECK_EQ(all[1].src_rank, 1);
    CHECK_EQ(all[1].dst_rank, 0);
    CHECK_EQ(all[1].box.str(), std::string("[2:4, 0:3]"));
    CHECK_EQ(all[2].box.str(), std::string("[0:2, 3:6]"));
}

int main() {
    pieces_by_tensor_is_stable_csr();
    groups_merge_equal_boxes();
    tiling_checked();
    choice_own_node_round_robin();
    transfers_cut_boxes();
    return refit_test::report("test_replicas");
}
