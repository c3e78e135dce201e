"""Result files of the benchmarks: where they go, what they say about the run (date, commit,
host) and how they are named (`<name>_<date>_<commit>.json`)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def results_dir(script: str) -> Path:
    """Where raw results of the benchmark script `script` go: results/ beside it, or
    REFIT_RESULTS_DIR (e.g. for the benchmarks' smoke tests)."""
    return Path(os.environ.get("REFIT_RESULTS_DIR", Path(script).resolve().parent / "results"))


def git_commit(where: str | Path = ".") -> str:
    """The commit of the checkout holding `where`; REFIT_COMMIT when the tree travelled without
    .git (device runs)."""
    if os.environ.get("REFIT_COMMIT"):
        return os.environ["REFIT_COMMIT"]
    where = Path(where)
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=where if where.is_dir() else where.parent,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(where: str | Path = ".") -> dict:
    """Date, commit (of the checkout holding `where`), host, CPU, cores, Python."""
    return {"date": datetime.date.today().isoformat(), "commit": git_commit(where),
            "host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "python": platform.python_version()}


def device_name() -> str:
    """The current GPU's name, as torch gives it."""
    return torch.cuda.get_device_name()


def save_json(directory: Path, name: str, payload: dict) -> Path:
    """`payload` (with its "env" from `environment`) as directory/<name>_<date>_<commit>.json."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}_{payload['env']['date']}_{payload['env']['commit']}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path
