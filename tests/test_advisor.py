"""The layout advisor (harness/advisor.py) and the sweep's EP choice that uses it."""

import json
from dataclasses import replace

import pytest

from refit_engine import RefitError
from refit_engine.harness.advisor import Candidate, advise, best_expert_parallel, main, report
from refit_engine.harness.dry_run import GIB, dry_run
from refit_engine.harness.grid import ParallelGrid
from refit_engine.harness.models.kimi_k2 import KimiK2Config
from refit_engine.harness.topology import preset

TOY = KimiK2Config.toy()  # 8 experts, expert FFN 32
SRC = ParallelGrid(8, tp=4, ep=4)


def test_every_layout_is_tried_and_those_that_fit_come_fastest_first():
    advice = advise(TOY, SRC, [2, 1], preset("h100", 8))
    fits, refused = advice["fits"], advice["refused"]
    tried = {(c.tp, c.ep, c.etp, c.pp, c.alias) for c in fits + refused}
    # EP over the divisors of 8 experts and 8 GPUs, ETP 1 and TP (TP1: ETP1 only), both ways.
    expected = {(tp, ep, etp, 1, a) for tp in (2, 1) for ep in (1, 2, 4, 8)
                for etp in ({1, tp}) for a in (False, True) if ep * etp <= 8}
    assert tried == expected and not advice["not_tried"]
    times = [c.predicted_s for c in fits]
    assert times == sorted(times) and advice["best"] is fits[0]
    for c in fits:
        assert c.fits and c.reason is None and c.floor_s <= c.predicted_s
        assert c.memory_gib > 0 and c.local_gib >= 0 and c.nvlink_gib >= 0
        assert c.network_gib == 0  # one node
        assert (c.aliased_gib > 0) == c.alias
    # The fastest copies least: same EP and expert TP as the training layout, aliased.
    assert (fits[0].tp, fits[0].ep, fits[0].etp, fits[0].alias) == (2, 4, 1, True)


def test_each_candidate_has_the_dry_runs_figures():
    advice = advise(TOY, SRC, [2], preset("h100", 8))
    for c in advice["fits"][:3]:
        result = dry_run(TOY, SRC, ParallelGrid(8, tp=c.tp, ep=c.ep, etp=c.etp),
                         preset("h100", 8), alias=c.alias)
        assert c.predicted_s == result["predicted"]["seconds"]
        assert c.memory_gib == max(f.total_bytes for f in result["ranks"]) / GIB


def _tight_topology():
    """H100 nodes with just enough memory for TP4/EP4 -> TP2/EP4 with aliasing, not without."""
    on = dry_run(TOY, SRC, ParallelGrid(8, tp=2, ep=4), preset("h100", 8), alias=True)
    need_on = max(f.total_bytes for f in on["ranks"])
    need_off = max(f.total_bytes + f.aliased_bytes for f in on["ranks"])
    return replace(preset("h100", 8), memory_gib=(need_on + need_off) / 2 / GIB / 0.9)


def test_refusals_say_why():
    advice = advise(TOY, SRC, [2], _tight_topology())
    by_key = {(c.ep, c.etp, c.alias): c for c in advice["fits"] + advice["refused"]}
    assert by_key[(4, 1, True)].fits and not by_key[(4, 1, False)].fits
    assert advice["best"] is by_key[(4, 1, True)]
    for c in advice["refused"]:
        assert not c.fits and c.reason and c.memory_gib > advice["usable_gib"] * 0.999
        assert c.reason.startswith(("memory check: source", "does not fit: rank")), c.reason
    assert "memory check: source" in by_key[(4, 1, False)].reason
    # EPs at which the inference model alone cannot fit are not planned, and say so.
    assert any("not tried, the inference model alone needs" in line and "EP 1" in line
               for line in advice["not_tried"])
    text = report(advice)
    assert text.index("fit, fastest first") < text.index("do not fit:")
    assert "not tried" in text.split("do not fit:")[1]


def test_aliasing_only_for_collocated_refits():
    advice = advise(TOY, SRC, [2], preset("h100", 16), collocated=False)
    assert advice["fits"] and not any(c.alias for c in advice["fits"] + advice["refused"])
    with pytest.raises(ValueError, match="collocated"):
        advise(TOY, SRC, [2], preset("h100", 16), collocated=False, aliases=(True,))


def test_a_training_layout_that_cannot_be_built_is_refused_once(capsys):
    with pytest.raises(RefitError, match="source layout tp=8.*4 attention heads"):
        advise(TOY, ParallelGrid(8, tp=8), [4], preset("h100", 8))
    assert main(["--advise", "--src", "tp=8", "--dst-tp", "4", "--gpus", "8", "--layers", "3",
                 "--model", "num_heads=4"]) == 2
    assert "refused: source layout tp=8" in capsys.readouterr().err


def test_cli_table_and_json(capsys):
    args = ["--advise", "--src", "tp=4,ep=4", "--dst-tp", "2,1", "--gpus", "8", "--layers", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "inference layouts beside training TP4/EP4/ETP1/PP1 on H100 SXM, 8 GPUs" in out
    assert "  1  TP2/EP4/ETP1/PP1        on" in out
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["best"] == data["fits"][0] and data["best"]["layout"] == "TP2/EP4/ETP1/PP1"
    times = [c["predicted_s"] for c in data["fits"]]
    assert times == sorted(times)
    assert all(c["reason"] for c in data["refused"])
    assert main(args + ["--alias", "--json"]) == 0  # aliasing on only
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(c["alias"] for c in data["fits"] + data["refused"])
    for argv, message in ((["--dst-tp", "2"], "--dst-tp and --pp go with --advise"),
                          (["--advise"], "--advise needs --dst-tp"),
                          (["--advise", "--dst-tp", "0"], "positive integers"),
                          (["--advise", "--dst-tp", "2", "--non-collocated", "--alias"],
                           "needs a collocated refit")):
        with pytest.raises(SystemExit) as exc:
            main(["--gpus", "8", "--layers", "3"] + argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv


def test_the_dry_run_is_still_the_default(capsys):
    assert main(["--gpus", "8", "--src", "tp=4,ep=4", "--dst", "tp=2,ep=8", "--layers", "3"]) == 0
    assert "predicted:" in capsys.readouterr().out


def test_the_sweep_takes_the_advisors_fastest_destination_ep(monkeypatch):
    from refit_engine.harness.sweep import choose_expert_parallel
    cfg = KimiK2Config(num_layers=3)  # full width, 384 experts
    src_ep, dst_ep = choose_expert_parallel(cfg, 8, 4, 2, True, "h100")
    best = best_expert_parallel(cfg, ParallelGrid(8, tp=4, ep=src_ep), 2, preset("h100", 8))
    assert dst_ep == best.ep and (best.etp, best.pp, best.alias) == (1, 1, False)
    # Not the first that fits (the largest EP, as before): the same EP as training is faster.
    assert (src_ep, dst_ep) == (2, 2)
    # Where nothing fits, the largest EP, for the memory check to say why (as before).
    from refit_engine.harness import sweep
    monkeypatch.setattr(sweep, "best_expert_parallel", lambda *a, **k: None)
    assert sweep.choose_destination_ep(cfg, 8, ParallelGrid(8, tp=4, ep=1), 2, True, "h100") == 8


def test_the_sweep_asks_the_advisor_only_for_what_is_not_given(monkeypatch):
    import argparse

    from refit_engine.harness import sweep
    asked = []

    def fake(cfg, src, dst_tp, topo, collocated=True, **kw):
        asked.append((src.tp, src.ep, src.etp, dst_tp))
        return Candidate(dst_tp, 2, 1, 1, False, fits=True)
    monkeypatch.setattr(sweep, "best_expert_parallel", fake)
    c = {"src_tp": 4, "dst_tp": 2, "mode": "collocated"}
    args = argparse.Namespace(src_extra="", dst_extra="", gpu="h100")
    assert sweep.layout_extras(TOY, c, args, 8) == ("ep=1", "ep=2")
    args.src_extra = "ep=4,etp=2"  # the given training layout is the advisor's
    assert sweep.layout_extras(TOY, c, args, 8) == ("ep=4,etp=2", "ep=2")
    assert asked == [(4, 1, 1, 2), (4, 4, 2, 2)]
    args.dst_extra = "ep=8"  # given: no advisor
    assert sweep.layout_extras(TOY, c, args, 8) == ("ep=4,etp=2", "ep=8")
    assert len(asked) == 2


def test_a_refusal_by_the_memory_check_shows_the_plans_own_figure():
    # The copy is refused by the memory check, before any plan; the plan built for the aliased
    # variant says what the copy itself would need (on 128 H100s the check's 4 GiB staging
    # allowance refuses TP8/EP64 -> TP4/EP64 while the plan stages nothing: every peer IPC).
    advice = advise(TOY, SRC, [2], _tight_topology())
    off = next(c for c in advice["refused"] if (c.ep, c.etp, c.alias) == (4, 1, False))
    on = next(c for c in advice["fits"] if (c.ep, c.etp, c.alias) == (4, 1, True))
    assert off.plan_gib == pytest.approx(on.memory_gib + on.aliased_gib)
    assert f"(the plan itself: {off.plan_gib:.1f} GiB, staging 0.0)" in off.reason
