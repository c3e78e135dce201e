"""`sbatch slurm/kimi_k2.sh` on a real one-node Slurm cluster started here (CPU, gloo, toy).

Needs root (installs slurm-wlm and munge with apt-get if missing, starts munged, slurmctld and
slurmd on private ports). Skipped elsewhere, or with REFIT_ENGINE_SLURM_TEST=0.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["2:1:collocated:gloo", "4:2:collocated:gloo", "2:2:non-collocated:gloo"]

pytestmark = pytest.mark.skipif(
    os.environ.get("REFIT_ENGINE_SLURM_TEST", "1") == "0" or os.geteuid() != 0
    or not shutil.which("apt-get"),
    reason="needs root and apt-get (or REFIT_ENGINE_SLURM_TEST=0)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    cluster = REPO / "tests" / "slurm" / "cluster.sh"
    try:
        out = subprocess.run(["bash", str(cluster), "start", str(state)], capture_output=True,
                             text=True, timeout=900)
        if out.returncode:
            pytest.fail(f"could not start Slurm:\n{out.stdout}\n{out.stderr}")
        conf = re.search(r"SLURM_CONF=(\S+)", out.stdout).group(1)
        yield {**os.environ, "SLURM_CONF": conf}
    finally:  # also after a failed start: no daemons left holding the ports
        subprocess.run(["bash", str(cluster), "stop", str(state)], timeout=60)


def test_sbatch_sweep_on_real_slurm(slurm, tmp_path):
    env = dict(slurm, BACKEND="gloo", GPU_KIND="cpu", FULL_SIZE="0", NUM_LAYERS="3",
               NUM_ITERATIONS="3", NUM_WARMUP="1", CONFIGS=" ".join(CONFIGS),
               OUTPUT_DIR=str(tmp_path / "results"), PYTHON=sys.executable)
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=0",
         str(REPO / "slurm" / "kimi_k2.sh")], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                               text=True).stdout
        if not queue.strip():
            break
        time.sleep(2)
    else:
        subprocess.run(["scancel", job], env=env)
        pytest.fail(f"job {job} did not finish in 900 s")
    log = (tmp_path / f"kimi_k2_refit_{job}.out").read_text()
    logs = tmp_path / "results" / "logs"
    summary = (logs / f"{job}_summary.txt").read_text()
    assert f"Job ID: {job}" in summary and "Total GPUs: 0 (4 CPU ranks, gloo)" in summary, log
    for config in CONFIGS:
        src, dst, mode, method = config.split(":")
        assert f"Config: TP {src} -> TP {dst} ({mode}, {method})" in summary, summary
        assert (logs / f"{job}_tp{src}_to_tp{dst}_{mode}_{method}.log").stat().st_size > 0
    assert summary.count("Mean refit time:") == len(CONFIGS), summary
    assert summary.count("Bit-exact: True") == len(CONFIGS), summary
    figures = json.loads((logs / f"{job}_results.json").read_text())
    for result in figures["results"]:
        assert result["floor_ms"] > 0 and len(result["per_rank"]) == 4
    assert (logs / f"{job}_refit_times.png").read_bytes()[:4] == b"\x89PNG"
