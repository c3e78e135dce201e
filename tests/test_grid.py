"""megatron-core's rank order as plain arithmetic."""

import pytest

from refit_engine import RefitError
from refit_engine.harness.grid import ParallelGrid


@pytest.mark.parametrize("layers,pp", [(4, 2), (5, 2), (7, 3), (61, 4), (3, 3)])
def test_stage_of_layer_inverts_stage_layers(layers, pp):
    grid = ParallelGrid(pp * 2, pp=pp)
    seen = []
    for stage in range(pp):
        for layer in grid.stage_layers(layers, stage):
            assert grid.stage_of_layer(layers, layer) == stage
            seen.append(layer)
    assert seen == list(range(layers))


def test_holders_follow_megatron_order():
    grid = ParallelGrid(8, tp=2, pp=2, ep=2, offset=8)
    assert grid.dense_holders(1) == [(12, 0), (13, 1), (14, 0), (15, 1)]
    # Expert grid: etp fastest, then ep, then expert-dp; experts 0-1 on ep rank 0.
    assert grid.expert_holders(1, 4, stage=0) == [(8, 0, 1), (10, 0, 1)]
    assert grid.expert_holders(2, 4, stage=0) == [(9, 0, 0), (11, 0, 0)]


def test_sizes_that_do_not_divide():
    with pytest.raises(RefitError, match="not divisible by tp"):
        ParallelGrid(6, tp=4)
    with pytest.raises(RefitError, match="do not divide over ep"):
        ParallelGrid(4, ep=4).expert_holders(0, 6)
