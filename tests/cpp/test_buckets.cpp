// plan/buckets.h alone: segments cut by rows and within rows so no message exceeds the limit,
// messages ordered by (bucket, peer) with their staging offsets, staging packed.
#include "plan/buckets.h"

#include "check.h"

using namespace refit;

namespace {

// A send segment to `peer`: `rows` rows of `row_bytes` from source buffer 0 (pitch 1000) into
// destination buffer 5 (pitch 500).
Segment send_to(int64_t peer, int64_t rows, int64_t row_bytes, int64_t src_offset = 0) {
    return Segment{/*tensor=*/3, peer, /*bucket=*/0, /*src_buffer=*/0, src_offset, 1000,
                   /*dst_buffer=*/5, /*dst_offset=*/40, 500, rows, row_bytes};
}

}  // namespace

static void cut_between_rows() {
    std::vector<Segment> out;
    std::vector<Message> messages;
    cut_into_buckets({send_to(1, 3, 100)}, 250, /*staged_src=*/false, out, messages);
    CHECK_EQ(out.size(), size_t(2));
    CHECK_EQ(out[0].bucket, 0);
    CHECK_EQ(out[0].rows, 2);
    CHECK_EQ(out[0].src_offset, 0);
    CHECK_EQ(out[0].dst_buffer, -1);  // the staging side is packed from offset 0
    CHECK_EQ(out[0].dst_offset, 0);
    CHECK_EQ(out[0].dst_pitch, 100);
    CHECK_EQ(out[1].bucket, 1);
    CHECK_EQ(out[1].rows, 1);
    CHECK_EQ(out[1].src_offset, 2000);  // two source rows further
    CHECK_EQ(out[1].src_pitch, 1000);
    CHECK_EQ(messages.size(), size_t(2));
    CHECK_EQ(messages[0].bytes, 200);
    CHECK_EQ(messages[1].bucket, 1);
    CHECK_EQ(messages[1].bytes, 100);
}

static void cut_within_a_row() {
    std::vector<Segment> out;
    std::vector<Message> messages;
    // A receive (the staged side is the source): one 300-byte row, limit 250.
    Segment recv = send_to(2, 1, 300);
    cut_into_buckets({recv}, 250, /*staged_src=*/true, out, messages);
    CHECK_EQ(out.size(), size_t(2));
    CHECK_EQ(out[0].row_bytes, 250);
    CHECK_EQ(out[0].src_buffer, -1);
    CHECK_EQ(out[0].dst_buffer, 5);
    CHECK_EQ(out[0].dst_offset, 40);
    CHECK_EQ(out[1].row_bytes, 50);
    CHECK_EQ(out[1].bucket, 1);
    CHECK_EQ(out[1].src_offset, 0);
    CHECK_EQ(out[1].dst_offset, 290);  // 250 bytes into the row
    CHECK_EQ(messages.size(), size_t(2));
    CHECK_EQ(messages[0].bytes, 250);
    CHECK_EQ(messages[1].bytes, 50);
}

static void side_orders_by_bucket_then_peer() {
    // Peer 2 listed first: 100 bytes; peer 1: 300 bytes (two buckets at limit 200).
    std::vector<Segment> segs = {send_to(2, 1, 100), send_to(1, 3, 100, 7)};
    std::vector<Message> messages;
    std::vector<int64_t> staging;
    bucket_side(segs, messages, staging, 200, /*staged_src=*/false);
    CHECK_EQ(messages.size(), size_t(3));
    // Bucket 0: peer 1 (200 bytes at 0), peer 2 (100 bytes at 200); bucket 1: peer 1.
    CHECK_EQ(messages[0].peer, 1);
    CHECK_EQ(messages[0].offset, 0);
    CHECK_EQ(messages[0].bytes, 200);
    CHECK_EQ(messages[1].peer, 2);
    CHECK_EQ(messages[1].offset, 200);
    CHECK_EQ(messages[2].bucket, 1);
    CHECK_EQ(messages[2].offset, 0);
    CHECK(staging == std::vector<int64_t>({300, 100}));
    CHECK_EQ(segs.size(), size_t(3));
    CHECK_EQ(segs[1].peer, 2);
    CHECK_EQ(segs[1].dst_offset, 200);  // staging offset relative to the bucket
    CHECK_EQ(segs[2].src_offset, 2007);

    RankPlan plan;
    plan.send = {send_to(1, 1, 10)};
    plan.recv = {send_to(1, 5, 10), send_to(2, 1, 10)};
    assign_buckets(plan, 20);
    CHECK_EQ(plan.num_buckets, 3);
    CHECK(plan.send_staging_bytes == std::vector<int64_t>({10}));
    CHECK(plan.recv_staging_bytes == std::vector<int64_t>({30, 20, 10}));
}

int main() {
    cut_between_rows();
    cut_within_a_row();
    side_orders_by_bucket_then_peer();
    return refit_test::report("test_buckets");
}
