"""What a GPU test module needs to run here: a CUDA device and a CUDA build of refit_engine.

    pytestmark = gpu_check.MARKS   # skipped, with the reason, where either is missing
"""

from __future__ import annotations

import pytest
import torch

from refit_engine import _core


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if not _core.HAS_CUDA:
        return "refit_engine was built without CUDA (refit_engine._core.HAS_CUDA is False)"
    return None


MARKS = [pytest.mark.gpu, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]
