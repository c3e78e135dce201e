// plan/validate.h alone: a good layout passes and yields its tensor map and ranks; each kind of
// bad table is rejected with the reason a user would read.
#include "plan/validate.h"

#include "check.h"
#include "sides.h"

using namespace refit;
using refit_test::idx;
using refit_test::OwnedSide;

static void good_layout_passes() {
    const OwnedSide src = refit_test::tp_rows(), dst = refit_test::tp_columns();
    const CheckedLayouts checked = check_layouts(src.side(), dst.side());
    CHECK_EQ(checked.src_of_dst.size(), size_t(1));
    CHECK_EQ(checked.src_of_dst[0], 0);
    CHECK(checked.ranks == std::vector<int64_t>({0, 1}));
    // One piece per destination buffer, each filling it: one use, not partly filled.
    CHECK(checked.dst_uses == BufferUses({1, 1}));
    check_destination_coverage(dst.side(), checked.dst_uses);  // must not throw
}

static void tensors_matched_by_name() {
    OwnedSide src, dst;
    src.tensor("a", {2}, 4);
    src.tensor("b", {3}, 4);
    dst.tensor("b", {3}, 4);
    dst.tensor("a", {2}, 4);
    CHECK(check_tensors(src.side(), dst.side()) == std::vector<int64_t>({1, 0}));
}

static void tensor_errors() {
    OwnedSide src = refit_test::tp_rows();
    OwnedSide dst = refit_test::tp_columns();
    dst.tensors[0].shape = idx({4, 5});
    CHECK_PLAN_ERROR(check_tensors(src.side(), dst.side()),
                     "global shape differs: source (4, 6), destination (4, 5)");
    try {
        check_tensors(src.side(), dst.side());
    } catch (const PlanError& e) {
        CHECK_EQ(e.tensor(), std::string("w"));
        CHECK(e.ranks() == std::vector<int64_t>({0, 1}));
    }
    dst = refit_test::tp_columns();
    dst.tensors[0].dtype_code = 7;
    CHECK_PLAN_ERROR(check_tensors(src.side(), dst.side()), "dtype differs");
    dst = refit_test::tp_columns();
    dst.names[0] = "v";
    CHECK_PLAN_ERROR(check_tensors(src.side(), dst.side()), "missing from the source layout");
    CHECK_PLAN_ERROR(check_options(PlanOptions{0, 0}), "bucket_bytes must be positive, got 0");
}

static void piece_errors() {
    BufferUses uses;
    RankMarks holds;
    OwnedSide bad = refit_test::tp_rows();
    bad.pieces[1].extent = idx({3, 6});  // rows 2..5 of a 4-row tensor
    uses.assign(bad.buffers.size(), 0);
    CHECK_PLAN_ERROR(check_pieces(bad.side(), "source", false, uses, holds),
                     "source piece [2:5, 0:6] lies outside the global shape (4, 6)");

    bad = refit_test::tp_rows();
    bad.pieces[0].local_stride = idx({6, 2});
    uses.assign(bad.buffers.size(), 0);
    CHECK_PLAN_ERROR(check_pieces(bad.side(), "source", false, uses, holds),
                     "not contiguous in its last dimension (stride 2)");

    bad = refit_test::tp_rows();
    bad.buffers[1].numel = 11;  // the piece reaches elements [0, 12)
    uses.assign(bad.buffers.size(), 0);
    CHECK_PLAN_ERROR(check_pieces(bad.side(), "source", false, uses, holds),
                     "reaches elements [0, 12) of a local tensor of 11 elements");
}

static void destination_not_filled() {
    OwnedSide dst = refit_test::tp_columns();
    dst.buffers[1].numel = 13;  // one element no piece writes
    BufferUses uses(dst.buffers.size(), 0);
    RankMarks holds;
    check_pieces(dst.side(), "destination", true, uses, holds);
    CHECK_EQ(int(uses[1]), int(1 | kPartlyFilled));
    CHECK_PLAN_ERROR(check_destination_coverage(dst.side(), uses),
                     "destination local tensor has 13 elements but its pieces cover 12");

    // A buffer no piece refers to is fine on the source, never on the destination.
    OwnedSide extra = refit_test::tp_columns();
    extra.buffer(5, 4, 2);
    uses.assign(extra.buffers.size(), 0);
    holds.clear();
    check_pieces(extra.side(), "destination", true, uses, holds);
    CHECK_PLAN_ERROR(check_unused_buffers(extra.side(), "destination", true, uses, holds),
                     "has 4 elements but no piece");
    check_unused_buffers(extra.side(), "source", false, uses, holds);
    CHECK(marked_ranks(holds) == std::vector<int64_t>({0, 1, 5}));
}

int main() {
    good_layout_passes();
    tensors_matched_by_name();
    tensor_errors();
    piece_errors();
    destination_not_filled();
    return refit_test::report("test_validate");
}
