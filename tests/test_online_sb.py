"""Selective-Backprop: percentile and probability math, loss history, keep variant, candidate
batches with a step count known in advance, and the stale cache keyed by dataset index."""

from __future__ import annotations

import pytest
import torch
from policy_harness import FakeEngine, IndexReader, loss_of

from subsetsel.data.base import Batch
from subsetsel.online.base import create_policy
from subsetsel.online.selective_backprop import (
    LossHistory,
    SelectiveBackprop,
    candidate_size,
    expected_share,
    keep_active,
    keep_probabilities,
    keep_rows,
    percentiles,
    selection_probabilities,
)


def make_batch(indices: list[int] | torch.Tensor) -> Batch:
    idx = torch.as_tensor(indices, dtype=torch.int64)
    return Batch(idx, idx.float().unsqueeze(1), torch.zeros_like(idx), torch.ones(idx.numel()))


def reader(order: list[int] | torch.Tensor) -> IndexReader:
    return IndexReader(torch.as_tensor(order, dtype=torch.int64))


# ---- percentiles and probabilities -----------------------------------------------------------
def test_percentile_is_fraction_strictly_below():
    history = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = percentiles(torch.tensor([0.5, 2.0, 2.5, 5.0, 4.0]), history)
    assert got.tolist() == [0.0, 0.25, 0.5, 1.0, 0.75]
    ties = percentiles(torch.tensor([1.0, 1.5, 2.0]), torch.tensor([1.0, 1.0, 2.0]))
    assert torch.allclose(ties, torch.tensor([0.0, 2 / 3, 2 / 3]))
    assert percentiles(torch.tensor([3.0]), torch.tensor([])).tolist() == [0.0]


def test_selection_probability_is_percentile_power_beta_with_floor():
    history = torch.tensor([1.0, 2.0, 3.0, 4.0])
    losses = torch.tensor([0.5, 2.5, 3.5, 9.0])  # percentiles 0, 0.5, 0.75, 1
    p = selection_probabilities(losses, history, beta=3.0)
    assert torch.allclose(p, torch.tensor([0.0, 0.125, 0.421875, 1.0]))
    p = selection_probabilities(losses, history, beta=2.0, floor=0.3)
    assert torch.allclose(p, torch.tensor([0.3, 0.3, 0.5625, 1.0]))
    assert torch.allclose(selection_probabilities(losses, history, beta=0.0), torch.ones(4))


def test_expected_selected_share_is_one_over_beta_plus_one():
    g = torch.Generator().manual_seed(0)
    history = torch.rand(1024, generator=g)
    p = selection_probabilities(torch.rand(20000, generator=g), history, beta=3.0)
    assert abs(float(p.mean()) - 0.25) < 0.01


def test_loss_history_keeps_the_most_recent():
    h = LossHistory(3)
    h.push(torch.tensor([1.0, 2.0]))
    assert sorted(h.values().tolist()) == [1.0, 2.0]
    h.push(torch.tensor([3.0, 4.0]))
    assert sorted(h.values().tolist()) == [2.0, 3.0, 4.0]
    h.push(torch.tensor([5.0, 6.0, 7.0, 8.0]))
    assert sorted(h.values().tolist()) == [6.0, 7.0, 8.0]
    h.push(torch.tensor([9.0]))
    assert sorted(h.values().tolist()) == [7.0, 8.0, 9.0]
    copy = LossHistory(3)
    copy.load_state_dict(h.state_dict())
    assert sorted(copy.values().tolist()) == [7.0, 8.0, 9.0]


# ---- keep variant ----------------------------------------------------------------------------
def test_keep_probabilities_by_rank():
    assert torch.allclose(keep_probabilities(4, 0.5), torch.tensor([1.0, 3.0, 5.0, 7.0]) / 16)
    assert torch.allclose(keep_probabilities(5, 1.0), torch.full((5,), 0.2))
    p = keep_probabilities(4, 0.25)  # weights ((r + .5) / 4)^3
    assert torch.allclose(p, torch.tensor([1.0, 27.0, 125.0, 343.0]) / 496)


def test_keep_rows_size_distinct_and_favours_high_losses():
    g = torch.Generator().manual_seed(1)
    losses = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.3, 4.0, 0.05, 2.0])
    counts = torch.zeros(8)
    for _ in range(2000):
        rows = keep_rows(losses, 0.5, g)
        assert rows.numel() == 4 and rows.unique().numel() == 4
        counts[rows] += 1
    assert counts[1] > counts[5] > counts[3] > counts[7] > counts[4] > counts[6]
    assert keep_rows(torch.rand(3), 0.1, g).numel() == 1


def test_keep_active_window_and_interrupt():
    assert not keep_active(0.49, 0, 0.5, 0.9, 2)
    assert keep_active(0.5, 0, 0.5, 0.9, 2)
    assert not keep_active(0.5, 1, 0.5, 0.9, 2)  # every 2nd batch is normal
    assert keep_active(0.6, 2, 0.5, 0.9, 2)
    assert not keep_active(0.9, 0, 0.5, 0.9, 2)
    assert all(keep_active(0.7, i, 0.5, 0.9, 0) for i in range(5))
    assert [keep_active(0.7, i, 0.5, 0.9, 3) for i in range(6)] == [True, True, False] * 2


# ---- candidate batches ----------------------------------------------------------------------
def test_expected_share_and_candidate_size():
    assert expected_share(3.0) == pytest.approx(0.25) and expected_share(0.0) == 1.0
    g = torch.Generator().manual_seed(0)
    u = torch.rand(200000, generator=g)
    for beta, floor in ((3.0, 0.1), (1.0, 0.3), (2.0, 0.0)):
        mc = float(u.pow(beta).clamp_min(floor).mean())
        assert expected_share(beta, floor) == pytest.approx(mc, abs=3e-3)
    assert candidate_size(128, 0.25) == 512 and candidate_size(128, 1.0) == 128


def test_sb_plans_its_steps_and_backpropagates_about_a_batch_per_step():
    engine = FakeEngine(n=400, batch_size=16, drift=False)
    policy = create_policy("sb", beta=1.0, history=64)  # share 1/2: candidates of 32
    order = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    engine.run_epoch(policy, 0, reader(order))  # plain warm-up: every batch trained as is
    assert [b.indices.tolist() for b in engine.trained] == [order[s : s + 16].tolist()
                                                            for s in range(0, 400, 16)]
    assert not engine.scored
    engine.trained.clear()
    extra = engine.run_epoch(policy, 1, reader(order))  # FakeEngine checks steps == planned
    sizes = [len(b) for b in engine.trained]
    assert len(sizes) == -(-400 // 32) and all(1 <= size <= 32 for size in sizes)
    selected = round(extra["sb_selected_fraction"] * 400)
    assert sum(sizes) == selected and 100 < selected < 300
    trained = torch.cat([b.indices for b in engine.trained])
    assert trained.unique().numel() == trained.numel()  # no example twice in an epoch
    assert torch.equal(torch.cat(engine.scored).long(), order)  # every example scored, in order
    # higher loss (higher index here) is selected more often
    assert (trained >= 200).sum() > 2 * (trained < 200).sum()


def test_sb_never_takes_an_empty_step():
    engine = FakeEngine(n=64, batch_size=8, drift=False)
    policy = create_policy("sb", beta=50.0, history=4096, warmup_epochs=0)
    engine.run_epoch(policy, 0, reader(list(range(64))))
    assert all(len(b) >= 1 for b in engine.trained)


# ---- stale cache -----------------------------------------------------------------------------
def test_stale_cache_attributes_each_loss_to_its_own_index():
    n = 64
    engine = FakeEngine(n=n, batch_size=8)
    policy = create_policy("stale-sb", staleness=2, beta=1.0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    engine.run_epoch(policy, 0, reader(order))  # warm-up fills the cache with epoch-0 losses
    assert torch.allclose(policy._cache_loss, loss_of(torch.arange(n), 0))
    assert torch.equal(policy._cache_epoch, torch.zeros(n, dtype=torch.int64))

    # epoch 2: entries from epoch 0 are stale (staleness 2); refresh half of them at epoch 2
    # with distinct values, then score one batch mixing fresh-cached and stale examples.
    engine.epoch = 2
    policy.plan(reader(order), engine.context(2))
    cached = torch.tensor([5, 17, 33, 48])
    policy._cache_loss[cached] = 100.0 + cached.float()
    policy._cache_epoch[cached] = 2
    mixed = make_batch([48, 2, 17, 60, 5, 9, 33, 40])
    engine.scored.clear()
    losses, reused = policy._losses_for(mixed, engine.context(2))
    assert reused == 4
    assert engine.scored[0].long().tolist() == [2, 60, 9, 40]  # only the stale ones are forwarded
    expected = [100 + i if i in cached.tolist() else float(loss_of(torch.tensor(i), 2))
                for i in mixed.indices.tolist()]
    assert torch.allclose(losses, torch.tensor(expected))
    for i in (2, 60, 9, 40):  # refreshed entries belong to their own index
        assert float(policy._cache_loss[i]) == pytest.approx(float(loss_of(torch.tensor(i), 2)))
        assert int(policy._cache_epoch[i]) == 2


def test_stale_sb_skips_forwards_while_cached_losses_are_valid():
    n = 96
    engine = FakeEngine(n=n, batch_size=8)
    policy = create_policy("stale-sb", staleness=2)
    order = list(range(n))
    engine.run_epoch(policy, 0, reader(order))
    warm_steps = len(engine.trained)
    engine.scored.clear()
    extra = engine.run_epoch(policy, 1, reader(order))
    assert not engine.scored and extra["sb_reused_fraction"] == 1.0
    backpropagated = {int(i) for b in engine.trained[warm_steps:] for i in b.indices}
    extra = engine.run_epoch(policy, 2, reader(order))
    scored = {int(i) for s in engine.scored for i in s}
    # examples backpropagated in epoch 1 carry epoch-1 losses (valid); the others are rescored
    assert scored == set(range(n)) - backpropagated
    assert extra["sb_reused_fraction"] == pytest.approx(len(backpropagated) / n)


def test_sb_state_round_trip_keeps_history_and_cache():
    engine = FakeEngine(n=32, batch_size=8)
    policy = create_policy("stale-sb")
    engine.run_epoch(policy, 0, reader(list(range(32))))
    copy = create_policy("stale-sb")
    copy.load_state_dict(policy.state_dict())
    assert torch.equal(copy._cache_loss, policy._cache_loss)
    assert torch.equal(copy._cache_epoch, policy._cache_epoch)
    assert sorted(copy._losses.values().tolist()) == sorted(policy._losses.values().tolist())


@pytest.mark.parametrize(
    ("name", "params"),
    [("sb", {"beta": -1}), ("sb", {"floor": 2}), ("stale-sb", {"staleness": 0}),
     ("sb-keep", {"keep": 0}), ("sb-keep", {"keep_start": 0.9, "keep_end": 0.5}),
     ("random-keep", {"keep": 1.5})],
)
def test_invalid_parameters_raise_one_line_value_errors(name, params):
    with pytest.raises(ValueError, match="--"):
        create_policy(name, **params)


def test_params_are_the_dataclass_fields():
    assert isinstance(create_policy("stale-sb"), SelectiveBackprop)
    assert create_policy("stale-sb").params() == {
        "beta": 3.0, "history": 1024, "floor": 0.0, "staleness": 2, "warmup_epochs": 1,
    }
