"""The sweep's memory check (no GPUs used)."""

from refit_engine.sweep import main


def test_memory_check_uses_the_layouts_the_sweep_runs(capsys):
    # One side's layout given, the other chosen: the check must use the given one.
    common = ["--check-only", "--backend", "nccl", "--gpus", "128", "--full-size", "--configs", "8:4"]
    assert main(common + ["--src-extra", "ep=64"]) == 0
    assert "TP8/EP64 -> TP4/EP128 (collocated): weights 34.0 + 21.7 GiB" in capsys.readouterr().out
    assert main(common + ["--src-extra", "ep=1"]) == 2  # all experts on every GPU
    assert "source 1894.5 GiB at TP8/PP1/EP1/ETP1" in capsys.readouterr().out
