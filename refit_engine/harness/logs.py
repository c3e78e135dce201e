"""The harness's progress lines: one `logging` logger, "refit_engine.harness", printing
"[refit-bench HH:MM:SS] message" on rank 0's standard output; other ranks stay quiet.
A per-configuration log file (the sweep's) is one more handler while that configuration runs."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

LOGGER = logging.getLogger("refit_engine.harness")
_FORMAT = logging.Formatter("[refit-bench %(asctime)s] %(message)s", datefmt="%H:%M:%S")


class _Stdout(logging.StreamHandler):
    """A handler on whatever sys.stdout is when a line is written (pytest swaps it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it
        pass


def configure(rank: int) -> logging.Logger:
    """The harness logger for this process: rank 0 prints progress lines, other ranks only
    warnings. Idempotent."""
    LOGGER.propagate = False
    if not any(isinstance(h, _Stdout) for h in LOGGER.handlers):
        handler = _Stdout()
        handler.setFormatter(_FORMAT)
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return LOGGER


@contextlib.contextmanager
def log_file(path: Path | None):
    """While active, progress lines also go to `path` (written anew); None: nothing."""
    if path is None:
        yield
        return
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(_FORMAT)
    LOGGER.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
        handler.close()
