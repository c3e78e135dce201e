"""Memory planner, dry run, topology and cost model."""

import re

import pytest

from refit_engine import RefitError
from refit_engine.harness.cost import RankFigures, floor, predict, predict_loopback, predict_rank
from refit_engine.harness.dry_run import check_fits, dry_run, main
from refit_engine.harness.grid import ParallelGrid
from refit_engine.harness.models.kimi_k2 import KimiK2Config
from refit_engine.harness.topology import preset


def test_refuses_tp8_without_ep_on_128_h100s():
    with pytest.raises(RefitError, match="does not fit.*raise EP"):
        check_fits(KimiK2Config(), ParallelGrid(128, tp=8), ParallelGrid(128, tp=4, ep=128),
                   preset("h100", 128), collocated=True)
    assert main(["--src", "tp=8", "--dst", "tp=4,ep=128", "--gpus", "128", "--json"]) == 2


def test_dry_run_toy_figures_add_up():
    cfg = KimiK2Config.toy()
    topo = preset("h100", 8)
    result = dry_run(cfg, ParallelGrid(8, tp=4, ep=4), ParallelGrid(8, tp=2, ep=8), topo)
    ranks = result["ranks"]
    assert result["fits"] and len(ranks) == 8
    sent = sum(f.sent_intra + f.sent_inter for f in ranks)
    received = sum(f.received_intra + f.received_inter for f in ranks)
    assert sent == received > 0
    assert 0 < result["floor"]["seconds"] <= result["predicted"]["seconds"]


def test_floor_and_prediction_terms():
    topo = preset("h100", 16)
    f = RankFigures(0, 0, 0, 0, local_bytes=0, sent_intra=0, sent_inter=50 * 10**9,
                    received_intra=0, received_inter=0, messages=1)
    assert floor([f], topo) == {"seconds": pytest.approx(1.0), "rank": 0, "term": "network"}
    p = predict_rank(f, topo, buckets=10)
    assert p["term"] == "transfer" and p["seconds"] > 1.0
    # The whole refit: the slowest rank, after the collective check.
    assert predict([f], topo, {0: 10})["seconds"] == pytest.approx(p["seconds"] + topo.check_us * 1e-6)
    # One GPU playing every rank: three passes over remote bytes when staged.
    assert predict_loopback(0, 10**9, 2000.0, staged=True) == pytest.approx(3e-3)


def _measure_worker(rank, world, per_node):
    from dataclasses import replace

    from refit_engine.harness.topology import measure
    base = replace(preset("cpu"), nodes=world // per_node, gpus_per_node=per_node,
                   intra_node_gbps=-1.0, inter_node_gbps=-1.0, latency_us=-1.0, check_us=-1.0)
    topo = measure(base, nbytes=1 << 20, repeats=2)
    return topo.copy_gbps, topo.intra_node_gbps, topo.inter_node_gbps, topo.latency_us, topo.check_us


@pytest.mark.parametrize("world, per_node", [(2, 2), (3, 3), (4, 2), (2, 1)])
def test_measure_topology_is_collective_and_positive(world, per_node):
    from multiproc import run_world
    results = run_world(_measure_worker, world, per_node)
    assert all(r == results[0] for r in results)  # every rank returns the slowest rank's figures
    copy, intra, inter, latency, check = results[0]
    assert copy > 0 and latency > 0 and check > 0
    # One node has no cross-node pair: the base figure stays; two nodes measure it. Nodes of
    # one rank have no node peers: the base NVLink figure stays and latency goes across.
    assert inter == -1.0 if world == per_node else inter > 0
    assert intra == -1.0 if per_node == 1 else intra > 0


def test_stages_add_up_where_they_share_cores():
    from dataclasses import replace

    f = RankFigures(0, local_bytes=10**9, sent_intra=10**9, received_intra=10**9)
    gpu = replace(preset("h100"), copy_gbps=1000.0, intra_node_gbps=100.0, latency_us=1000.0)
    # By hand: pack 2 ms (1 GB read + written at 1000 GB/s), transfer 10 ms + 2 buckets x 1 ms,
    # unpack + local 4 ms.
    shared = predict_rank(f, replace(gpu, overlap=False), buckets=2)
    assert shared["seconds"] == pytest.approx(0.018) and shared["term"] == "pack + transfer + unpack"
    # Pipelined: the transfer sets the pace, plus one bucket's pack and unpack ((2 + 2) ms / 2).
    pipelined = predict_rank(f, gpu, buckets=2)
    assert pipelined["seconds"] == pytest.approx(0.014) and pipelined["term"] == "transfer"


def test_report_names_the_busiest_rank_of_each_link():
    from refit_engine.harness.dry_run import report
    topo = preset("h100", 16)
    ranks = [RankFigures(0, sent_intra=7 * 2**30, received_inter=1 * 2**30),
             RankFigures(9, sent_inter=3 * 2**30, received_intra=5 * 2**30, received_inter=2 * 2**30)]
    out = report({"ranks": ranks, "topology": topo, "fits": True, "floor": floor(ranks, topo),
                  "predicted": predict(ranks, topo, {0: 1, 9: 1})})
    for label, rank, gib in (("sent over NVLink", 0, "7.00"), ("received over NVLink", 9, "5.00"),
                             ("sent over network", 9, "3.00"), ("received over network", 9, "2.00")):
        assert re.search(rf"{label} \(rank {rank}\) +{gib}\n", out), out


def test_dry_run_weights_per_rank_match_the_parameter_count():
    from refit_engine.harness.dry_run import GIB, weights_per_gpu_gib
    cfg = KimiK2Config.toy()
    src, dst = ParallelGrid(8, tp=4, ep=4), ParallelGrid(8, tp=2, ep=8, offset=8)
    ranks = dry_run(cfg, src, dst, preset("h100", 16))["ranks"]
    assert len(ranks) == 16  # non-collocated: the destination on ranks 8-15
    assert max(f.src_bytes for f in ranks) == pytest.approx(weights_per_gpu_gib(cfg, src) * GIB)
    assert max(f.dst_bytes for f in ranks) == pytest.approx(weights_per_gpu_gib(cfg, dst) * GIB)
    assert all(f.dst_bytes == 0 for f in ranks[:8]) and all(f.src_bytes == 0 for f in ranks[8:])


def test_dry_run_cli_per_rank(capsys):
    assert main(["--gpus", "8", "--src", "tp=4,ep=4", "--dst", "tp=2,ep=8", "--layers", "3",
                 "--per-rank"]) == 0
    out = capsys.readouterr().out
    assert "floor:" in out and "predicted:" in out and out.count("\n") > 16


def test_report_names_the_topology_asked_for(capsys):
    args = ["--src", "tp=4,ep=4", "--dst", "tp=2,ep=8", "--layers", "3"]
    assert main(args + ["--gpus", "8", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "on H200 SXM, 8 GPUs on 1 node of 8 (collocated)" in out
    assert "on H200 SXM, 8 GPUs on 1 node of 8: NVLink 450 GB/s" in out and "16 x 8" not in out
    assert main(args + ["--gpus", "16", "--gpu", "h100", "--non-collocated"]) == 0
    assert "H100 SXM, 32 GPUs on 4 nodes of 8" in capsys.readouterr().out
    assert main(args + ["--gpus", "8", "--gpu", "cpu", "--model", "hidden=1024"]) == 0
    out = capsys.readouterr().out
    assert "CPU (gloo), 8 ranks on 2 nodes of 4" in out and "over loopback" in out


def test_bad_planner_options_are_refused(capsys):
    for argv, message in ((["--gpus", "0"], "argument --gpus: must be at least 1"),
                          (["--gpu", "a100"], "argument --gpu: invalid choice"),
                          (["--gpus", "12", "--src", "tp=8"], "not divisible by tp*pp = 8*1"),
                          (["--headroom", "1.5"], "at most 1"),
                          (["--model", "bogus=1"], "--model:")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv


def test_cpu_floor_is_labelled_by_its_link():
    topo = preset("cpu", 4)
    f = RankFigures(0, sent_intra=10**9, received_intra=10**9)
    assert floor([f], topo)["term"] == "loopback"
    assert floor([f], preset("h100", 8))["term"] == "nvlink"


def test_non_collocated_floor_counts_what_the_busiest_rank_moves():
    # CPU ranks share their processors between sending and receiving: `measure` takes the
    # per-direction figure with both directions busy, so a rank that only sends (or only
    # receives, as every rank of a non-collocated refit) moves its bytes at twice that figure.
    # Counted as the busier direction at the measured figure, the floor came out above the
    # measured refit (efficiency 140%).
    from dataclasses import replace
    topo = replace(preset("cpu", 4), intra_node_gbps=1.0)
    collocated = [RankFigures(r, sent_intra=10**9, received_intra=10**9) for r in range(4)]
    assert floor(collocated, topo)["seconds"] == pytest.approx(1.0)  # as before
    non_collocated = [RankFigures(0, sent_intra=10**9), RankFigures(1, sent_intra=10**9),
                      RankFigures(2, received_intra=10**9), RankFigures(3, received_intra=10**9)]
    assert floor(non_collocated, topo)["seconds"] == pytest.approx(0.5)
    # Full-duplex links (GPUs): each direction has the bandwidth on its own.
    gpu = replace(preset("h100", 8), intra_node_gbps=1.0)
    assert floor(non_collocated, gpu)["seconds"] == pytest.approx(1.0)
    assert floor(collocated, gpu)["seconds"] == pytest.approx(1.0)


def test_every_option_has_help():
    import argparse

    from refit_engine.harness.dry_run import build_parser
    missing = [a.option_strings for a in build_parser()._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, f"options without help: {missing}"


def test_refusal_on_cpu_ranks_speaks_of_ranks_not_gpus():
    # A full-size source on CPU ranks: the budget is the preset's memory per rank, not a GPU's.
    with pytest.raises(RefitError) as exc:
        check_fits(KimiK2Config(), ParallelGrid(4, tp=4), ParallelGrid(4, tp=4), preset("cpu", 4),
                   collocated=True)
    reason = exc.value.reason
    assert "per rank (source" in reason and "GPU" not in reason, reason
    assert "but CPU ranks (gloo) have 16 GiB of memory budget each (14 GiB usable at 90%)" in reason
    with pytest.raises(RefitError) as exc:  # GPUs keep their wording
        check_fits(KimiK2Config(), ParallelGrid(128, tp=8), ParallelGrid(128, tp=4, ep=128),
                   preset("h100", 128), collocated=True)
    assert "per GPU (source" in exc.value.reason and "but H100 SXM GPUs have 80 GiB" in exc.value.reason


def test_sweep_names_the_topology_when_no_expert_parallel_size_fits():
    from refit_engine.harness.sweep import choose_expert_parallel
    with pytest.raises(RefitError) as exc:
        choose_expert_parallel(KimiK2Config(), 4, 4, 4, True, "cpu")
    assert "fit on CPU (gloo), 4 ranks on 1 node of 4 (with source EP4" in exc.value.reason
    assert "cpu GPUs" not in exc.value.reason


# The transport (issue 15): same-node peers over CUDA IPC, other nodes over NCCL.

def _toy_dry_run(gpus: int, transport: str, non_collocated: bool = False,
                 src_tp: int = 4, src_ep: int = 4, dst_ep: int = 8) -> dict:
    src = ParallelGrid(gpus, tp=src_tp, ep=src_ep)
    dst = ParallelGrid(gpus, tp=2, ep=dst_ep, offset=gpus if non_collocated else 0)
    return dry_run(KimiK2Config.toy(), src, dst, preset("h100", gpus * (1 + non_collocated)),
                   transport=transport)


def _moved(f):
    return f.local_bytes, f.sent_intra, f.received_intra, f.sent_inter, f.received_inter


def test_ipc_on_one_node_needs_no_staging_and_beats_nccl():
    nccl, auto, ipc = (_toy_dry_run(8, t) for t in ("nccl", "auto", "ipc"))
    assert [_moved(f) for f in auto["ranks"]] == [_moved(f) for f in nccl["ranks"]]
    assert all(f.received_ipc == f.received_intra > 0 for f in auto["ranks"])
    assert all(f.staging_bytes == 0 and f.messages == 0 for f in auto["ranks"] + ipc["ranks"])
    assert min(f.staging_bytes for f in nccl["ranks"]) > 0
    assert auto["predicted"]["seconds"] < nccl["predicted"]["seconds"]
    assert auto["predicted"] == ipc["predicted"] and auto["floor"] == nccl["floor"]
    assert auto["floor"]["seconds"] <= auto["predicted"]["seconds"]


def test_inter_node_peers_keep_nccl_and_their_staging():
    # Collocated on 2 nodes, the source's TP16 across both: network and NVLink peers.
    nccl, auto = (_toy_dry_run(16, t, src_tp=16, src_ep=8) for t in ("nccl", "auto"))
    assert [_moved(f) for f in auto["ranks"]] == [_moved(f) for f in nccl["ranks"]]
    assert any(f.received_inter for f in auto["ranks"])
    for a, n in zip(auto["ranks"], nccl["ranks"]):
        assert a.received_ipc == a.received_intra
        # Staging for the network peers only: less than every peer's, none without them.
        assert (a.staging_bytes > 0) == bool(a.sent_inter or a.received_inter)
        assert a.staging_bytes <= n.staging_bytes
    assert auto["predicted"]["seconds"] <= nccl["predicted"]["seconds"]
    # Non-collocated over two nodes: every peer across, so auto is NCCL throughout.
    nccl, auto = _toy_dry_run(8, "nccl", True), _toy_dry_run(8, "auto", True)
    assert [vars(f) for f in auto["ranks"]] == [vars(f) for f in nccl["ranks"]]
    assert auto["predicted"] == nccl["predicted"]


def test_nccl_staging_and_buckets_are_the_plans_own():
    # Every peer staged: the figures from before IPC, read off the plan's staging per bucket.
    from refit_engine.compiler import Planner
    from refit_engine.harness.dry_run import staged_buckets, staging_bytes
    from refit_engine.harness.models.kimi_k2 import kimi_k2_tables
    cfg = KimiK2Config.toy()
    src, dst = ParallelGrid(16, tp=4, ep=4), ParallelGrid(16, tp=2, ep=8)
    plans = Planner(kimi_k2_tables(cfg, src), kimi_k2_tables(cfg, dst), 1 << 20, 8).plan_all()
    for p in plans.values():
        nccl = {peer: "nccl" for peer in p.bytes_per_peer()}
        assert staging_bytes(p, nccl) == 2 * (max(p.send_staging_bytes, default=0)
                                              + max(p.recv_staging_bytes, default=0))
        assert staged_buckets(p, nccl) == p.num_buckets
        ipc = dict.fromkeys(nccl, "ipc")
        assert staging_bytes(p, ipc) == staged_buckets(p, ipc) == 0


def test_staged_messages_are_packed_end_to_end():
    # Bucket 0 sends to peer 1 (IPC) then peer 9 (NCCL); bucket 1 to peer 9 alone. The IPC
    # executor packs the NCCL messages of a bucket end to end (executors.ipc.without_peers),
    # so bucket 0 needs 100 bytes of send staging (not 300), bucket 1 needs 50.
    import numpy as np

    from refit_engine.compiler import MESSAGE_FIELDS, MSG, SEGMENT_FIELDS, RankPlan
    from refit_engine.harness.dry_run import staged_buckets, staging_bytes
    sent = np.zeros((3, len(MESSAGE_FIELDS)), dtype=np.int64)
    for name, column in (("peer", [1, 9, 9]), ("bucket", [0, 0, 1]), ("offset", [0, 200, 0]),
                         ("bytes", [200, 100, 50])):
        sent[:, MSG[name]] = column
    none = np.zeros((0, len(SEGMENT_FIELDS)), dtype=np.int64)
    plan = RankPlan(0, none, none, none, sent, sent[:0], [300, 50], [], 2)
    assert staging_bytes(plan, {1: "ipc", 9: "nccl"}) == 2 * 100
    assert staging_bytes(plan, {1: "nccl", 9: "ipc"}) == 2 * 200
    assert staging_bytes(plan, {1: "ipc", 9: "ipc"}) == 0
    assert staged_buckets(plan, {1: "nccl", 9: "ipc"}) == 1


def test_peer_transport_follows_the_librarys_rule():
    from refit_engine.harness.topology import check_transport
    topo = preset("h100", 16)
    assert [topo.peer_transport(0, peer, "auto") for peer in (1, 7, 8)] == ["ipc", "ipc", "nccl"]
    assert [topo.peer_transport(0, peer, "ipc") for peer in (1, 8)] == ["ipc", "nccl"]
    assert [topo.peer_transport(0, peer, "nccl") for peer in (1, 8)] == ["nccl", "nccl"]
    assert preset("cpu", 4).peer_transport(0, 1) == "gloo"
    for topo, transport, message in ((preset("cpu", 4), "ipc", "needs GPUs"),
                                     (preset("cpu", 4), "nccl", "needs GPUs"),
                                     (preset("h100", 8), "nvshmem", "unknown transport")):
        with pytest.raises(ValueError, match=message):
            check_transport(topo, transport)


def test_staging_allowance_before_a_plan():
    from refit_engine.harness.dry_run import staging_allowance
    bucket = 64 << 20
    assert staging_allowance(preset("h100", 8), 8, "auto", bucket) == 0  # one node: all IPC
    assert staging_allowance(preset("h100", 8), 8, "nccl", bucket) == 4 * bucket * 16
    assert staging_allowance(preset("h100", 16), 16, "auto", bucket) == 4 * bucket * 16
    assert staging_allowance(preset("cpu", 4), 4, "auto", bucket) == 4 * bucket * 16  # gloo


def test_dry_run_cli_transport(capsys):
    import json
    args = ["--gpus", "8", "--src", "tp=4,ep=4", "--dst", "tp=2,ep=8", "--layers", "3"]
    assert main(args) == 0  # default: auto, as the library
    out = capsys.readouterr().out
    assert "(collocated)\ntransport auto: same-node peers over CUDA IPC" in out
    assert re.search(r"staging \(2 x send \+ 2 x recv\) +0\.00\n", out), out
    figures = {}
    for transport in ("auto", "nccl", "ipc"):
        assert main(args + ["--transport", transport, "--json"]) == 0
        figures[transport] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert figures[transport]["transport"] == transport
    assert figures["auto"]["max_staging_gib"] == figures["ipc"]["max_staging_gib"] == 0
    assert figures["nccl"]["max_staging_gib"] > 0
    assert figures["auto"]["predicted_s"] < figures["nccl"]["predicted_s"]
    # On two nodes the library's transport="ipc" refuses the plan: the report says so.
    assert main(["--gpus", "16", "--src", "tp=16,ep=16", "--dst", "tp=2,ep=16", "--layers", "3",
                 "--transport", "ipc"]) == 0
    assert 'transport="ipc") refuses ranks on more than one node' in capsys.readouterr().out
    gpus = "--transport: transport 'ipc' needs GPUs"
    for argv, message in ((["--transport", "rdma"], "argument --transport: invalid choice"),
                          (["--gpu", "cpu", "--transport", "ipc"], gpus)):
        with pytest.raises(SystemExit) as exc:
            main(args + argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv


# Aliasing (issue 17): plan(alias=True)'s shared local tensors, counted once and never copied.

ALIAS_CASES = [  # (ranks, source TP/EP/ETP, destination TP/EP/ETP)
    (8, (4, 4, 1), (2, 4, 1)),   # EP and ETP kept: every routed expert shared
    (8, (4, 4, 1), (2, 8, 1)),   # EP changed: the experts a rank holds on both sides
    (8, (2, 4, 1), (2, 4, 1)),   # nothing changes: everything shared
    (8, (4, 2, 2), (2, 2, 2)),   # expert TP kept, TP changed
    (8, (4, 4, 1), (2, 2, 2)),   # expert shards differ: replicated tensors only
]


@pytest.mark.parametrize("gpus, s, d", ALIAS_CASES)
def test_aliased_bytes_are_counted_once_and_never_copied(gpus, s, d):
    # The dry run's figure is the library's: aliasing.aliased_bytes on each rank's plan of the
    # same layouts (built as Layout objects here), and memory and local copies drop by
    # exactly that much while every byte over a link stays.
    from refit_engine import aliasing
    from refit_engine.compiler import compile_plans
    from refit_engine.harness.models.kimi_k2 import kimi_k2_layout
    cfg, topo = KimiK2Config.toy(), preset("h100", gpus)
    src = ParallelGrid(gpus, tp=s[0], ep=s[1], etp=s[2])
    dst = ParallelGrid(gpus, tp=d[0], ep=d[1], etp=d[2])
    off, on = (dry_run(cfg, src, dst, topo, alias=a) for a in (False, True))
    assert not off["alias"] and on["alias"]
    layouts = kimi_k2_layout(cfg, src), kimi_k2_layout(cfg, dst)
    plans = compile_plans(*layouts, ranks_per_node=topo.gpus_per_node)
    expected = {r: aliasing.aliased_bytes(p, *layouts) for r, p in plans.items()}
    assert any(expected.values())
    for a, b in zip(off["ranks"], on["ranks"]):
        assert a.aliased_bytes == 0 and b.aliased_bytes == expected[a.rank]
        assert a.total_bytes - b.total_bytes == b.aliased_bytes
        assert a.local_bytes - b.local_bytes == b.aliased_bytes
        assert (a.src_bytes, a.dst_bytes, a.staging_bytes) == (b.src_bytes, b.dst_bytes,
                                                               b.staging_bytes)
        assert _moved(a)[1:] == _moved(b)[1:]
    assert on["predicted"]["seconds"] <= off["predicted"]["seconds"]
    assert on["floor"]["seconds"] <= off["floor"]["seconds"]


def test_aliasing_applies_to_collocated_refits_only(capsys):
    on = _toy_dry_run(8, "auto", non_collocated=True)
    cfg = KimiK2Config.toy()
    src, dst = ParallelGrid(8, tp=4, ep=4), ParallelGrid(8, tp=2, ep=8, offset=8)
    aliased = dry_run(cfg, src, dst, preset("h100", 16), alias=True)
    assert not aliased["alias"]
    assert [vars(f) for f in aliased["ranks"]] == [vars(f) for f in on["ranks"]]
    with pytest.raises(SystemExit) as exc:
        main(["--gpus", "8", "--src", "tp=4,ep=4", "--dst", "tp=2,ep=8", "--layers", "3",
              "--non-collocated", "--alias"])
    assert exc.value.code == 2 and "needs a collocated refit" in capsys.readouterr().err


def test_a_refit_refused_without_aliasing_fits_with_it():
    from dataclasses import replace

    from refit_engine.harness.dry_run import GIB
    cfg = KimiK2Config.toy()
    src, dst = ParallelGrid(8, tp=4, ep=4), ParallelGrid(8, tp=2, ep=4)
    on = dry_run(cfg, src, dst, preset("h100", 8), alias=True)
    need_on = max(f.total_bytes for f in on["ranks"])
    need_off = max(f.total_bytes + f.aliased_bytes for f in on["ranks"])
    assert need_on < need_off
    topo = replace(preset("h100", 8), memory_gib=(need_on + need_off) / 2 / GIB / 0.9)
    with pytest.raises(RefitError, match="does not fit"):
        dry_run(cfg, src, dst, topo)
    fits = dry_run(cfg, src, dst, topo, alias=True)
    assert fits["fits"] and "reason" not in fits
    # Just below what the plan needs with aliasing: the exact figure refuses it, saying so.
    tight = replace(topo, memory_gib=need_on * 0.99 / GIB / 0.9)
    result = dry_run(cfg, src, dst, tight, alias=True)
    assert not result["fits"]
    assert re.match(r"does not fit: rank \d+ needs [\d.]+ GiB \(source [\d.]+ \+ destination "
                    r"[\d.]+ - aliased [\d.]+ \+ staging 0\.0 GiB, the plan's\)", result["reason"])


def test_the_memory_check_counts_aliased_bytes_once():
    # The dry run of issue 17: TP8/EP64 -> TP4/EP64 on 128 H100s needs 74.5 GiB (72 usable)
    # when every byte is copied; with aliasing the smaller side may be shared, so the check
    # before any plan lets it through for the plan to count exactly.
    src, dst = ParallelGrid(128, tp=8, ep=64), ParallelGrid(128, tp=4, ep=64)
    with pytest.raises(RefitError) as exc:
        check_fits(KimiK2Config(), src, dst, preset("h100", 128), collocated=True)
    assert "need 74.5 GiB per GPU" in exc.value.reason and "(72 GiB usable" in exc.value.reason
    assert check_fits(KimiK2Config(), src, dst, preset("h100", 128), collocated=True,
                      alias=True) == pytest.approx((34.04, 36.51), abs=0.01)
    shared = r"\+ destination 36\.5 GiB .* - at most 36\.5 GiB aliased \(the smaller side\)"
    with pytest.raises(RefitError, match=shared):
        check_fits(KimiK2Config(), ParallelGrid(128, tp=8, ep=8), dst, preset("h100", 128),
                   collocated=True, alias=True)


def test_dry_run_cli_alias(capsys):
    import json
    args = ["--gpus", "8", "--src", "tp=4,ep=4", "--dst", "tp=2,ep=4", "--layers", "3"]
    assert main(args + ["--alias"]) == 0
    out = capsys.readouterr().out
    assert "(collocated, aliasing on)" in out
    line = r"aliased, counted once \(rank \d\) +[\d.]+ +[\d.]+ GiB over 8 ranks"
    assert re.search(line, out), out
    assert "(aliased bytes are not copied)" in out
    figures = {}
    for extra in ([], ["--alias"]):
        assert main(args + extra + ["--json"]) == 0
        figures[bool(extra)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    off, on = figures[False], figures[True]
    assert not off["alias"] and off["max_aliased_gib"] == 0 and on["alias"]
    assert on["max_gpu_gib"] < off["max_gpu_gib"] and on["max_local_gib"] < off["max_local_gib"]
    assert on["predicted_s"] < off["predicted_s"]
    assert main(args + ["--alias", "--per-rank"]) == 0
    assert "aliased" in capsys.readouterr().out.splitlines()[-9]


# Destination formats (issue 16): an FP8 inference model by Kimi K2's rule.

# A toy Kimi K2 whose every 2-D tensor and every TP shard up to TP 4 is whole 128 x 128 blocks.
ALIGNED = {"hidden": 256, "num_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 128,
           "qk_nope_head_dim": 128, "qk_rope_head_dim": 128, "v_head_dim": 128, "dense_ffn": 512,
           "moe_ffn": 128, "shared_expert_ffn": 512, "vocab": 512}


def _quantized_bf16_bytes(cfg, grid):
    """BF16 bytes of the destination's local tensors that Kimi K2's rule quantizes."""
    from refit_engine.harness.dry_run import buffer_tensors
    from refit_engine.harness.models.kimi_k2 import kimi_k2_tables
    from refit_engine.quantize import format_for
    from refit_engine.tables import BUFFER
    tables = kimi_k2_tables(cfg, grid)
    owner = buffer_tensors(tables)
    nbytes = tables.buffers[:, BUFFER["numel"]] * tables.buffers[:, BUFFER["itemsize"]]
    return sum(int(n) for n, t in zip(nbytes, owner)
               if format_for(tables.names[t]) == "fp8_block128")


@pytest.mark.parametrize("bucket", [64 << 20, 1 << 12])  # 4 KiB: buckets cut rows and blocks
def test_fp8_network_bytes_are_elements_plus_a_scale_per_block(bucket):
    # Non-collocated across two nodes: every destination byte crosses the network. In FP8 the
    # quantized tensors cross as 1 byte an element plus 4 per 128 x 128 block, exactly.
    cfg = KimiK2Config.toy(**ALIGNED)
    src, dst = ParallelGrid(8, tp=4, ep=4), ParallelGrid(8, tp=2, ep=8, offset=8)
    topo = preset("h100", 16)
    bf16, fp8 = (dry_run(cfg, src, dst, topo, bucket, dst_format=f) for f in ("bf16", "fp8"))
    q = _quantized_bf16_bytes(cfg, dst)
    elements = q // 2
    assert elements % (128 * 128) == 0
    net = {name: sum(f.received_inter for f in r["ranks"]) for name, r in (("bf16", bf16),
                                                                           ("fp8", fp8))}
    assert net["bf16"] == sum(f.dst_bytes for f in bf16["ranks"])
    assert net["fp8"] == net["bf16"] - q + elements + 4 * (elements // (128 * 128))
    assert net["fp8"] == sum(f.sent_inter for f in fp8["ranks"])
    assert net["fp8"] == sum(f.dst_bytes for f in fp8["ranks"])  # the destination model
    assert net["fp8"] < 0.6 * net["bf16"]
    # Unpacks write what crossed (already quantized); packs read the BF16 source.
    for a, b in zip(bf16["ranks"], fp8["ranks"]):
        assert b.unpack_write_bytes == b.received_inter
        assert b.pack_read_bytes == a.sent_inter
        assert b.staging_bytes == a.staging_bytes  # the plan's, sized for BF16 messages
    assert fp8["predicted"]["seconds"] < bf16["predicted"]["seconds"]


def test_fp8_ipc_reads_stay_bf16_and_the_destination_shrinks():
    # One node, transport auto: every peer over CUDA IPC, read as BF16 over NVLink and written
    # in FP8 by the receiver; local copies read BF16 and write FP8.
    cfg, topo = KimiK2Config.toy(**ALIGNED), preset("h100", 8)
    src, dst = ParallelGrid(8, tp=4, ep=4), ParallelGrid(8, tp=2, ep=8)
    bf16, fp8 = (dry_run(cfg, src, dst, topo, dst_format=f) for f in ("bf16", "fp8"))
    for a, b in zip(bf16["ranks"], fp8["ranks"]):
        assert _moved(a) == _moved(b) and b.received_ipc == b.received_intra > 0
        assert b.src_bytes == a.src_bytes and b.dst_bytes < 0.6 * a.dst_bytes
        assert b.total_bytes < a.total_bytes
        assert b.local_write_bytes < b.local_bytes == a.local_bytes == a.local_write_bytes
        assert b.ipc_write_bytes < b.received_ipc
        # Everything the rank writes is its destination model (nothing aliased).
        assert b.local_write_bytes + b.ipc_write_bytes + b.unpack_write_bytes == b.dst_bytes
    assert fp8["predicted"]["seconds"] <= bf16["predicted"]["seconds"]
    # Over NCCL on the same node the sender quantizes: the NVLink bytes shrink instead.
    nccl = dry_run(cfg, src, dst, topo, transport="nccl", dst_format="fp8")
    assert sum(f.received_intra for f in nccl["ranks"]) < 0.6 * sum(
        f.received_intra for f in bf16["ranks"])


@pytest.mark.parametrize("bucket", [64 << 20, 1 << 12])
def test_fp8_blocks_cut_by_shards_cross_as_bf16(bucket):
    # The default toy's shards cut 128 x 128 blocks (its dims are below 128): those tensors
    # cross the network as BF16, quantized by the receiver, and a rank still writes exactly its
    # destination model, each block's scale once however buckets cut it.
    from refit_engine.harness.dry_run import TensorFormats, plan_tables
    cfg, topo = KimiK2Config.toy(), preset("h100", 16)
    src, dst = ParallelGrid(8, tp=4, ep=4), ParallelGrid(8, tp=2, ep=8, offset=8)
    formats = plan_tables(cfg, src, dst, topo, bucket, dst_format="fp8")["formats"]
    assert isinstance(formats, TensorFormats)
    cut = formats.quantized & ~formats.wire_quantized
    assert cut.any() and formats.wire_quantized.any()
    assert all("linear_" in formats.dst.names[t] for t in cut.nonzero()[0])
    fp8 = dry_run(cfg, src, dst, topo, bucket, dst_format="fp8")
    for f in fp8["ranks"][8:]:
        assert f.unpack_write_bytes == f.dst_bytes < f.received_inter
    net = sum(f.received_inter for f in fp8["ranks"])
    assert net == sum(f.sent_inter for f in fp8["ranks"])
    assert sum(f.dst_bytes for f in fp8["ranks"]) < net < sum(
        f.received_inter for f in dry_run(cfg, src, dst, topo, bucket)["ranks"])


SEED_LAYOUTS = [  # the seed's five refits as the sweep lays them out on 128 H100s / H200s
    ((8, 64), (4, 128)), ((8, 64), (2, 128)), ((8, 128), (1, 128)), ((4, 64), (2, 128)),
    ((4, 128), (1, 128)), ((8, 32), (4, 128)), ((8, 32), (2, 128)), ((8, 32), (1, 128)),
    ((4, 32), (2, 128)), ((4, 32), (1, 128))]


def test_kimi_k2_shards_hold_whole_blocks_at_the_seeds_layouts():
    # Full width (two layers: one dense, one MoE): at TP 1, 2, 4 and 8 every shard of every
    # tensor the rule quantizes is whole 128 x 128 blocks on both sides (quantize.shard_cut), so
    # every piece sent over NCCL crosses in FP8.
    from refit_engine.harness.dry_run import TensorFormats
    from refit_engine.harness.models.kimi_k2 import kimi_k2_tables
    cfg = KimiK2Config(num_layers=2)
    tables = {}
    for s, d in SEED_LAYOUTS:
        for tp, ep in (s, d):
            if (tp, ep) not in tables:
                tables[tp, ep] = kimi_k2_tables(cfg, ParallelGrid(128, tp=tp, ep=ep))
        formats = TensorFormats(tables[s], tables[d], quantize_rules())
        # Routed experts, shared expert, dense MLP, attention of both layers.
        assert formats.quantized.sum() == 2 * 384 + 2 + 2 + 2 * 5
        assert (formats.wire_quantized == formats.quantized).all(), (s, d)


def quantize_rules():
    from refit_engine.harness.dry_run import DST_FORMATS
    return DST_FORMATS["fp8"]


def test_bf16_figures_are_unchanged():
    # The figures of the commit before destination formats (230c3fd), by the default format and
    # by --dst-format bf16.
    cfg = KimiK2Config.toy()
    for gpus, transport, predicted, sums, total in (
            (16, "auto", 5.0226417777777776e-05, [2002432, 779776, 1222656, 0, 1222656, 0], 236224),
            (8, "nccl", 6.0363180193885154e-05, [1001216, 389888, 611328, 0, 0, 2445312], 643776)):
        for extra in ({}, {"dst_format": "bf16"}):
            r = dry_run(cfg, ParallelGrid(gpus, tp=4, ep=4), ParallelGrid(gpus, tp=2, ep=8),
                        preset("h100", gpus), transport=transport, **extra)
            assert r["predicted"]["seconds"] == predicted
            assert r["floor"]["seconds"] == 2.2641777777777778e-07
            assert [sum(getattr(f, k) for f in r["ranks"]) for k in (
                "dst_bytes", "local_bytes", "sent_intra", "sent_inter", "received_ipc",
                "staging_bytes")] == sums
            assert max(f.total_bytes for f in r["ranks"]) == total
            assert all(f.local_written is f.unpack_written is f.pack_read is None
                       for f in r["ranks"])


def test_fp8_memory_check_and_aliasing():
    # The check before any plan counts the FP8 destination; quantized tensors never alias.
    src, dst = ParallelGrid(128, tp=8, ep=64), ParallelGrid(128, tp=4, ep=64)
    with pytest.raises(RefitError):
        check_fits(KimiK2Config(), src, dst, preset("h100", 128), collocated=True)
    s, d = check_fits(KimiK2Config(), src, dst, preset("h100", 128), collocated=True,
                      dst_format="fp8")
    assert s == pytest.approx(34.04, abs=0.01) and 18.0 < d < 0.55 * 36.51
    cfg, topo = KimiK2Config.toy(**ALIGNED), preset("h100", 8)
    same = ParallelGrid(8, tp=2, ep=4)
    bf16, fp8 = (dry_run(cfg, same, same, topo, alias=True, dst_format=f) for f in ("bf16", "fp8"))
    assert sum(f.aliased_bytes for f in bf16["ranks"]) == sum(f.dst_bytes for f in bf16["ranks"])
    kept = sum(f.aliased_bytes for f in fp8["ranks"])
    assert 0 < kept < sum(f.dst_bytes for f in fp8["ranks"])  # embeddings, norms, router only
    for f in fp8["ranks"]:
        assert f.local_write_bytes + f.aliased_bytes == f.dst_bytes


def test_dry_run_cli_dst_format(capsys):
    import json
    args = ["--gpus", "16", "--src", "tp=4,ep=4", "--dst", "tp=2,ep=8", "--layers", "3",
            "--non-collocated"]
    figures = {}
    for fmt in ("bf16", "fp8"):
        assert main(args + ["--dst-format", fmt, "--json"]) == 0
        figures[fmt] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    bf16, fp8 = figures["bf16"], figures["fp8"]
    assert bf16["dst_format"] == "bf16" and fp8["dst_format"] == "fp8"
    # The embedding and output layer stay BF16: above half.
    assert bf16["max_network_gib"] / 2 < fp8["max_network_gib"] < bf16["max_network_gib"]
    assert fp8["max_dst_gib"] == fp8["max_network_gib"] < bf16["max_dst_gib"]
    assert fp8["predicted_s"] < bf16["predicted_s"]
    assert main(args + ["--dst-format", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "destination format fp8 (Kimi K2's rule" in out
    assert main(args) == 0
    assert "destination format" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(args + ["--dst-format", "int4"])
    assert "argument --dst-format: invalid choice" in capsys.readouterr().err
