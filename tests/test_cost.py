"""Cost model of the CUDA IPC transport: a rank's IPC bytes are copied in its fused local-copy
pass, cross NVLink once, and skip pack, unpack, staging and message latency."""

from dataclasses import replace

import pytest

from refit_engine.harness.cost import (RankFigures, floor, predict_loopback, predict_rank,
                                       rank_figures)
from refit_engine.harness.topology import preset

GB = 10**9


def _gpu():
    # Round figures so the expected seconds read off by hand.
    return replace(preset("h100", 16), copy_gbps=1000.0, intra_node_gbps=100.0, latency_us=1000.0)


def test_ipc_peers_are_read_in_the_local_copy_pass_not_staged():
    per_peer = {1: {"sent": 3 * GB, "received": 2 * GB},      # same node: IPC
                "2": {"sent": 1 * GB, "received": 1 * GB},    # same node, NCCL (JSON'd key)
                9: {"sent": 4 * GB, "received": 5 * GB}}      # other node: NCCL
    f = rank_figures(0, GB, per_peer, _gpu(), {1: "ipc", 2: "nccl", 9: "nccl"})
    assert (f.sent_intra, f.received_intra, f.sent_inter, f.received_inter) == (4 * GB, 3 * GB,
                                                                                  4 * GB, 5 * GB)
    assert (f.sent_ipc, f.received_ipc) == (3 * GB, 2 * GB)  # a part of the NVLink bytes
    assert (f.sent_staged, f.received_staged) == (5 * GB, 6 * GB)
    # No transports: every peer staged, the figures from before IPC.
    assert rank_figures(0, GB, per_peer, _gpu()).received_ipc == 0


def test_ipc_to_another_node_is_refused():
    with pytest.raises(ValueError, match="peer 9 is on another node"):
        rank_figures(0, 0, {9: {"sent": 1, "received": 1}}, _gpu(), {9: "ipc"})


def test_all_ipc_rank_is_bound_by_its_copy_pass_or_nvlink():
    topo = _gpu()
    # HBM-bound: (local 9 GB + IPC 1 GB) x 2 / 1000 GB/s = 20 ms against NVLink's 1 GB at
    # 100 GB/s = 10 ms. No buckets: no latency, no fill and drain.
    hbm = RankFigures(0, local_bytes=9 * GB, sent_intra=GB, received_intra=GB, sent_ipc=GB,
                      received_ipc=GB)
    p = predict_rank(hbm, topo, buckets=0)
    assert p["seconds"] == pytest.approx(0.020) and p["term"] == "unpack + local + ipc"
    assert p["pack"] == 0
    # NVLink-bound: 4 GB read over IPC (and 4 GB read out of this rank by its peers) at 100 GB/s
    # per direction: 40 ms against the copy pass's (1 + 4) x 2 / 1000 = 10 ms.
    link = RankFigures(0, local_bytes=GB, sent_intra=4 * GB, received_intra=4 * GB,
                       sent_ipc=4 * GB, received_ipc=4 * GB)
    p = predict_rank(link, topo, buckets=0)
    assert p["seconds"] == pytest.approx(0.040) and p["term"] == "transfer"


def test_ipc_prediction_below_nccl_and_at_the_floor():
    topo = preset("h100", 8)
    moved = {"local_bytes": 2 * GB, "sent_intra": 10 * GB, "received_intra": 10 * GB}
    nccl = RankFigures(0, **moved)
    ipc = RankFigures(0, **moved, sent_ipc=10 * GB, received_ipc=10 * GB)
    staged, direct = predict_rank(nccl, topo, buckets=160), predict_rank(ipc, topo, buckets=0)
    assert direct["seconds"] < staged["seconds"]
    # The same bytes on the same links: the floor does not depend on the transport, and the
    # all-IPC rank (NVLink-bound here) predicts exactly it.
    assert floor([ipc], topo) == floor([nccl], topo)
    assert direct["seconds"] == pytest.approx(floor([ipc], topo)["seconds"])


def test_mixed_rank_stages_only_its_nccl_bytes():
    topo = _gpu()
    f = RankFigures(0, local_bytes=GB, sent_intra=2 * GB, received_intra=2 * GB,
                    sent_inter=GB, received_inter=GB, sent_ipc=2 * GB, received_ipc=2 * GB)
    p = predict_rank(f, topo, buckets=2)
    # Pack and unpack: the 1 GB of network bytes each way, x 2 / 1000 GB/s.
    assert p["pack"] == pytest.approx(0.002)
    # Local + IPC + unpack: (1 + 2 + 1) x 2 / 1000 GB/s.
    assert p["unpack + local + ipc"] == pytest.approx(0.008)
    # Transfer: the network's 1 GB at 50 GB/s (20 ms) beside NVLink's 2 GB at 100 GB/s (20 ms),
    # plus two buckets' latency.
    assert p["transfer"] == pytest.approx(0.022)
    assert p["seconds"] == pytest.approx(0.022 + (0.002 + 0.002) / 2)


def test_one_gpu_playing_every_rank_over_ipc_is_one_pass():
    # Processes sharing one GPU: NCCL refuses them, IPC reads each peer's tensor in place.
    assert predict_loopback(GB, GB, 1000.0, staged=False) == pytest.approx(0.004)
    assert predict_loopback(GB, GB, 1000.0, staged=True) == pytest.approx(0.008)


# Destination formats (issue 16): bytes of a box under its format, and passes that read one
# size and write another.

def test_box_bytes_count_elements_and_the_blocks_they_touch():
    import math

    from refit_engine.harness.cost import box_bytes, format_size, tensor_bytes
    from refit_engine.quantize import scale_shape
    # Kimi K2's kv down projection: 576 rows, not a multiple of 128 (a partial block row).
    shape = (576, 7168)
    assert tensor_bytes(shape, "fp8_block128", 2) == 576 * 7168 + 4 * 5 * 56
    assert tensor_bytes(shape, "fp8_block128", 2) == (
        math.prod(shape) + 4 * math.prod(scale_shape(shape, "fp8_block128")))
    assert tensor_bytes(shape, "bf16", 2) == 2 * 576 * 7168
    assert tensor_bytes(shape, "keep", 4) == tensor_bytes(shape, "fp32", 2) == 4 * 576 * 7168
    # A TP shard of whole blocks: elements + 4 x its blocks.
    assert box_bytes((1024, 256), (512, 0), (256, 256), "fp8_block128", 2) == 256 * 256 + 4 * 4
    # A box that cuts blocks touches each of them: rows 100-159 lie in block rows 0 and 1.
    assert box_bytes((512, 512), (100, 0), (60, 256), "fp8_block128", 2) == 60 * 256 + 4 * 2 * 2
    # MXFP8: one e8m0 byte per 32 consecutive elements of a row.
    assert box_bytes((4, 100), (0, 0), (4, 100), "mxfp8", 2) == 400 + 4 * 4
    assert format_size("bfloat16", 2) == (2, 0, (1, 1))
    with pytest.raises(ValueError, match="needs a 2-D tensor"):
        box_bytes((7168,), (0,), (7168,), "fp8_block128", 2)


def test_passes_count_bytes_read_and_bytes_written():
    topo = replace(_gpu(), inter_node_gbps=100.0)
    # FP8 destination: packs read 2 GB of BF16 and write 1 GB of FP8, unpacks read and write
    # 1 GB, local copies read 4 GB and write 2 GB, IPC reads 2 GB (BF16) and writes 1 GB.
    f = RankFigures(0, local_bytes=4 * GB, sent_inter=GB, received_inter=GB, sent_intra=2 * GB,
                    received_intra=2 * GB, sent_ipc=2 * GB, received_ipc=2 * GB,
                    pack_read=2 * GB, unpack_written=GB, local_written=2 * GB, ipc_written=GB)
    p = predict_rank(f, topo, buckets=1)
    assert p["pack"] == pytest.approx(3e-3)
    assert p["unpack + local + ipc"] == pytest.approx((2 + 6 + 3) * 1e-3)
    assert floor([f], topo)["seconds"] == pytest.approx(max(6e-3, 2 / 100, 1 / 100))
    # Left None, a pass writes what it reads: twice the bytes, as before formats.
    plain = RankFigures(0, local_bytes=4 * GB, sent_inter=GB, received_inter=GB)
    q = predict_rank(plain, topo, buckets=1)
    assert (q["pack"], q["unpack + local"]) == (pytest.approx(2e-3), pytest.approx(10e-3))
    assert (plain.local_write_bytes, plain.pack_read_bytes, plain.unpack_write_bytes,
            plain.ipc_write_bytes) == (4 * GB, GB, GB, 0)
