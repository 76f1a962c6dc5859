"""Full, Random and RandomPB: budgets, determinism, whole batches."""

from __future__ import annotations

import pytest
import torch

from subsetsel.errors import UnknownNameError
from subsetsel.selection.base import (
    Selection,
    SelectionContext,
    budget,
    create_strategy,
    fixed_partition,
    strategy_names,
)


class _Data:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def _ctx(n: int, round_index: int = 0, batch_size: int = 32) -> SelectionContext:
    return SelectionContext(
        model=torch.nn.Linear(1, 1), dataset=_Data(n), epoch=round_index * 5,  # type: ignore[arg-type]
        round_index=round_index, batch_size=batch_size, seed=0, device=torch.device("cpu"),
    )


def test_registry_lists_builtin_strategies():
    assert {"full", "random", "randompb"} <= set(strategy_names())


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid: .*random"):
        create_strategy("nope")


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fraction_out_of_range_rejected(fraction):
    with pytest.raises(ValueError, match="fraction"):
        create_strategy("random", fraction=fraction)


def test_budget_rounding():
    assert budget(0.1, 1000) == 100
    assert budget(0.001, 10) == 1
    assert budget(1.0, 7) == 7


def test_full_selects_everything_with_unit_weights():
    sel = create_strategy("full").select(_ctx(50))
    assert torch.equal(sel.indices, torch.arange(50))
    assert torch.equal(sel.weights, torch.ones(50))


def test_random_budget_unique_and_deterministic():
    strategy = create_strategy("random", fraction=0.1, seed=3)
    a, b = strategy.select(_ctx(1000, 2)), strategy.select(_ctx(1000, 2))
    assert len(a) == 100 and a.indices.unique().numel() == 100
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, strategy.select(_ctx(1000, 3)).indices)
    other_seed = create_strategy("random", fraction=0.1, seed=4).select(_ctx(1000, 2))
    assert not torch.equal(a.indices, other_seed.indices)


def test_randompb_picks_whole_batches_of_a_fixed_partition():
    n, bs = 1000, 32
    strategy = create_strategy("randompb", fraction=0.1, seed=1)
    partition = fixed_partition(n, bs, seed=1)
    for round_index in range(3):
        sel = strategy.select(_ctx(n, round_index, bs))
        assert sel.batch_ids is not None and sel.batch_ids.numel() == 4  # ceil(100 / 32)
        expected = torch.cat([partition[b] for b in sel.batch_ids.tolist()])
        assert torch.equal(sel.indices, expected)
        assert sel.indices.unique().numel() == len(sel)
    rounds = [strategy.select(_ctx(n, r, bs)).batch_ids for r in range(5)]
    assert len({tuple(r.tolist()) for r in rounds}) > 1  # re-drawn each round


def test_fixed_partition_covers_every_index_once():
    parts = fixed_partition(103, 10, seed=0)
    assert len(parts) == 11 and parts[-1].numel() == 3
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(103))


def test_selection_validates_lengths():
    with pytest.raises(ValueError, match="indices but"):
        Selection(torch.arange(3), torch.ones(2))
