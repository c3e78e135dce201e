"""GPU tests are marked gpu / gpu_2 / gpu_8 and skipped when the machine has fewer GPUs."""

import pytest


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config, items):
    gpus = _gpu_count()
    need = {"gpu": 1, "gpu_2": 2, "gpu_8": 8}
    for item in items:
        for mark, count in need.items():
            if mark in item.keywords and gpus < count:
                item.add_marker(pytest.mark.skip(reason=f"needs {count} GPU(s), found {gpus}"))
