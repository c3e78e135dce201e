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
    assert predict([f], topo, {0: 10})["seconds"] == pytest.approx(p["seconds"])
    # One GPU playing every rank: three passes over remote bytes when staged.
    assert predict_loopback(0, 10**9, 2000.0, staged=True) == pytest.approx(3e-3)


def _measure_worker(rank, world):
    from refit_engine.topology import measure
    topo = measure(preset("cpu", world).__class__(1, world, name="cpu"), nbytes=1 << 20, repeats=2)
    return topo.copy_gbps, topo.intra_node_gbps, topo.inter_node_gbps


def test_measure_topology_is_collective_and_positive():
    from multiproc import run_world
    results = run_world(_measure_worker, 2)
    assert results[0] == results[1]
    copy, intra, inter = results[0]
    assert copy > 0 and intra > 0 and inter == 50.0  # one node: no cross-node pair to measure


def test_dry_run_cli_per_rank(capsys):
    assert main(["--gpus", "8", "--src", "tp=4,ep=4", "--dst", "tp=2,ep=8", "--layers", "3",
                 "--per-rank"]) == 0
    out = capsys.readouterr().out
    assert "floor:" in out and "predicted:" in out and out.count("\n") > 16
