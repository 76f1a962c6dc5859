"""One-pass training: each example read once, bounded storage, exact compute accounting, the
weighted step, and `subsetsel onepass` end to end."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from subsetsel.cli import main
from subsetsel.data.base import Batch
from subsetsel.onepass.stream import OnePassConfig, OnePassTrainer, alpha_at, log_marks
from subsetsel.online.base import StepBatch
from subsetsel.train import TrainConfig, Trainer, read_log


def _count_reads(trainer: OnePassTrainer, n: int) -> torch.Tensor:
    """Instrument the stream's reader: how often each training index is read from the data."""
    reads = torch.zeros(n, dtype=torch.int64)
    reader = trainer.feed.reader
    original = type(reader).read

    def read(self, plan, *, augment=True):
        for batch in original(self, plan, augment=augment):
            reads.add_(torch.bincount(batch.indices.cpu(), minlength=n))
            yield batch

    type(reader).read = read  # undone by the fixture below
    return reads


@pytest.fixture
def restore_reader_read():
    from subsetsel.data.tensor import TensorReader

    original = TensorReader.read
    yield
    TensorReader.read = original


def _config(**kw) -> OnePassConfig:
    kw.setdefault("batch_size", 64)
    kw.setdefault("log_every", 0.25)
    return OnePassConfig(device="cpu", **kw)


@pytest.mark.parametrize("priority", ["uniform", "error"])
def test_each_example_is_read_once_and_replay_comes_from_the_buffer(small_mnist1d, priority,
                                                                     restore_reader_read):
    n = len(small_mnist1d)  # 600
    trainer = OnePassTrainer(
        _config(storage=0.1, replay_steps=2, priority=priority, insertion="reservoir"),
        dataset=small_mnist1d,
    )
    reads = _count_reads(trainer, n)
    summary = trainer.fit()
    assert torch.equal(reads, torch.ones(n, dtype=torch.int64))
    assert summary["total_fresh"] == n
    capacity = math.floor(0.1 * n)  # 60 rows, all replay batches hold 60 examples
    num_batches = math.ceil(n / 64)
    assert trainer.buffer.capacity == capacity and len(trainer.buffer) == capacity
    assert summary["total_backpropagated"] == n + num_batches * 2 * capacity
    assert summary["total_steps"] == num_batches * 3 == trainer.total_steps
    assert summary["compute_pct"] == pytest.approx(
        100 * summary["total_backpropagated"] / (20 * n)
    )
    assert summary["storage_pct"] == pytest.approx(10.0)
    assert trainer.buffer.nbytes == capacity * trainer.buffer.row_bytes
    held = trainer.buffer.index[:capacity]
    assert torch.equal(trainer.buffer.x[:capacity], small_mnist1d.x_train[held])
    assert torch.equal(trainer.buffer.y[:capacity], small_mnist1d.y_train[held])


def test_naive_one_pass_equals_one_epoch_of_train(small_mnist1d):
    """k = 0 with a constant learning rate is exactly epoch 0 of `subsetsel train --strategy full`
    (same init, same order, same steps)."""
    onepass = OnePassTrainer(
        _config(replay_steps=0, schedule="constant", log_every=1.0), dataset=small_mnist1d
    )
    summary = onepass.fit()
    assert onepass.buffer is None and summary["storage_pct"] == 0.0
    assert summary["compute_pct"] == pytest.approx(100 / 20)
    reference = Trainer(
        TrainConfig(strategy="full", fraction=1.0, epochs=1, batch_size=64, schedule="constant",
                    device="cpu"),
        dataset=small_mnist1d,
    )
    ref = reference.fit()
    assert summary["final_acc"] == ref["final_acc"]
    for a, b in zip(onepass.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_step_minimises_the_mean_of_weighted_losses(small_mnist1d):
    trainer = OnePassTrainer(_config(replay_steps=1), dataset=small_mnist1d)
    x, y = small_mnist1d.x_train[:32], small_mnist1d.y_train[:32]
    w = torch.linspace(0.2, 3.0, 32)
    before = copy.deepcopy(trainer.model)
    expected_losses = F.cross_entropy(before(x), y, reduction="none")
    (expected_losses * w).mean().backward()
    out = trainer.engine.step(StepBatch(Batch(torch.arange(32), x, y, w), mean_loss=True))
    assert torch.allclose(out.losses, expected_losses.detach(), atol=1e-6)
    for p, q in zip(trainer.model.parameters(), before.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_prioritised_replay_refreshes_losses_of_replayed_rows(small_mnist1d):
    trainer = OnePassTrainer(
        _config(storage=0.2, replay_steps=1, priority="error", alpha=0.9), dataset=small_mnist1d
    )
    engine = trainer.engine
    steps = iter(trainer.policy.plan(trainer.feed.open(0).reader, engine.context()))
    incoming = next(steps)
    trainer.policy.observe(incoming, engine.step(incoming))  # enters the buffer
    assert len(trainer.buffer) == 64
    stored = trainer.buffer.loss.clone()
    replay = next(steps)
    assert replay.tag[0] == "replay" and replay.mean_loss
    trainer.policy.observe(replay, engine.step(replay))
    changed = (trainer.buffer.loss != stored).nonzero().squeeze(1)
    assert 0 < changed.numel() <= 64
    assert engine.counts.steps == 2


def test_alpha_decay_and_log_marks():
    assert alpha_at(0.8, "constant", 0.7) == 0.8
    assert alpha_at(0.8, "linear", 0.25) == pytest.approx(0.6)
    assert alpha_at(0.8, "cosine", 0.5) == pytest.approx(0.4)
    assert alpha_at(0.8, "cosine", 1.0) == pytest.approx(0.0)
    assert log_marks(10, 0.1) == list(range(1, 11))
    assert log_marks(10, 0.25) == [3, 5, 8, 10]
    assert log_marks(3, 0.1) == [1, 2, 3]
    assert log_marks(7, 1.0) == [7]


# ---- CLI ---------------------------------------------------------------------------------------
SMALL = ["onepass", "--train-size", "1000", "--test-size", "200", "--quiet"]


def _invoke(args):
    return CliRunner().invoke(main, args)


def test_cli_end_to_end_logs_storage_and_compute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke([*SMALL, "--storage", "0.05", "--replay-steps", "2", "--priority", "error",
                      "--alpha", "0.8", "--alpha-decay", "linear", "--reference-epochs", "10",
                      "--log-every", "0.5", "--out", "runs/op"])
    assert result.exit_code == 0, result.output
    assert "storage 5.00 %" in result.output and "compute 18.00 %" in result.output
    run = tmp_path / "runs" / "op"
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "onepass" and config["buffer_capacity"] == 50
    assert config["config"]["priority"] == "error" and config["config"]["model"] == "cnn1d"
    log = read_log(run)
    assert [r["epoch"] for r in log] == [0, 1]
    assert [r["stream_fraction"] for r in log] == [0.5, 1.0]
    for key in ("test_acc", "elapsed_seconds", "forwarded", "backpropagated", "fresh",
                "total_forwarded", "total_backpropagated", "total_fresh", "storage_pct",
                "compute_pct", "lr", "alpha", "buffer_size"):
        assert all(key in r for r in log), key
    # 1000 examples in 8 batches (4 + 4 per record); each batch adds 2 replay batches of 50.
    assert [r["fresh"] for r in log] == [512, 488]
    assert [r["backpropagated"] for r in log] == [512 + 400, 488 + 400]
    assert log[-1]["total_fresh"] == 1000 and log[-1]["total_backpropagated"] == 1800
    assert log[-1]["compute_pct"] == pytest.approx(18.0)
    assert log[0]["compute_pct"] == pytest.approx(9.12)
    assert all(r["storage_pct"] == pytest.approx(5.0) for r in log)
    assert log[0]["elapsed_seconds"] < log[1]["elapsed_seconds"]
    assert 0.0 <= log[-1]["alpha"] < log[0]["alpha"] <= 0.8
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_acc"] == log[-1]["test_acc"] > 0.2
    assert summary["effective_epochs"] == pytest.approx(1.8)


def test_cli_naive_json_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke([*SMALL, "--replay-steps", "0", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["method"] == "naive" and summary["storage_pct"] == 0.0
    assert summary["compute_pct"] == pytest.approx(5.0) and summary["total_fresh"] == 1000
    assert len(list((tmp_path / "runs").glob("onepass-naive-mnist1d-*"))) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--storage", "0"], "--storage must be in (0, 1]"),
        (["--storage", "1.5"], "--storage must be in (0, 1]"),
        (["--storage", "-0.1"], "--storage must be in (0, 1]"),
        (["--replay-steps", "-1"], "--replay-steps must be >= 0"),
        (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
        (["--alpha", "-0.1"], "--alpha must be in [0, 1]"),
        (["--storage", "0.0005"], "holds no example"),
        (["--optimizer", "lbfgs"], "unknown optimizer"),
    ],
)
def test_cli_bad_input_is_a_one_line_usage_error(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = _invoke([*SMALL, *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.output


def test_cli_refuses_to_overwrite_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["onepass", "--train-size", "300", "--test-size", "100", "--quiet", "--replay-steps",
            "0", "--out", "runs/a"]
    assert _invoke(args).exit_code == 0
    result = _invoke(args)
    assert result.exit_code == 2 and "already holds a run" in result.output
