"""Helpers of the drop-in's multi-rank tests (test_megatron_cache, test_megatron_api): count
the plans the drop-in's cache builds, and poison a destination model so an unwritten element
shows."""

from __future__ import annotations

POISON = 0xA5  # every byte of a poisoned tensor


def count_plans():
    """Replaces refit_engine.plan in this process with a counting wrapper (the cache calls it
    whenever it plans). Returns (the original plan function, the list that grows by one per
    plan)."""
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning)
    import refit_engine
    original_plan = refit_engine.plan
    planned = []

    def counting_plan(*args, **kwargs):
        planned.append(1)
        return original_plan(*args, **kwargs)

    refit_engine.plan = counting_plan
    return original_plan, planned


def poison(model, byte: int = POISON):
    """Every parameter and buffer of the model chunks `model` (None: nothing) set to `byte`."""
    import torch
    for chunk in model or []:
        for t in list(chunk.parameters()) + list(chunk.buffers()):
            t.data.view(torch.uint8).fill_(byte)
