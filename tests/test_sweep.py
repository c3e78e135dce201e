"""The sweep's memory check (no GPUs used)."""

from refit_engine.harness.sweep import main


def test_memory_check_uses_the_layouts_the_sweep_runs(capsys):
    # One side's layout given, the other chosen: the check must use the given one.
    common = ["--check-only", "--backend", "nccl", "--gpus", "128", "--full-size", "--configs", "8:4"]
    assert main(common + ["--src-extra", "ep=64"]) == 0
    assert "TP8/EP64 -> TP4/EP128 (collocated): weights 34.0 + 21.7 GiB" in capsys.readouterr().out
    assert main(common + ["--src-extra", "ep=1"]) == 2  # all experts on every GPU
    assert "source 1894.5 GiB at TP8/PP1/EP1/ETP1" in capsys.readouterr().out


def test_sweep_spawns_its_ranks_and_writes_its_outputs(tmp_path):
    # Without a launcher the sweep spawns gloo ranks itself; rank 0 writes the summary, JSON and
    # plot, and every rank leaves together.
    import json
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-m", "refit_engine.harness.sweep", "--backend", "gloo", "--world", "2",
         "--configs", "2:1:collocated:gloo", "--model", "num_layers=2", "--iters", "2",
         "--warmup", "1", "--output-dir", str(tmp_path), "--run-id", "t"],
        cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    logs = tmp_path / "logs"
    summary = (logs / "t_summary.txt").read_text()
    assert "Config: TP 2 -> TP 1 (collocated, gloo)" in summary and "Bit-exact: True" in summary
    assert json.loads((logs / "t_results.json").read_text())["results"][0]["exact"] is True
    assert (logs / "t_refit_times.png").read_bytes()[:4] == b"\x89PNG"


def test_a_tp_that_does_not_divide_the_ranks_is_refused_with_that_reason():
    import argparse

    import pytest

    from refit_engine import RefitError
    from refit_engine.harness.models.kimi_k2 import KimiK2Config
    from refit_engine.harness.sweep import layout_extras
    args = argparse.Namespace(src_extra="", dst_extra="", gpu="cpu")
    with pytest.raises(RefitError) as exc:  # not "no expert-parallel size lets it fit"
        layout_extras(KimiK2Config.toy(), {"src_tp": 3, "dst_tp": 1, "mode": "collocated"}, args, 4)
    assert exc.value.reason == "source TP 3 does not divide 4 ranks"
    with pytest.raises(RefitError, match="destination TP 4 does not divide 2 ranks "
                                         r"\(half of the world, non-collocated\)"):
        layout_extras(KimiK2Config.toy(), {"src_tp": 2, "dst_tp": 4, "mode": "non-collocated"},
                      args, 4)


def test_a_sweep_where_every_configuration_failed_draws_no_plot(tmp_path, capsys):
    import argparse

    from refit_engine.harness.sweep import write_outputs
    from refit_engine.harness.topology import preset
    failed = {"config": {"src": {"tp": 3}, "dst": {"tp": 1}, "mode": "collocated",
                         "method": "gloo", "world": 4}, "error": "source TP 3 does not divide 4 ranks"}
    args = argparse.Namespace(run_id="t", backend="gloo")
    assert write_outputs(args, [failed], tmp_path, "1", 4, preset("cpu", 4)) == 2
    assert not (tmp_path / "t_refit_times.png").exists()
    out = capsys.readouterr().out
    assert "no configuration ran: no plot" in out and "Failed: source TP 3 does not divide" in out


def test_check_only_checks_the_full_size_model_unless_told_otherwise(capsys, monkeypatch):
    monkeypatch.delenv("FULL_SIZE", raising=False)
    common = ["--check-only", "--backend", "nccl", "--gpus", "128", "--configs", "8:4",
              "--src-extra", "ep=1"]
    assert main(common) == 2  # full size: all 384 experts on every GPU do not fit
    out = capsys.readouterr().out
    assert "memory check: Kimi K2 at full size (61 layers, hidden 7168, 384 experts) on " \
           "H100 SXM, 128 GPUs on 16 nodes of 8, 80 GiB each" in out
    assert "source 1894.5 GiB at TP8/PP1/EP1/ETP1" in out
    assert main(common + ["--no-full-size"]) == 0  # said so: the toy model, and it says so
    assert "memory check: Kimi K2 at toy size" in capsys.readouterr().out
    monkeypatch.setenv("FULL_SIZE", "0")  # the Slurm script's knob: what the sweep will run
    assert main(common) == 0


def test_every_option_has_help():
    import argparse

    from refit_engine.harness.sweep import build_parser
    missing = [a.option_strings for a in build_parser()._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, f"options without help: {missing}"


def test_bad_configurations_and_counts_are_refused_in_one_line(capsys):
    import pytest
    for argv, message in ((["--configs", "3:x"], "--configs: bad configuration '3:x'"),
                          (["--configs", "8:4:sideways"], "bad mode 'sideways'"),
                          (["--configs", "8:4:collocated:mpi"], "bad method 'mpi'"),
                          (["--iters", "0"], "argument --iters: must be at least 1, not 0"),
                          (["--world", "-1"], "argument --world: must be at least 1, not -1"),
                          (["--gpu", "a100"], "argument --gpu: invalid choice")):
        with pytest.raises(SystemExit) as exc:
            main(["--check-only"] + argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "Traceback" not in err, argv


class _Spawned(Exception):
    pass


def _sweep_spawning(monkeypatch, gpus, argv):
    """sweep.main with `gpus` GPUs visible and no launcher, stopped where it would spawn."""
    from refit_engine.harness import launch, spawn
    seen = {}

    def run_ranks(fn, world, args, env=None, **kwargs):
        seen.update(world=world, backend=args.backend, env=env)
        raise _Spawned

    monkeypatch.setattr(launch, "_gpu_count", lambda: gpus)
    monkeypatch.setattr(spawn, "run_ranks", run_ranks)
    for name in ("RANK", "SLURM_PROCID", "BACKEND", "CONFIGS"):
        monkeypatch.delenv(name, raising=False)
    import pytest
    with pytest.raises(_Spawned):
        main(list(argv))
    return seen


def test_sweep_without_a_launcher_decides_its_backend_as_the_main_job(monkeypatch, capsys):
    # The default was nccl whatever the machine: on a CPU host every child failed inside.
    seen = _sweep_spawning(monkeypatch, 0, ["--world", "4", "--configs", "2:1"])
    assert seen == {"world": 4, "backend": "gloo", "env": {"CUDA_VISIBLE_DEVICES": ""}}
    assert "[sweep] spawning 4 gloo processes, every tensor on CPU: no GPU visible" in \
        capsys.readouterr().out
    seen = _sweep_spawning(monkeypatch, 1, ["--world", "4", "--configs", "2:1"])
    assert seen["backend"] == "gloo" and "4 ranks but 1 GPU" in capsys.readouterr().out
    seen = _sweep_spawning(monkeypatch, 8, ["--world", "4", "--configs", "2:1"])
    assert seen == {"world": 4, "backend": "nccl", "env": None}
    assert "one GPU each: 8 GPUs for 4 ranks" in capsys.readouterr().out


def test_sweep_refuses_nccl_without_a_gpu_per_rank_before_spawning(monkeypatch, capsys):
    import pytest

    from refit_engine.harness import launch, spawn

    def run_ranks(*a, **k):
        raise AssertionError("spawned")
    monkeypatch.setattr(spawn, "run_ranks", run_ranks)
    monkeypatch.setattr(launch, "_gpu_count", lambda: 1)
    for name in ("RANK", "SLURM_PROCID", "BACKEND", "CONFIGS"):
        monkeypatch.delenv(name, raising=False)
    for argv, message in (
            (["--backend", "nccl", "--world", "4", "--configs", "2:1"],
             "--backend nccl needs one GPU per rank: 4 ranks on this node but 1 GPU(s) visible"),
            (["--world", "4", "--configs", "2:1:collocated:nccl"],  # auto chose gloo here
             "--configs: TP2 -> TP1 asks for nccl but the sweep runs gloo")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and err.count("error:") == 1, err
        assert "Traceback" not in err
