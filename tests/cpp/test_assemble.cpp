// plan/assemble.h alone: transfers become local copies, sends and receives with the right
// peers, offsets and pitches; one rank's plan equals its part of the whole.
#include "plan/assemble.h"

#include <cstring>

#include "check.h"
#include "plan/validate.h"
#include "sides.h"

using namespace refit;
using refit_test::idx;
using refit_test::OwnedSide;

namespace {

bool same(const std::vector<Segment>& a, const std::vector<Segment>& b) {
    return a.size() == b.size() &&
           (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(Segment)) == 0);
}

}  // namespace

static void add_transfer_sides() {
    const OwnedSide src = refit_test::tp_rows(), dst = refit_test::tp_columns();
    Box box;
    box.ndim = 2;
    box.start = idx({2, 0});
    box.extent = idx({2, 3});
    // Rows 2..3, columns 0..2: from rank 1's source buffer 1 to rank 0's destination buffer 0.
    const Transfer x{0, 1, 1, 0, 0, /*src_rank=*/1, /*dst_rank=*/0, box};
    RankPlan sender, receiver;
    add_transfer(src.side(), dst.side(), x, &sender, &receiver);
    CHECK_EQ(sender.send.size(), size_t(1));
    CHECK_EQ(receiver.recv.size(), size_t(1));
    CHECK(sender.local.empty() && receiver.local.empty());
    const Segment& s = sender.send[0];
    CHECK_EQ(s.peer, 0);
    CHECK_EQ(s.src_buffer, 1);
    CHECK_EQ(s.src_offset, 0);   // row 2 is the first row of rank 1's buffer
    CHECK_EQ(s.src_pitch, 12);   // 6 elements of 2 bytes
    CHECK_EQ(s.dst_offset, 12);  // row 2 of a (4, 3) buffer
    CHECK_EQ(s.dst_pitch, 6);
    CHECK_EQ(s.rows, 2);
    CHECK_EQ(s.row_bytes, 6);
    CHECK_EQ(receiver.recv[0].peer, 1);
    // Only the receiver being planned: the sender's half is dropped.
    RankPlan only;
    add_transfer(src.side(), dst.side(), x, nullptr, &only);
    CHECK(only.send.empty() && only.recv.size() == 1);
}

static void rank_plans() {
    const OwnedSide src_tables = refit_test::tp_rows(), dst_tables = refit_test::tp_columns();
    const Side src = src_tables.side(), dst = dst_tables.side();
    const CheckedLayouts checked = check_layouts(src, dst);
    const PieceIndex dst_pieces = pieces_by_tensor(dst);
    const ReplicaIndex replicas = index_replicas(src, pieces_by_tensor(src));
    const TransferInputs in{src, dst, checked.src_of_dst, dst_pieces, replicas, 0};
    const std::vector<int64_t> inverse = dst_of_src(checked.src_of_dst);
    CHECK(tensors_of_rank(src, dst, inverse, 1) == std::vector<int64_t>({0}));
    CHECK(tensors_of_rank(src, dst, inverse, 4).empty());

    const RankPlan plan = assemble_rank(in, inverse, 0, int64_t(1) << 20);
    CHECK_EQ(plan.rank, 0);
    CHECK_EQ(plan.num_buckets, 1);
    // Rank 0 keeps rows 0..1 of columns 0..2, sends rows 0..1 of columns 3..5 to rank 1 and
    // receives rows 2..3 of columns 0..2 from it: 12 bytes each way.
    CHECK_EQ(plan.local.size(), size_t(1));
    CHECK_EQ(plan.local[0].src_offset, 0);
    CHECK_EQ(plan.local[0].dst_offset, 0);
    CHECK_EQ(plan.local[0].rows, 2);
    CHECK_EQ(plan.local[0].row_bytes, 6);
    CHECK_EQ(plan.send.size(), size_t(1));
    CHECK_EQ(plan.send[0].peer, 1);
    CHECK_EQ(plan.send[0].src_offset, 6);  // column 3
    CHECK_EQ(plan.send[0].dst_buffer, -1);
    CHECK_EQ(plan.recv.size(), size_t(1));
    CHECK_EQ(plan.recv[0].src_buffer, -1);
    CHECK_EQ(plan.recv[0].dst_offset, 12);
    CHECK_EQ(plan.send_messages.size(), size_t(1));
    CHECK_EQ(plan.send_messages[0].bytes, 12);
    CHECK_EQ(plan.recv_messages[0].peer, 1);
    CHECK(plan.send_staging_bytes == std::vector<int64_t>({12}));

    const std::vector<RankPlan> all = assemble_all(in, checked.ranks, int64_t(1) << 20);
    CHECK_EQ(all.size(), size_t(2));
    CHECK(same(all[0].local, plan.local) && same(all[0].send, plan.send) &&
          same(all[0].recv, plan.recv));
    const RankPlan one = assemble_rank(in, inverse, 1, int64_t(1) << 20);
    CHECK(same(all[1].send, one.send) && same(all[1].recv, one.recv));
}

int main() {
    add_transfer_sides();
    rank_plans();
    return refit_test::report("test_assemble");
}
