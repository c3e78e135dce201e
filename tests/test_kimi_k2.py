"""Kimi K2 shapes and synthetic layouts."""

import numpy as np
import pytest

from refit_engine.harness.grid import ParallelGrid
from refit_engine.layouts import expand_placements
from refit_engine.harness.models.kimi_k2 import (KimiK2Config, kimi_k2_layout, kimi_k2_tables,
                                         parameter_count)


def test_published_size():
    n = parameter_count(KimiK2Config())
    assert 1.02e12 < n < 1.04e12  # 1.03e12 by this accounting (1.04T published)


@pytest.mark.parametrize("grid", [ParallelGrid(8, tp=4, ep=4), ParallelGrid(8, tp=2, pp=2, ep=2, etp=2),
                                  ParallelGrid(4, tp=1, ep=4, offset=4)])
def test_vectorized_tables_equal_layout_tables(grid):
    cfg = KimiK2Config.toy()
    layout = kimi_k2_layout(cfg, grid)
    names, tensors, buffers, pieces, holders = layout.tables()
    n2, t2, b2, p2, h2 = kimi_k2_tables(cfg, grid)
    assert names == n2 and np.array_equal(tensors, t2) and np.array_equal(buffers, b2)
    # The same placements (pieces may share runs of holders differently), and each replica
    # set one piece.
    def rows(placements):
        return sorted(map(tuple, placements.tolist()))
    assert rows(layout.placements()) == rows(expand_placements(p2, h2))
    assert len(p2) == len(pieces)
