"""The plan compiler: validation errors, determinism, buckets, and random layouts (hypothesis)."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refit_engine import Layout, Planner, RefitError, Split, compile_plans
from refit_engine.harness.grid import ParallelGrid
from refit_engine.tables import BUFFER, MSG, PIECE, SEG, TENSOR

from refit_check import check_refit, dense


def tp_layout(world, tp, shape=(16, 8), dtype="bfloat16", name="w", offset=0):
    return dense(world, tp, name, shape, offset=offset, dtype=dtype)


# -- bad layouts ------------------------------------------------------------------------------

def test_missing_destination_tensor_source():
    src = tp_layout(2, 2)
    dst = tp_layout(2, 2)
    dst.place("extra", (4,), "float32", [(0, 0)])
    with pytest.raises(RefitError, match="missing from the source") as info:
        Planner(src, dst)
    assert info.value.tensor == "extra" and info.value.ranks == [0]


def test_extra_source_tensor():
    src = tp_layout(2, 2)
    src.place("only_in_src", (4,), "float32", [(1, 0)])
    with pytest.raises(RefitError, match="extra tensor") as info:
        Planner(src, tp_layout(2, 2))
    assert info.value.tensor == "only_in_src" and info.value.ranks == [1]


def test_global_shape_mismatch():
    with pytest.raises(RefitError, match=r"global shape differs: source \(16, 8\), destination \(16, 4\)") as info:
        Planner(tp_layout(2, 2), tp_layout(2, 2, shape=(16, 4)))
    assert info.value.tensor == "w" and info.value.ranks == [0, 1]


def test_dtype_mismatch():
    with pytest.raises(RefitError, match="dtype differs") as info:
        Planner(tp_layout(2, 2), tp_layout(2, 2, dtype="float32"))
    assert info.value.tensor == "w"


def test_size_that_does_not_divide():
    with pytest.raises(RefitError, match="does not divide into 3 parts") as info:
        tp_layout(3, 3, shape=(16, 8))
    assert info.value.tensor == "w" and info.value.ranks == [0, 1, 2]


def test_stride_that_does_not_divide():
    layout = Layout()
    with pytest.raises(RefitError, match="with stride 2"):
        layout.place("fc1", (10, 4), "bfloat16", [(0, 0), (1, 1)], Split(0, 2, stride=2))


def test_missing_source_shard():
    src = Layout()
    src.place("w", (8, 4), "float32", [(0, 0)], Split(0, 2))  # part 1 held by nobody
    with pytest.raises(RefitError, match="cover 16 of 32 elements") as info:
        Planner(src, tp_layout(2, 1, shape=(8, 4), dtype="float32"))
    assert info.value.tensor == "w" and info.value.ranks == [0]


def test_overlapping_source_pieces():
    src = Layout()
    src.add_tensor("w", (8, 4), "float32")
    src.add_buffer(0, "a", (5, 4), "float32")
    src.add_buffer(1, "b", (4, 4), "float32")
    src.add_piece("w", 0, "a", (0, 0), (5, 4))
    src.add_piece("w", 1, "b", (4, 0), (4, 4))
    with pytest.raises(RefitError, match="overlap") as info:
        Planner(src, tp_layout(1, 1, shape=(8, 4), dtype="float32"))
    assert info.value.ranks == [0, 1]


def test_destination_element_never_written():
    dst = Layout()
    dst.add_tensor("w", (8, 4), "float32")
    dst.add_buffer(0, "w", (9, 4), "float32")  # one row too many
    dst.add_piece("w", 0, "w", (0, 0), (8, 4))
    with pytest.raises(RefitError, match="never be written") as info:
        Planner(tp_layout(1, 1, shape=(8, 4), dtype="float32"), dst)
    assert info.value.tensor == "w" and info.value.ranks == [0]


def shared_buffer_case(rows, buffer_shape, b_strides, src_rank=0):
    """Tensors 'a' and 'b' (rows x 4) in one destination buffer on rank 0: 'a' at element 0
    with row stride 8, 'b' at element 4 with `b_strides`; the source holds both whole."""
    dst = Layout()
    for name in ("a", "b"):
        dst.add_tensor(name, (rows, 4), "float32")
    dst.add_buffer(0, "shared", buffer_shape, "float32")
    dst.add_piece("a", 0, "shared", (0, 0), (rows, 4), local_offset=0, local_strides=(8, 1))
    dst.add_piece("b", 0, "shared", (0, 0), (rows, 4), local_offset=4, local_strides=b_strides)
    src = Layout()
    for name in ("a", "b"):
        src.place(name, (rows, 4), "float32", [(src_rank, 0)])
    return src, dst


def test_destination_element_written_twice():
    src, dst = shared_buffer_case(2, (4, 4), b_strides=(4, 1))  # b's row 1 lands on a's row 1
    with pytest.raises(RefitError, match="written twice"):
        Planner(src, dst)


def test_interleaved_destination_pieces_are_fine():
    """Strided pieces that interleave without overlapping (column blocks) are accepted."""
    src, dst = shared_buffer_case(3, (3, 8), b_strides=(8, 1), src_rank=1)
    check_refit(src, dst)


def test_piece_outside_local_tensor():
    dst = Layout()
    dst.add_tensor("w", (4, 4), "float32")
    dst.add_buffer(0, "w", (4, 4), "float32")
    dst.add_piece("w", 0, "w", (0, 0), (4, 4), local_offset=2)
    with pytest.raises(RefitError, match="reaches elements"):
        Planner(tp_layout(1, 1, shape=(4, 4), dtype="float32"), dst)


def test_non_contiguous_last_dim_rejected():
    dst = Layout()
    dst.add_tensor("w", (4, 4), "float32")
    dst.add_buffer(0, "w", (4, 8), "float32")
    dst.add_piece("w", 0, "w", (0, 0), (4, 4), local_strides=(8, 2))
    with pytest.raises(RefitError, match="not contiguous in its last dimension"):
        Planner(tp_layout(1, 1, shape=(4, 4), dtype="float32"), dst)


@pytest.mark.parametrize("strides", [(0, 1), (2, 1)])
def test_self_overlapping_piece_rejected(strides):
    # Rows 0 and 1 of the box would land on the same (or interleaved) elements: fills the
    # local tensor's size while leaving elements unwritten.
    dst = Layout()
    dst.add_tensor("w", (4, 4), "float32")
    dst.add_buffer(0, "w", (16,), "float32")
    dst.add_piece("w", 0, "w", (0, 0), (4, 4), local_strides=strides)
    with pytest.raises(RefitError, match="elements overlap"):
        Planner(tp_layout(1, 1, shape=(4, 4), dtype="float32"), dst)


def test_replicas_are_one_piece_with_rank_sorted_holders():
    layout = Layout()
    layout.place("w", (8, 4), "float32", [(3, 0), (1, 0), (2, 0)])  # three DP replicas
    layout.add_buffer(1, "again", (8, 4), "float32")  # rank 1 holds the box a second time
    layout.add_piece("w", 1, "again", (0, 0), (8, 4))
    _, _, buffers, pieces, holders = layout.tables()
    assert len(pieces) == 2 and list(pieces[:, PIECE["holders_count"]]) == [3, 1]
    assert [int(buffers[b, BUFFER["rank"]]) for b in holders] == [1, 2, 3, 1]
    assert len(layout.placements()) == 4
    check_refit(layout, tp_layout(4, 2, shape=(8, 4), dtype="float32"))


def test_holders_out_of_rank_order():
    src, dst = tp_layout(2, 1), tp_layout(2, 1)

    def swapped(src_t, dst_t):  # ranks 1, 0
        src_t["holders"][:] = src_t["holders"][::-1].copy()
    with pytest.raises(RefitError, match=r"'w'.*\[0, 1\].*out of rank order or one rank twice"):
        _raw_planner(src, dst, swapped)

    def twice(src_t, dst_t):
        src_t["holders"][:] = src_t["holders"][0]
    with pytest.raises(RefitError, match="out of rank order or one rank twice"):
        _raw_planner(src, dst, twice)

    def past_the_end(src_t, dst_t):
        src_t["pieces"][0, PIECE["holders_count"]] = len(src_t["holders"]) + 1
    with pytest.raises(RefitError, match="holders .* that do not exist"):
        _raw_planner(src, dst, past_the_end)


def _raw_planner(src, dst, edit):
    """A planner from the two layouts' tables after `edit(src_tables, dst_tables)` changed
    them in place (copies, by LayoutTables field name): for inputs no Layout would produce."""
    from refit_engine import _core
    src_t = {k: t.copy() if hasattr(t, "copy") else list(t)
             for k, t in src.tables()._asdict().items()}
    dst_t = {k: t.copy() if hasattr(t, "copy") else list(t)
             for k, t in dst.tables()._asdict().items()}
    edit(src_t, dst_t)
    return _core.Planner(*src_t.values(), *dst_t.values(), 1 << 20, 0)


def test_values_that_would_overflow_int64_are_rejected():
    near_max = 2**63 - 3

    def far_start(side):  # start + extent wraps past int64: must not pass as inside the shape
        def edit(src_t, dst_t):
            (src_t if side == "source" else dst_t)["pieces"][0, PIECE["start.0"]] = near_max
        return edit
    for side in ("source", "destination"):
        with pytest.raises(RefitError, match=f"{side} piece .* lies outside the global shape"):
            _raw_planner(tp_layout(1, 1), tp_layout(1, 1), far_start(side))

    def huge_stride(src_t, dst_t):  # (extent - 1) * stride wraps to a small, "valid" hull
        dst_t["pieces"][0, PIECE["stride.0"]] = 2**62 + 1
    with pytest.raises(RefitError, match="reaching past the range of 64-bit offsets"):
        _raw_planner(tp_layout(1, 1), tp_layout(1, 1), huge_stride)

    def huge_rank(src_t, dst_t):
        src_t["buffers"][0, BUFFER["rank"]] = 2**60
    with pytest.raises(RefitError, match="rank 1152921504606846976 is out of range"):
        _raw_planner(tp_layout(1, 1), tp_layout(1, 1), huge_rank)

    def huge_shape(src_t, dst_t):
        src_t["tensors"][0, TENSOR["shape.0"]] = dst_t["tensors"][0, TENSOR["shape.0"]] = 2**62
    with pytest.raises(RefitError, match="too large to address"):
        _raw_planner(tp_layout(1, 1), tp_layout(1, 1), huge_shape)


def test_error_before_pieces_are_checked_survives_bad_holders():
    # A name mismatch is reported (naming holders' ranks) while a piece's holder run still
    # points nowhere: the message must not read outside the tables.
    def edit(src_t, dst_t):
        dst_t["names"] = ["other"]
        dst_t["pieces"][0, PIECE["holders_first"]] = 1 << 40
    with pytest.raises(RefitError, match="'other'.*has no source"):
        _raw_planner(tp_layout(1, 1), tp_layout(1, 1), edit)


def test_bad_bucket_budget_and_node_size():
    with pytest.raises(RefitError, match="bucket_bytes must be positive"):
        Planner(tp_layout(2, 2), tp_layout(2, 1), bucket_bytes=0)
    with pytest.raises(RefitError, match="ranks_per_node must be 0 .* or positive, got -2"):
        Planner(tp_layout(2, 2), tp_layout(2, 1), ranks_per_node=-2)


def test_bad_element_size_in_tables():
    def edit(src_t, dst_t):
        src_t["tensors"][0, TENSOR["itemsize"]] = 2**33  # would have been truncated to 0 as a 32-bit element size
    with pytest.raises(RefitError, match="element size 8589934592 is not valid"):
        _raw_planner(tp_layout(1, 1), tp_layout(1, 1), edit)


# -- determinism and buckets ------------------------------------------------------------------

def test_rank_plan_equals_cluster_plan_and_is_stable():
    src, dst = tp_layout(8, 4, shape=(64, 32)), tp_layout(8, 2, shape=(64, 32))
    a, b = Planner(src, dst, bucket_bytes=512), Planner(src, dst, bucket_bytes=512)
    cluster = a.plan_all()
    for rank in a.ranks:
        assert a.plan_rank(rank).fingerprint() == cluster[rank].fingerprint()
        assert b.plan_rank(rank).fingerprint() == cluster[rank].fingerprint()


def test_buckets_split_rows_and_long_rows():
    # One 4 KiB contiguous row per transfer and a 100-byte budget: rows are cut within the row.
    src = tp_layout(2, 1, shape=(4, 512), dtype="uint8")
    dst = tp_layout(2, 1, shape=(4, 512), dtype="uint8", offset=2)
    plans = check_refit(src, dst, bucket_bytes=100)
    assert plans[0].send_messages[:, MSG["bytes"]].max() == 100
    assert plans[0].num_buckets == (4 * 512 + 99) // 100
    # A budget that holds 3 rows of a pitched copy: whole rows per message.
    src = tp_layout(2, 2, shape=(8, 16), dtype="uint8")
    dst = tp_layout(2, 1, shape=(8, 16), dtype="uint8", offset=2)
    plans = check_refit(src, dst, bucket_bytes=48)
    assert set(plans[2].recv[:, SEG["rows"]]) <= {1, 2, 3}


def test_stats():
    plans = compile_plans(tp_layout(4, 4), tp_layout(4, 2))
    total = 16 * 8 * 2
    assert sum(p.bytes_received + p.bytes_local for p in plans.values()) == total * 2
    per_peer = plans[0].bytes_per_peer()
    assert sum(v["received"] for v in per_peer.values()) == plans[0].bytes_received
    assert plans[0].nbytes > 0


# -- random layouts ---------------------------------------------------------------------------

@st.composite
def side(draw, world_choices=(1, 2, 4, 8)):
    world = draw(st.sampled_from(world_choices))
    def divisors(n, cap=8):
        return [d for d in range(1, min(n, cap) + 1) if n % d == 0]
    pp = draw(st.sampled_from(divisors(world, 2)))
    tp = draw(st.sampled_from(divisors(world // pp)))
    ep = draw(st.sampled_from(divisors(world // pp, 4)))
    etp = draw(st.sampled_from(divisors(world // (pp * ep), 2)))
    return dict(world=world, tp=tp, pp=pp, ep=ep, etp=etp, grouped=draw(st.booleans()),
                stride=draw(st.sampled_from([1, 2])), tp_dim=draw(st.sampled_from([0, 1])))


def build(cfg, model, offset):
    grid = ParallelGrid(cfg["world"], tp=cfg["tp"], pp=cfg["pp"], ep=cfg["ep"], etp=cfg["etp"],
                        offset=offset)
    layout = Layout()
    layers, experts, dtype = model["layers"], model["experts"], model["dtype"]
    rows, cols = model["rows"], model["cols"]
    for stage in range(cfg["pp"]):
        dense = grid.dense_holders(stage)
        for layer in grid.stage_layers(layers, stage):
            tp = cfg["tp"]
            layout.place(f"l{layer}.w", (rows, cols), dtype, dense,
                         Split(cfg["tp_dim"], tp, stride=cfg["stride"] if cfg["tp_dim"] == 0 else 1)
                         if tp > 1 else None)
            layout.place(f"l{layer}.norm", (cols,), dtype, dense)
            etp = cfg["etp"]
            split = Split(0, etp) if etp > 1 else None
            local_shape = (rows // etp, cols)
            per_rank = experts // cfg["ep"]
            for e in range(experts):
                for rank, part, local in grid.expert_holders(e, experts, stage):
                    extra = {}
                    if cfg["grouped"]:
                        extra = dict(key=f"l{layer}.experts", buffer_shape=(per_rank,) + local_shape,
                                     offset=local * rows // etp * cols)
                    layout.place(f"l{layer}.e{e}", (rows, cols), dtype, [(rank, part)], split, **extra)
    return layout


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=side(), dst=side(), collocated=st.booleans(),
       dtype=st.sampled_from(["bfloat16", "float32", "uint8", "float64"]),
       rows_mul=st.integers(1, 3), cols=st.sampled_from([8, 16, 24]),
       bucket=st.sampled_from([64, 1000, 1 << 20]), seed=st.integers(0, 2**31),
       ranks_per_node=st.sampled_from([0, 2, 4]))
def test_random_layouts_refit_exactly(src, dst, collocated, dtype, rows_mul, cols, bucket, seed,
                                      ranks_per_node):
    model = dict(layers=2, experts=4, dtype=dtype, rows=16 * rows_mul, cols=cols)
    src_layout = build(src, model, 0)
    dst_layout = build(dst, model, 0 if collocated else src["world"])
    plans = check_refit(src_layout, dst_layout, bucket_bytes=bucket, seed=seed,
                        ranks_per_node=ranks_per_node)
    # One rank's plan (its own search of the transfers) is that rank's part of the cluster plan.
    planner = Planner(src_layout, dst_layout, bucket_bytes=bucket, ranks_per_node=ranks_per_node)
    for rank in plans:
        assert planner.plan_rank(rank).fingerprint() == plans[rank].fingerprint()


def test_link_aware_choice_prefers_replicas_on_the_destination_node():
    # Experts with two replicas (expert-DP 2) on 8 ranks in nodes of 4; the destination spreads
    # them over all ranks (EP 8). A replica on the receiver's node beats one across the network.
    def experts(ep, world=8):
        grid = ParallelGrid(world, ep=ep)
        layout = Layout()
        for e in range(8):
            layout.place(f"e{e}", (8, 8), "bfloat16",
                         [(r, part) for r, part, _ in grid.expert_holders(e, 8)])
        return layout
    src, dst = experts(4), experts(8)
    for rpn, expect_network in ((4, 0), (0, None)):
        plans = check_refit(src, dst, ranks_per_node=rpn)
        network = sum(int(m[MSG["bytes"]]) for r, p in plans.items() for m in p.recv_messages
                      if int(m[MSG["peer"]]) // 4 != r // 4)
        if expect_network is not None:
            assert network == expect_network
        else:
            round_robin = network
    assert round_robin > 0  # without node awareness some experts cross the network


def test_planner_from_tables_equals_planner_from_layout():
    # kimi_k2_tables shares one run of holders between a part's blocks; a Layout gives each
    # piece its own: the same plans either way.
    from refit_engine.harness.models.kimi_k2 import KimiK2Config, kimi_k2_layout, kimi_k2_tables
    cfg = KimiK2Config.toy()
    grids = ParallelGrid(8, tp=4, ep=4), ParallelGrid(8, tp=2, ep=8)
    from_layouts = Planner(*(kimi_k2_layout(cfg, g) for g in grids), ranks_per_node=4).plan_all()
    from_tables = Planner(*(kimi_k2_tables(cfg, g) for g in grids), ranks_per_node=4).plan_all()
    assert {r: p.fingerprint() for r, p in from_layouts.items()} == \
        {r: p.fingerprint() for r, p in from_tables.items()}


def test_validation_phase_timings():
    timings = Planner(tp_layout(4, 2), tp_layout(4, 4))._core.timings
    assert [name for name, _ in timings] == ["tensors", "source pieces", "destination pieces",
                                             "unused buffers", "source replicas",
                                             "destination buffers"]
    assert all(seconds >= 0 for _, seconds in timings)


def test_layout_tables_follow_later_additions():
    layout = tp_layout(2, 2)
    before = layout.tables()
    layout.place("v", (4,), "float32", [(0, 0), (1, 0)])
    names, _, buffers, pieces, holders = layout.tables()
    assert names == before[0] + ["v"] and len(buffers) == len(before[2]) + 2
    assert len(pieces) == len(before[3]) + 1 and len(holders) == len(before[4]) + 2
