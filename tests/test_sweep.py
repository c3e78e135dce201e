"""The sweep's memory check (no GPUs used)."""

from refit_engine.sweep import main


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
        [sys.executable, "-m", "refit_engine.sweep", "--backend", "gloo", "--world", "2",
         "--configs", "2:1:collocated:gloo", "--model", "num_layers=2", "--iters", "2",
         "--warmup", "1", "--output-dir", str(tmp_path), "--run-id", "t"],
        cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    logs = tmp_path / "logs"
    summary = (logs / "t_summary.txt").read_text()
    assert "Config: TP 2 -> TP 1 (collocated, gloo)" in summary and "Bit-exact: True" in summary
    assert json.loads((logs / "t_results.json").read_text())["results"][0]["exact"] is True
    assert (logs / "t_refit_times.png").read_bytes()[:4] == b"\x89PNG"
