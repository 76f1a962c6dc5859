"""One-pass training with a bounded replay buffer (the One Pass ImageNet setting).

The training set is streamed exactly once, in a seeded random order, in mini-batches of
`batch_size`. Each incoming batch gets one optimizer step, then enters the replay buffer (its
per-example losses from that step become its stored losses); then `replay_steps` (k) optimizer
steps are taken on batches of min(batch_size, rows held) examples drawn from the buffer, uniformly
or by error-based priority P = 1 - alpha * exp(-loss). Every replayed example's stored loss is
refreshed with the loss of that replay step.

Loss of a step: mean_i(w_i * l_i) over the batch, with w_i = 1 for incoming batches and uniform
replay, and w_i = 1 / (M * q_i) for prioritised replay (M rows held, q_i the probability of drawing
that row), so that the replay loss is an unbiased estimate of the buffer's mean loss;
`importance_weights=False` drops the correction (w_i = 1).

alpha decay (`alpha_decay`): alpha_t = alpha * s(t) with t = optimizer steps taken / total steps;
constant: s = 1, linear: s = 1 - t, cosine: s = (1 + cos(pi t)) / 2 (sampling ends uniform).
The learning rate follows the named schedule of `subsetsel.optim` over the total number of
optimizer steps, ceil(N / batch_size) * (1 + k), stepped after every optimizer step.

Metrics: storage % = 100 * rows held / N (at most floor(storage * N)); compute % = 100 *
examples backpropagated / (reference_epochs * N), the share of a reference multi-epoch run's
backward passes. With k = 0 no buffer is allocated (storage 0 %).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from subsetsel.online.base import Batch
from subsetsel.optim import OPTIMIZERS, SCHEDULES, build_schedule
from subsetsel.replay_buffer import INSERTIONS, ReplayBuffer
from subsetsel.selection.base import Selection, round_generator
from subsetsel.train import (
    BatchSource,
    Counters,
    TrainConfig,
    Trainer,
    _atomic_write_text,
    _check_name,
    _sync,
)

if TYPE_CHECKING:
    from torch import nn

    from subsetsel.data import Dataset

PRIORITIES = ("uniform", "error")
ALPHA_DECAYS = ("constant", "linear", "cosine")
_TRAIN_DEFAULTS = TrainConfig()


@dataclass
class OnePassConfig:
    """Everything that defines a one-pass run (stored as JSON in config.json)."""

    dataset: str = "mnist1d"
    data_root: str = "data"
    train_size: int | None = None
    test_size: int | None = None
    data_seed: int = 0  # generation/subsampling of the data; fixed across training seeds
    model: str | None = None  # None: the dataset's default model
    storage: float = 0.05  # buffer capacity as a share of the training set, in (0, 1]
    insertion: str = "fifo"
    replay_steps: int = 1
    priority: str = "uniform"
    alpha: float = 0.9
    alpha_decay: str = "constant"
    importance_weights: bool = True
    reference_epochs: int = _TRAIN_DEFAULTS.epochs
    log_every: float = 0.1  # share of the stream between two log records
    batch_size: int = _TRAIN_DEFAULTS.batch_size
    optimizer: str = _TRAIN_DEFAULTS.optimizer
    lr: float = _TRAIN_DEFAULTS.lr
    momentum: float = _TRAIN_DEFAULTS.momentum
    nesterov: bool = _TRAIN_DEFAULTS.nesterov
    weight_decay: float = _TRAIN_DEFAULTS.weight_decay
    schedule: str = _TRAIN_DEFAULTS.schedule
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        """Raise ValueError (one line) for out-of-range numbers or unknown names."""
        if not 0.0 < self.storage <= 1.0:
            raise ValueError(f"--storage must be in (0, 1], got {self.storage}")
        if self.replay_steps < 0:
            raise ValueError(f"--replay-steps must be >= 0, got {self.replay_steps}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.log_every <= 1.0:
            raise ValueError(f"--log-every must be in (0, 1], got {self.log_every}")
        if self.reference_epochs < 1:
            raise ValueError(f"--reference-epochs must be >= 1, got {self.reference_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        _check_name("insertion", self.insertion, list(INSERTIONS))
        _check_name("priority", self.priority, list(PRIORITIES))
        _check_name("alpha decay", self.alpha_decay, list(ALPHA_DECAYS))
        _check_name("optimizer", self.optimizer, list(OPTIMIZERS))
        _check_name("schedule", self.schedule, list(SCHEDULES))

    def train_config(self) -> TrainConfig:
        """The `subsetsel train` config of the matching reference run: full data for
        `reference_epochs` epochs, same data, model, optimizer and seed (hence the same init)."""
        shared = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: v for k, v in self.to_json().items() if k in shared}
        return TrainConfig(**values, strategy="full", fraction=1.0, epochs=self.reference_epochs)

    def label(self) -> str:
        """Short method name: naive (k = 0), uniform or error."""
        return "naive" if self.replay_steps == 0 else self.priority

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def buffer_capacity(storage: float, dataset_size: int) -> int:
    """floor(storage * N) rows; ValueError when that is 0."""
    capacity = math.floor(storage * dataset_size + 1e-9)
    if capacity < 1:
        raise ValueError(
            f"--storage {storage} holds no example of the {dataset_size} in the training set; "
            f"use at least {1 / dataset_size:.3g}"
        )
    return capacity


def alpha_at(alpha: float, decay: str, progress: float) -> float:
    """alpha * s(progress), progress in [0, 1]: constant 1, linear 1 - t, cosine (1+cos(pi t))/2."""
    t = min(max(progress, 0.0), 1.0)
    if decay == "constant":
        return alpha
    if decay == "linear":
        return alpha * (1.0 - t)
    if decay == "cosine":
        return alpha * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown alpha decay {decay!r}; valid: {', '.join(ALPHA_DECAYS)}")


def log_marks(num_batches: int, log_every: float) -> list[int]:
    """Batch counts after which a log record is written: every `log_every` of the stream
    (rounded up to whole batches) and always after the last batch."""
    count = math.ceil(1.0 / log_every - 1e-9)
    marks = {min(num_batches, max(1, math.ceil(num_batches * log_every * i - 1e-9)))
             for i in range(1, count + 1)}
    return sorted(marks | {num_batches})


class OnePassTrainer:
    """Streams the training set once with replay; `fit()` returns the run summary.

    Model, dataset and optimizer come from a `Trainer` built with `config.train_config()` (so the
    initialisation equals that of `subsetsel train` with the same seed), and evaluation is its
    `evaluate()`. `out_dir` (optional) receives config.json, log.jsonl and summary.json.
    """

    def __init__(
        self,
        config: OnePassConfig,
        *,
        model: nn.Module | None = None,
        dataset: Dataset | None = None,
        out_dir: str | Path | None = None,
        progress: bool = False,
    ) -> None:
        config.validate()
        self.config = config
        self.trainer = Trainer(config.train_config(), model=model, dataset=dataset)
        config.model = self.trainer.config.model
        self.model = self.trainer.model
        self.optimizer = self.trainer.optimizer
        self.dataset = self.trainer.dataset
        self.device = self.trainer.device
        n = len(self.dataset)
        self.buffer: ReplayBuffer | None = None
        if config.replay_steps > 0:
            self.buffer = ReplayBuffer(
                buffer_capacity(config.storage, n), self.dataset.input_shape,
                insertion=config.insertion, dtype=self.dataset.x_train.dtype,
                device=self.device, seed=config.seed,
            )
        self.num_batches = math.ceil(n / config.batch_size)
        self.total_steps = self.num_batches * (1 + config.replay_steps)
        self.lr_schedule = build_schedule(config.schedule, self.optimizer, self.total_steps)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.counts = Counters()
        self.total_counts = Counters()
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0
        self.max_held = 0
        self._loss_sum = torch.zeros((), device=self.device)
        self._fresh_loss_sum = torch.zeros((), device=self.device)
        self._fresh_steps = 0

    def make_source(self) -> BatchSource:
        """The stream: every training example once, in a seeded random order (the same order as
        epoch 0 of `subsetsel train` with this seed)."""
        return BatchSource(
            self.dataset, Selection.full(len(self.dataset)), self.config.batch_size,
            round_generator(self.config.seed, 0, salt=3),
        )

    # ---- steps -------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """One optimizer step on loss = mean(w * l) (mean(l) for w None); returns the
        per-example losses (B,), detached, computed before the update."""
        self.model.train()
        losses = F.cross_entropy(self.model(x), y, reduction="none")
        loss = losses.mean() if w is None else (losses * w).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.lr_schedule.step()
        n = int(y.shape[0])
        self.counts.forwarded += n
        self.counts.backpropagated += n
        self.counts.steps += 1
        self._loss_sum += loss.detach()
        return losses.detach()

    def current_alpha(self) -> float:
        """alpha of the next replay draw (0 for uniform sampling)."""
        if self.config.priority == "uniform":
            return 0.0
        progress = (self.total_counts.steps + self.counts.steps) / self.total_steps
        return alpha_at(self.config.alpha, self.config.alpha_decay, progress)

    def replay(self, source: BatchSource) -> None:
        """One replay step from the buffer; refreshes the replayed rows' stored losses."""
        buffer = self.buffer
        assert buffer is not None
        alpha = self.current_alpha()
        drawn = buffer.sample(min(self.config.batch_size, len(buffer)), alpha)
        s = drawn.slots
        batch = source.augment(Batch(buffer.index[s], buffer.x[s], buffer.y[s], drawn.weights))
        weighted = alpha > 0 and self.config.importance_weights
        losses = self.step(batch.x, batch.y, batch.w if weighted else None)
        buffer.update_loss(s, losses)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, source: BatchSource | None = None) -> dict[str, Any]:
        """Stream `source` (default `make_source()`) once; log, write files, return the summary."""
        source = source if source is not None else self.make_source()
        self._write_config()
        marks = set(log_marks(self.num_batches, self.config.log_every))
        batches = source.raw_batches()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(batches, desc="onepass", unit="batch", total=self.num_batches, leave=False)
            batches = bar
        start = time.perf_counter()
        for b, raw in enumerate(batches, start=1):
            incoming = source.augment(raw)
            losses = self.step(incoming.x, incoming.y, None)
            self._fresh_loss_sum += losses.mean()
            self._fresh_steps += 1
            if self.buffer is not None:
                self.buffer.add(raw.indices, raw.x, raw.y, losses)
                self.max_held = max(self.max_held, len(self.buffer))
                for _ in range(self.config.replay_steps):
                    self.replay(source)
            if b in marks:
                _sync(self.device)
                seconds = time.perf_counter() - start
                self.elapsed += seconds
                self.counts.fresh = source.fresh - self.total_counts.fresh
                record = self._record(b, seconds)
                if bar is not None:
                    bar.set_postfix(acc=f"{record['test_acc']:.3f}")
                start = time.perf_counter()
        return self._write_summary()

    def _record(self, batches_done: int, train_seconds: float) -> dict[str, Any]:
        n = len(self.dataset)
        start = time.perf_counter()
        test_acc, test_loss = self.trainer.evaluate()
        eval_seconds = time.perf_counter() - start
        self.total_counts.add(self.counts)
        counts, self.counts = self.counts, Counters()
        train_loss = float(self._loss_sum) / max(1, counts.steps)
        fresh_loss = float(self._fresh_loss_sum) / max(1, self._fresh_steps)
        self._loss_sum.zero_()
        self._fresh_loss_sum.zero_()
        self._fresh_steps = 0
        held = len(self.buffer) if self.buffer is not None else 0
        record = {
            "epoch": len(self.history),
            "stream_fraction": batches_done / self.num_batches,
            "batches_seen": batches_done,
            "select_seconds": 0.0,
            "train_seconds": round(train_seconds, 6),
            "eval_seconds": round(eval_seconds, 6),
            "elapsed_seconds": round(self.elapsed, 6),
            **dataclasses.asdict(counts),
            **{f"total_{k}": v for k, v in dataclasses.asdict(self.total_counts).items()},
            "train_loss": train_loss,
            "fresh_loss": fresh_loss,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": self.optimizer.param_groups[0]["lr"],
            "alpha": self.current_alpha(),
            "buffer_size": held,
            "storage_pct": 100.0 * held / n,
            "compute_pct": self.compute_pct(),
        }
        self.history.append(record)
        if self.out_dir is not None:
            with open(self.out_dir / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
        return record

    def compute_pct(self) -> float:
        """100 * examples backpropagated so far / (reference_epochs * N)."""
        total = self.total_counts.backpropagated
        return 100.0 * total / (self.config.reference_epochs * len(self.dataset))

    # ---- files -------------------------------------------------------------------------------
    def _write_config(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "log.jsonl").write_text("")
        info = {
            "kind": "onepass",
            "method": self.config.label(),
            "config": self.config.to_json(),
            "dataset_size": len(self.dataset),
            "fingerprint": self.dataset.fingerprint(),
            "device": str(self.device),
            "buffer_capacity": self.buffer.capacity if self.buffer is not None else 0,
            "buffer_bytes": self.buffer.nbytes if self.buffer is not None else 0,
            "num_batches": self.num_batches,
            "total_steps": self.total_steps,
        }
        _atomic_write_text(self.out_dir / "config.json", json.dumps(info, indent=2))

    def _write_summary(self) -> dict[str, Any]:
        accs = [r["test_acc"] for r in self.history]
        n = len(self.dataset)
        summary = {
            "method": self.config.label(),
            "final_acc": accs[-1] if accs else None,
            "best_acc": max(accs) if accs else None,
            "epochs": len(self.history),
            "stream_passes": 1,
            "effective_epochs": self.total_counts.backpropagated / n,
            "elapsed_seconds": self.elapsed,
            "select_seconds": 0.0,
            **{f"total_{k}": v for k, v in dataclasses.asdict(self.total_counts).items()},
            "storage_pct": 100.0 * self.max_held / n,
            "compute_pct": self.compute_pct(),
            "buffer_capacity": self.buffer.capacity if self.buffer is not None else 0,
            "buffer_bytes": self.buffer.nbytes if self.buffer is not None else 0,
            "reference_epochs": self.config.reference_epochs,
            "config": self.config.to_json(),
        }
        if self.out_dir is not None:
            _atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        return summary


def run_onepass(
    config: OnePassConfig, out_dir: str | Path | None = None, *, progress: bool = False
) -> dict[str, Any]:
    """Train one one-pass run and return its summary (files under `out_dir` if given)."""
    return OnePassTrainer(config, out_dir=out_dir, progress=progress).fit()
