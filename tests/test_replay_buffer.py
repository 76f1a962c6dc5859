"""The replay buffer: bounded memory, FIFO / reservoir insertion, priorities, unbiased weights."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from subsetsel.onepass.buffer import (
    MIN_PRIORITY,
    ReplayBuffer,
    importance_weights,
    priority_from_loss,
)

SHAPE = (1, 40)


def _stream(n: int, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs whose every entry equals the row's source index, and labels index % 10."""
    idx = torch.arange(n)
    x = idx.float().view(n, *([1] * len(shape))).expand(n, *shape).contiguous()
    return x, idx % 10


def _offer(buf: ReplayBuffer, start: int, stop: int, x: torch.Tensor, y: torch.Tensor) -> None:
    idx = torch.arange(start, stop)
    buf.add(idx, x[start:stop], y[start:stop], torch.rand(stop - start))


def _assert_rows_consistent(buf: ReplayBuffer, y: torch.Tensor) -> None:
    held = buf.index[: len(buf)]
    assert (held >= 0).all()
    assert torch.equal(buf.x[: len(buf)].flatten(1)[:, 0], held.float())
    assert torch.equal(buf.y[: len(buf)], y[held])
    assert held.unique().numel() == held.numel()


@pytest.mark.parametrize("insertion", ["fifo", "reservoir"])
def test_memory_is_preallocated_bounded_and_never_grows(insertion):
    cap, n = 37, 1000
    x, y = _stream(n)
    buf = ReplayBuffer(cap, SHAPE, insertion=insertion, seed=1)
    row = 40 * 4 + 8 + 8 + 4  # float32 input, int64 label, int64 index, float32 loss
    assert buf.row_bytes == row
    assert buf.nbytes == cap * row
    pointers = [t.data_ptr() for t in (buf.x, buf.y, buf.index, buf.loss)]
    gen = torch.Generator().manual_seed(0)
    start = 0
    while start < n:
        stop = min(n, start + int(torch.randint(1, 90, (1,), generator=gen)))  # some > cap
        _offer(buf, start, stop, x, y)
        start = stop
        assert len(buf) == min(cap, stop)
        assert buf.nbytes == cap * row
        assert buf.x.shape == (cap, *SHAPE)
        assert [t.data_ptr() for t in (buf.x, buf.y, buf.index, buf.loss)] == pointers
        _assert_rows_consistent(buf, y)
    assert buf.seen == n


def test_fifo_keeps_the_most_recent_examples():
    cap, n = 50, 400
    x, y = _stream(n)
    buf = ReplayBuffer(cap, SHAPE, insertion="fifo")
    start = 0
    for size in [7, 64, 3, 128, 1, 49, 51, 97]:
        stop = min(n, start + size)
        _offer(buf, start, stop, x, y)
        start = stop
        expected = set(range(max(0, stop - cap), stop))
        assert set(buf.index[: len(buf)].tolist()) == expected
        _assert_rows_consistent(buf, y)


def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    """Inclusion counts over many independent streams fit the uniform expectation (chi-square),
    while FIFO's counts, tested the same way, are rejected."""
    n, cap, trials, batch = 60, 12, 1500, 7
    x, y = _stream(n)
    counts = {"reservoir": torch.zeros(n), "fifo": torch.zeros(n)}
    for insertion, count in counts.items():
        for trial in range(trials):
            buf = ReplayBuffer(cap, SHAPE, insertion=insertion, seed=trial)
            for start in range(0, n, batch):
                _offer(buf, start, min(n, start + batch), x, y)
            count[buf.index[:cap]] += 1
    expected = trials * cap / n
    reservoir = counts["reservoir"]
    # Inclusions within one trial are negatively correlated, so this test is conservative.
    assert chisquare(reservoir.numpy(), [expected] * n).pvalue > 1e-3
    first_half, second_half = reservoir[: n // 2].sum(), reservoir[n // 2 :].sum()
    assert abs(first_half - second_half) / (trials * cap) < 0.05
    assert chisquare(counts["fifo"].numpy(), [expected] * n).pvalue < 1e-6


def test_reservoir_fills_the_first_capacity_slots_in_order():
    x, y = _stream(30)
    buf = ReplayBuffer(10, SHAPE, insertion="reservoir")
    _offer(buf, 0, 4, x, y)
    _offer(buf, 4, 10, x, y)
    assert buf.index.tolist() == list(range(10))


def test_priorities_follow_the_formula():
    loss = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.3, 10.0])
    for alpha in (0.0, 0.3, 0.9, 1.0):
        expected = (1 - alpha * torch.exp(-loss)).clamp_min(MIN_PRIORITY)
        assert torch.allclose(priority_from_loss(loss, alpha), expected)
    p = priority_from_loss(loss, 0.5)
    assert torch.allclose(p, 1 - 0.5 * torch.exp(-loss))  # the floor does not bind
    assert priority_from_loss(torch.zeros(1), 1.0).item() == pytest.approx(MIN_PRIORITY)
    x, y = _stream(len(loss))
    buf = ReplayBuffer(8, SHAPE)
    buf.add(torch.arange(len(loss)), x, y, loss)
    assert torch.allclose(buf.priorities(0.7), 1 - 0.7 * torch.exp(-loss))
    with pytest.raises(ValueError, match="alpha"):
        priority_from_loss(loss, 1.5)


def test_uniform_sampling_has_unit_weights():
    x, y = _stream(20)
    buf = ReplayBuffer(32, SHAPE)
    buf.add(torch.arange(20), x, y, torch.rand(20))
    drawn = buf.sample(64, alpha=0.0)
    assert drawn.slots.min() >= 0 and drawn.slots.max() < 20
    assert torch.equal(drawn.weights, torch.ones(64))
    assert torch.allclose(drawn.probs, torch.full((64,), 1 / 20))


def test_prioritised_sampling_frequencies_match_q():
    m, draws = 10, 200_000
    loss = torch.linspace(0.0, 3.0, m)
    x, y = _stream(m)
    buf = ReplayBuffer(m, SHAPE, seed=3)
    buf.add(torch.arange(m), x, y, loss)
    drawn = buf.sample(draws, alpha=0.9)
    p = 1 - 0.9 * torch.exp(-loss)
    q = p / p.sum()
    counts = torch.bincount(drawn.slots, minlength=m).double()
    expected = q.double() / q.double().sum() * draws
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    assert torch.allclose(drawn.probs, q[drawn.slots])


def test_importance_weights_make_the_weighted_mean_unbiased():
    """E_q[w * l] equals the buffer's mean loss: exactly in expectation, and numerically over many
    draws (fixed seed) where the unweighted prioritised mean is clearly biased upwards."""
    m = 16
    loss = torch.tensor([0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0, 2.5, 3.0,
                         4.0, 6.0])
    x, y = _stream(m)
    buf = ReplayBuffer(m, SHAPE, seed=5)
    buf.add(torch.arange(m), x, y, loss)
    alpha = 0.95
    p = buf.priorities(alpha).double()
    q = p / p.sum()
    w = importance_weights(q, m)
    assert (q * w * loss.double()).sum().item() == pytest.approx(loss.double().mean().item(),
                                                                 rel=1e-12)
    batch, batches = 128, 4000
    estimates = torch.empty(batches, dtype=torch.float64)
    biased = torch.empty(batches, dtype=torch.float64)
    for i in range(batches):
        drawn = buf.sample(batch, alpha)
        drawn_loss = loss[drawn.slots].double()
        estimates[i] = (drawn.weights.double() * drawn_loss).mean()
        biased[i] = drawn_loss.mean()
    stderr = estimates.std().item() / math.sqrt(batches)
    truth = loss.double().mean().item()
    assert abs(estimates.mean().item() - truth) < 4 * stderr
    assert biased.mean().item() - truth > 20 * stderr


def test_update_loss_refreshes_replayed_rows_and_keeps_the_max_of_duplicates():
    x, y = _stream(5)
    buf = ReplayBuffer(5, SHAPE)
    buf.add(torch.arange(5), x, y, torch.ones(5))
    buf.update_loss(torch.tensor([3, 0, 3]), torch.tensor([0.25, 2.0, 0.75]))
    assert buf.loss.tolist() == [2.0, 1.0, 1.0, 0.75, 1.0]


def test_bad_construction_and_empty_sampling_raise():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, SHAPE)
    with pytest.raises(ValueError, match="insertion"):
        ReplayBuffer(4, SHAPE, insertion="lifo")
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(4, SHAPE).sample(2)
