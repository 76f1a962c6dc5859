"""Selective-Backprop: percentile and probability math, loss history, keep variant, backward
accumulation and the stale cache keyed by dataset index."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from subsetsel.online.base import Batch, create_policy
from subsetsel.online.selective_backprop import (
    BackwardAccumulator,
    LossHistory,
    SelectiveBackprop,
    keep_active,
    keep_probabilities,
    keep_rows,
    percentiles,
    selection_probabilities,
)


def loss_of(indices: torch.Tensor, epoch: int = 0) -> torch.Tensor:
    """A loss every example has in the fake trainer: unique per (index, epoch)."""
    return indices.float() * 0.01 + epoch


class FakeTrainer:
    """Records what a policy asks for. Inputs carry the dataset index (x[:, 0]), so the loss of
    a row (`loss_of`) tells which example it belongs to."""

    def __init__(self, n: int, batch_size: int = 8, epochs: int = 4, drift: bool = True) -> None:
        self.config = SimpleNamespace(batch_size=batch_size, seed=0)
        self.device = torch.device("cpu")
        self.dataset = list(range(n))
        self.total_epochs = epochs
        self.epoch = 0
        self.trained: list[torch.Tensor] = []  # indices of each backward batch
        self.scored: list[torch.Tensor] = []  # indices of each selection forward
        self.forwarded = 0
        self.drift = drift  # whether losses change from epoch to epoch

    def train_on(self, batch: Batch, normalize: bool = True) -> torch.Tensor:
        self.trained.append(batch.indices.clone())
        self.forwarded += len(batch)
        return loss_of(batch.x[:, 0].long(), self.epoch if self.drift else 0)

    def score(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.scored.append(x[:, 0].long().clone())
        self.forwarded += x.shape[0]
        return torch.zeros(x.shape[0], 2), loss_of(x[:, 0].long(), self.epoch if self.drift else 0)


def make_batch(indices: list[int] | torch.Tensor) -> Batch:
    idx = torch.as_tensor(indices, dtype=torch.int64)
    return Batch(idx, idx.float().unsqueeze(1), torch.zeros_like(idx), torch.ones(idx.numel()))


def run_epoch(policy, trainer: FakeTrainer, epoch: int, batches: list[list[int]]) -> dict:
    trainer.epoch = epoch
    policy.begin_epoch(trainer, epoch)
    for rows in batches:
        policy.step(trainer, make_batch(rows))
    return policy.end_epoch(trainer)


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


# ---- accumulation ----------------------------------------------------------------------------
def test_accumulator_hands_out_full_batches_in_order_and_flushes_the_rest():
    acc = BackwardAccumulator(128)
    out: list[Batch] = []
    start = 0
    for size in (50, 100, 0, 30, 120):
        out += list(acc.add(make_batch(list(range(start, start + size)))))
        start += size
    assert [len(b) for b in out] == [128, 128]
    rest = acc.flush()
    assert rest is not None and len(rest) == 300 - 256
    assert torch.equal(torch.cat([b.indices for b in out] + [rest.indices]), torch.arange(300))
    assert acc.flush() is None


def test_sb_backpropagates_exactly_full_batches_and_flushes_at_epoch_end():
    trainer = FakeTrainer(n=400, batch_size=16, drift=False)
    policy = create_policy("sb", beta=1.0, history=64)
    order = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    batches = [order[s : s + 16].tolist() for s in range(0, 400, 16)]
    run_epoch(policy, trainer, 0, batches)  # plain warm-up: every batch trained as is
    assert [t.tolist() for t in trainer.trained] == batches and not trainer.scored
    trainer.trained.clear()
    extra = run_epoch(policy, trainer, 1, batches)
    sizes = [len(t) for t in trainer.trained]
    selected = round(extra["sb_selected_fraction"] * 400)
    assert sum(sizes) == selected and 0 < selected < 400
    assert all(s == 16 for s in sizes[:-1]) and 0 < sizes[-1] <= 16
    assert len(sizes) == -(-selected // 16)
    trained = torch.cat(trainer.trained)
    assert trained.unique().numel() == trained.numel()  # no example twice in an epoch
    assert torch.equal(torch.cat(trainer.scored), order)  # every example scored, in order
    # higher loss (higher index here) is selected more often
    assert (trained >= 200).sum() > 2 * (trained < 200).sum()


# ---- stale cache -----------------------------------------------------------------------------
def test_stale_cache_attributes_each_loss_to_its_own_index():
    n = 64
    trainer = FakeTrainer(n=n, batch_size=8)
    policy = create_policy("stale-sb", staleness=2, beta=1.0)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    batches = [order[s : s + 8].tolist() for s in range(0, n, 8)]
    run_epoch(policy, trainer, 0, batches)  # warm-up fills the cache with epoch-0 losses
    assert torch.allclose(policy._cache_loss, loss_of(torch.arange(n), 0))
    assert torch.equal(policy._cache_epoch, torch.zeros(n, dtype=torch.int64))

    # epoch 2: entries from epoch 0 are stale (staleness 2); refresh half of them at epoch 2
    # with distinct values, then score one batch mixing fresh-cached and stale examples.
    trainer.epoch = 2
    policy.begin_epoch(trainer, 2)
    cached = torch.tensor([5, 17, 33, 48])
    policy._cache_loss[cached] = 100.0 + cached.float()
    policy._cache_epoch[cached] = 2
    mixed = make_batch([48, 2, 17, 60, 5, 9, 33, 40])
    trainer.scored.clear()
    losses, reused = policy._losses_for(trainer, mixed)
    assert reused == 4
    assert trainer.scored[0].tolist() == [2, 60, 9, 40]  # only the stale ones are forwarded
    expected = [100 + i if i in cached.tolist() else float(loss_of(torch.tensor(i), 2))
                for i in mixed.indices.tolist()]
    assert torch.allclose(losses, torch.tensor(expected))
    for i in (2, 60, 9, 40):  # refreshed entries belong to their own index
        assert float(policy._cache_loss[i]) == pytest.approx(float(loss_of(torch.tensor(i), 2)))
        assert int(policy._cache_epoch[i]) == 2


def test_stale_sb_skips_forwards_while_cached_losses_are_valid():
    n = 96
    trainer = FakeTrainer(n=n, batch_size=8)
    policy = create_policy("stale-sb", staleness=2)
    batches = [list(range(s, s + 8)) for s in range(0, n, 8)]
    run_epoch(policy, trainer, 0, batches)
    trainer.scored.clear()
    extra = run_epoch(policy, trainer, 1, batches)
    assert not trainer.scored and extra["sb_reused_fraction"] == 1.0
    backpropagated = {int(i) for t in trainer.trained[len(batches):] for i in t}
    extra = run_epoch(policy, trainer, 2, batches)
    scored = {int(i) for s in trainer.scored for i in s}
    # examples backpropagated in epoch 1 carry epoch-1 losses (valid); the others are rescored
    assert scored == set(range(n)) - backpropagated
    assert extra["sb_reused_fraction"] == pytest.approx(len(backpropagated) / n)


def test_sb_state_round_trip_keeps_history_and_cache():
    trainer = FakeTrainer(n=32, batch_size=8)
    policy = create_policy("stale-sb")
    run_epoch(policy, trainer, 0, [list(range(s, s + 8)) for s in range(0, 32, 8)])
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
