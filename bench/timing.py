"""Shared benchmark helpers: host-clock timing with medians, result files, environment facts."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

# Where raw results go (REFIT_RESULTS_DIR overrides, e.g. for the benchmarks' smoke tests).
RESULTS_DIR = Path(os.environ.get("REFIT_RESULTS_DIR", Path(__file__).resolve().parent / "results"))


def time_host(fn, repeats: int = 5, warmup: int = 1) -> dict:
    """Runs fn() `warmup` times untimed, then `repeats` times; seconds as median/min/max."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": samples}


def git_commit() -> str:
    """The checkout's commit; REFIT_COMMIT when the tree travelled without .git (device runs)."""
    if os.environ.get("REFIT_COMMIT"):
        return os.environ["REFIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    return {"date": datetime.date.today().isoformat(), "commit": git_commit(),
            "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version()}


def save_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}_{payload['env']['date']}_{payload['env']['commit']}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path
