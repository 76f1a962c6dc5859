"""Data echoing: repeat counts, the exact multiset of examples in every mode, where augmentation
happens, the shuffle buffer and the background reader."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch

from subsetsel.online.base import Batch, create_policy
from subsetsel.online.echoing import ECHO_MODES, ShuffleBuffer, echo_counts, echo_stream, prefetch


def raw_batches(n: int, b: int) -> list[Batch]:
    """Batches of examples 0..n-1 whose input is their index."""
    out = []
    for s in range(0, n, b):
        idx = torch.arange(s, min(s + b, n))
        out.append(Batch(idx, idx.float().unsqueeze(1), idx % 3, torch.ones(idx.numel())))
    return out


class CountingAugment:
    """Adds 1000 * (call number) to x, so every augmentation call leaves a distinct mark."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, batch: Batch) -> Batch:
        self.calls += 1
        return Batch(batch.indices, batch.x + 1000.0 * self.calls, batch.y, batch.w)


def expected_counts(factor: float, mode: str, batches: list[Batch], seed: int) -> Counter:
    """Replay the documented count draws: per raw batch, per example (or per batch)."""
    g = torch.Generator().manual_seed(seed)
    want: Counter = Counter()
    for batch in batches:
        if mode == "batch":
            k = int(echo_counts(factor, 1, g)[0])
            want.update({int(i): k for i in batch.indices})
        else:
            counts = echo_counts(factor, len(batch), g).tolist()
            for i, k in zip(batch.indices.tolist(), counts, strict=True):
                want[i] += k
    return want


def run_stream(factor: float, mode: str, n: int = 100, b: int = 16, buffer: int = 40):
    batches = raw_batches(n, b)
    augment = CountingAugment()
    out = list(echo_stream(batches, factor, mode, b, buffer, torch.Generator().manual_seed(5),
                           torch.Generator().manual_seed(6), augment))
    return batches, out, augment


def test_echo_counts_integer_and_fractional():
    assert echo_counts(3.0, 5).tolist() == [3] * 5
    counts = echo_counts(2.5, 20000, torch.Generator().manual_seed(0))
    assert set(counts.tolist()) == {2, 3}
    assert abs(float(counts.float().mean()) - 2.5) < 0.02
    with pytest.raises(ValueError, match="--echo"):
        echo_counts(0.5, 3)


@pytest.mark.parametrize("mode", ECHO_MODES)
@pytest.mark.parametrize("factor", [1.0, 2.0, 3.0, 1.5, 2.25])
def test_echo_stream_emits_exactly_the_expected_multiset(mode, factor):
    batches, out, _ = run_stream(factor, mode)
    got = Counter(int(i) for batch in out for i in batch.indices)
    assert got == expected_counts(factor, mode, batches, seed=5)
    if factor == int(factor):
        assert got == Counter({i: int(factor) for i in range(100)})
    for batch in out:  # labels and inputs still belong to their index
        assert torch.equal(batch.y, batch.indices % 3)
        assert torch.equal(batch.x[:, 0] % 1000, batch.indices.float())
    if mode != "batch":  # full batches, except the final flush
        assert all(len(batch) == 16 for batch in out[:-1])


def test_augmentation_placement():
    _, out, augment = run_stream(2.0, "example-before-aug")
    assert augment.calls == len(out)  # once per emitted batch: copies get their own draw
    marks: dict[int, set[float]] = {}
    homes: dict[int, set[int]] = {}  # emitted batches each example's copies landed in
    for k, batch in enumerate(out):
        for i, v in zip(batch.indices.tolist(), batch.x[:, 0].tolist(), strict=True):
            marks.setdefault(i, set()).add(v)
            homes.setdefault(i, set()).add(k)
    assert all(len(marks[i]) == len(homes[i]) for i in marks)  # one mark per emitted batch
    assert sum(len(v) == 2 for v in marks.values()) > 50

    batches, out, augment = run_stream(2.0, "example-after-aug")
    assert augment.calls == len(batches)  # once per read batch: copies are identical
    marks = {}
    for batch in out:
        for i, v in zip(batch.indices.tolist(), batch.x[:, 0].tolist(), strict=True):
            marks.setdefault(i, set()).add(v)
    assert all(len(v) == 1 for v in marks.values())

    batches, out, augment = run_stream(3.0, "batch")
    assert augment.calls == len(batches) and len(out) == 3 * len(batches)
    for k in range(len(batches)):  # each batch repeated 3 times in a row, identical
        assert out[3 * k] is out[3 * k + 1] is out[3 * k + 2]


def test_shuffle_buffer_mixes_and_loses_nothing():
    buf = ShuffleBuffer(capacity=64, batch_size=16, generator=torch.Generator().manual_seed(0))
    out: list[Batch] = []
    for batch in raw_batches(200, 16):
        out += list(buf.add(batch))
        assert len(buf) < 64
    assert all(len(b) == 16 for b in out)
    out += list(buf.flush())
    order = torch.cat([b.indices for b in out])
    assert sorted(order.tolist()) == list(range(200))
    assert not torch.equal(order, torch.arange(200))
    assert ShuffleBuffer(4, 16, torch.Generator()).capacity == 16  # at least one batch


def test_prefetch_keeps_order_overlaps_and_propagates_errors():
    def slow(n: int):
        for i in range(n):
            time.sleep(0.05)
            yield i

    start = time.perf_counter()
    got = []
    for item in prefetch(slow(10), depth=2):
        time.sleep(0.05)  # the consumer's "training step"
        got.append(item)
    seconds = time.perf_counter() - start
    assert got == list(range(10))
    assert seconds < 0.85  # serial would take 1.0 s; overlapped ~0.55 s
    assert list(prefetch(iter(range(5)), depth=0)) == list(range(5))

    def broken():
        yield 1
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        list(prefetch(broken(), depth=2))


def test_echo_policy_validation():
    with pytest.raises(ValueError, match="--echo-mode"):
        create_policy("echo", echo_mode="sideways")
    with pytest.raises(ValueError, match="--echo"):
        create_policy("echo", echo=0.5)
    assert create_policy("echo").params() == {
        "echo": 2.0, "echo_mode": "example-before-aug", "shuffle_buffer": 0, "prefetch": 2,
    }
