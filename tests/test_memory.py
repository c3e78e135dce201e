"""Memory planner, dry run, topology and cost model."""

import pytest

from refit_engine import RefitError
from refit_engine.cost import predict, predict_loopback, predict_rank
from refit_engine.grid import ParallelGrid
from refit_engine.memory import RankFigures, check_fits, dry_run, floor, main
from refit_engine.models.kimi_k2 import KimiK2Config
from refit_engine.topology import preset


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

    from refit_engine.topology import measure
    base = replace(preset("cpu"), nodes=world // per_node, gpus_per_node=per_node,
                   intra_node_gbps=-1.0, inter_node_gbps=-1.0, latency_us=-1.0)
    topo = measure(base, nbytes=1 << 20, repeats=2)
    return topo.copy_gbps, topo.intra_node_gbps, topo.inter_node_gbps, topo.latency_us, topo.check_us


@pytest.mark.parametrize("world, per_node", [(2, 2), (3, 3), (4, 2)])
def test_measure_topology_is_collective_and_positive(world, per_node):
    from multiproc import run_world
    results = run_world(_measure_worker, world, per_node)
    assert all(r == results[0] for r in results)  # every rank returns the slowest rank's figures
    copy, intra, inter, latency, check = results[0]
    assert copy > 0 and intra > 0 and latency > 0 and check > 0
    # One node has no cross-node pair: the base figure stays; two nodes measure it.
    assert inter == -1.0 if world == per_node else inter > 0


def test_stages_add_up_where_they_share_cores():
    from dataclasses import replace

    from refit_engine.cost import predict_rank
    from refit_engine.memory import RankFigures
    f = RankFigures(0, local_bytes=10**9, sent_intra=10**9, received_intra=10**9)
    gpu = replace(preset("h100"), copy_gbps=1000.0, intra_node_gbps=100.0, latency_us=0.0)
    pipelined = predict_rank(f, gpu, buckets=1)
    shared = predict_rank(f, replace(gpu, overlap=False), buckets=1)
    stages = pipelined["pack"] + pipelined["transfer"] + pipelined["unpack + local"]
    assert shared["seconds"] == pytest.approx(stages)
    assert pipelined["seconds"] < shared["seconds"]


def test_dry_run_cli_per_rank(capsys):
    assert main(["--gpus", "8", "--src", "tp=4,ep=4", "--dst", "tp=2,ep=8", "--layers", "3",
                 "--per-rank"]) == 0
    out = capsys.readouterr().out
    assert "floor:" in out and "predicted:" in out and out.count("\n") > 16
