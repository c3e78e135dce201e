"""The CPU benchmark scripts still run (tiny sizes; results go to a temporary directory)."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_script(name, args, tmp_path):
    env = dict(os.environ, REFIT_RESULTS_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, str(BENCH / name), *args], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(tmp_path.glob("*.json")), "no raw results written"
    return json.loads(out.stdout.strip().splitlines()[-1])  # the last line: one JSON object


def test_scale_benchmark(tmp_path):
    figures = run_script("scale.py", ["--gpus", "128", "--repeats", "1"], tmp_path)
    row = figures["128"]
    assert row["rank_s"] > 0 and row["cluster_s"] > 0
    assert 1.0 <= row["busiest_over_lower_bound"] <= 1.05
    assert row["busiest_link_aware_gib"] <= row["busiest_round_robin_gib"]


def test_plan_compile_benchmark(tmp_path):
    figures = run_script("plan_compile.py", ["--configs", "8:4", "--repeats", "1", "--no-megatron"],
                         tmp_path)
    assert figures["ours_rank_s"] > 0 and figures["config"] == "TP8/EP64 -> TP4/EP128"
