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
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from subsetsel.data.base import Batch, EpochReader, TrainData
from subsetsel.data.sampler import epoch_order, shard
from subsetsel.data.tensor import TensorData
from subsetsel.engine.dist import Dist
from subsetsel.engine.files import RunFiles, claim
from subsetsel.engine.loop import Engine, Period, PerStep
from subsetsel.engine.progress import ProgressBar
from subsetsel.errors import UnknownNameError
from subsetsel.onepass.buffer import INSERTIONS, ReplayBuffer
from subsetsel.online.base import EpochPlan, Policy, PolicyContext, StepBatch, StepOut
from subsetsel.optim import OPTIMIZERS, SCHEDULES, build_schedule
from subsetsel.selection.base import Selection
from subsetsel.train import TrainConfig, build_parts, check_finite_options

if TYPE_CHECKING:
    from torch import nn

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
    loader: str = _TRAIN_DEFAULTS.loader
    workers: int | None = None
    image_size: int | None = None
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
    amp: bool = False
    channels_last: bool = False

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
        check_finite_options(self)
        _check_choice("insertion", self.insertion, INSERTIONS)
        _check_choice("priority", self.priority, PRIORITIES)
        _check_choice("alpha decay", self.alpha_decay, ALPHA_DECAYS)
        OPTIMIZERS.check(self.optimizer)
        SCHEDULES.check(self.schedule)

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


def _check_choice(kind: str, name: str, valid: tuple[str, ...]) -> None:
    if name not in valid:
        raise UnknownNameError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


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


class PassFeed:
    """The one-pass stream as periods: the training set once, in the order of epoch 0 of
    `subsetsel train` with this seed, cut at the log marks (period p covers batches
    marks[p-1] .. marks[p]); every period reads on from the same reader. Under
    torch.distributed each rank streams its shard of that order."""

    def __init__(self, data: TrainData, batch_size: int, marks: list[int], seed: int,
                 dist: Dist | None = None) -> None:
        self.marks = marks
        self.periods = len(marks)
        self.batch_size = batch_size
        group = dist or Dist.local()
        order = shard(epoch_order(Selection.full(len(data)), seed, 0), group.rank, group.world)
        self.reader = data.reader(order.indices, order.weights, order.aug_seed)
        self.num_batches = marks[-1] if marks else 0

    def open(self, period: int) -> Period:
        first = self.marks[period - 1] if period else 0
        last = self.marks[period]
        b = self.batch_size
        window = self.reader.window(first * b, last * b)
        return Period(window, 0.0, {"stream_fraction": last / self.num_batches,
                                    "batches_seen": last})

    def finish(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ReplayPolicy(Policy):
    """Each incoming batch: one step on it, then it enters the buffer (with the losses of that
    step), then `replay_steps` steps on batches drawn from the buffer (see the module
    docstring). Not registered: `subsetsel onepass` builds it."""

    name: ClassVar[str] = "onepass-replay"

    def __init__(self, config: OnePassConfig, buffer: ReplayBuffer | None,
                 total_steps: int) -> None:
        self.config = config
        self.buffer = buffer
        self.total_steps = total_steps
        self.steps_done = 0
        self.max_held = 0
        self._fresh_loss = 0.0
        self._fresh_steps = 0

    def current_alpha(self) -> float:
        """alpha of the next replay draw (0 for uniform sampling)."""
        if self.config.priority == "uniform":
            return 0.0
        progress = self.steps_done / self.total_steps
        return alpha_at(self.config.alpha, self.config.alpha_decay, progress)

    def plan(self, reader: EpochReader, ctx: PolicyContext) -> EpochPlan:
        b = ctx.batch_size
        k = self.config.replay_steps if self.buffer is not None else 0
        return EpochPlan(reader.num_batches(b) * (1 + k), self._stream(reader, b, k))

    def _stream(self, reader: EpochReader, b: int, k: int) -> Iterator[StepBatch]:
        buffer = self.buffer
        for raw in reader.raw_batches(b):
            yield StepBatch(reader.augment(raw), mean_loss=True, tag=("incoming", raw))
            for _ in range(k):
                assert buffer is not None
                alpha = self.current_alpha()
                drawn = buffer.sample(min(b, len(buffer)), alpha)
                s = drawn.slots
                weights = drawn.weights if alpha > 0 and self.config.importance_weights else (
                    torch.ones_like(drawn.weights))
                batch = reader.augment(Batch(buffer.index[s], buffer.inputs(s), buffer.y[s],
                                             weights))
                yield StepBatch(batch, mean_loss=True, tag=("replay", s))

    def observe(self, step: StepBatch, out: StepOut) -> None:
        self.steps_done += 1
        kind, what = step.tag
        if kind == "replay":
            assert self.buffer is not None
            self.buffer.update_loss(what, out.losses)
            return
        self._fresh_loss += float(out.losses.mean())
        self._fresh_steps += 1
        if self.buffer is not None:
            self.buffer.add(what.indices, what.x, what.y, out.losses)
            self.max_held = max(self.max_held, len(self.buffer))

    def end_epoch(self) -> dict[str, Any]:
        fresh = self._fresh_loss / max(1, self._fresh_steps)
        self._fresh_loss, self._fresh_steps = 0.0, 0
        return {"fresh_loss": fresh, "alpha": self.current_alpha(),
                "buffer_size": len(self.buffer) if self.buffer is not None else 0}


class OnePassTrainer:
    """Streams the training set once with replay, on the engine; `fit()` returns the summary.

    The model, data and optimizer are built exactly as by `subsetsel train` with
    `config.train_config()` (so the initialisation equals that of the matching full-data run).
    `out_dir` (optional) receives config.json, log.jsonl and summary.json.
    """

    def __init__(
        self,
        config: OnePassConfig,
        *,
        model: nn.Module | None = None,
        dataset: TrainData | None = None,
        out_dir: str | Path | None = None,
        claimed: bool = False,
        progress: bool = False,
    ) -> None:
        config.validate()
        self.config = config
        parts = build_parts(config.train_config(), model=model, dataset=dataset)
        config.model = parts.config.model
        self.model, self.data, self.device = parts.model, parts.data, parts.device
        self.optimizer, self.dist = parts.optimizer, parts.dist
        n = len(self.data)
        world = self.dist.world
        self.buffer: ReplayBuffer | None = None
        if config.replay_steps > 0:  # under torch.distributed each rank holds its share
            tensors = isinstance(self.data, TensorData)
            self.buffer = ReplayBuffer(
                max(1, buffer_capacity(config.storage, n) // world),
                self.data.input_shape if tensors else None,
                insertion=config.insertion,
                dtype=self.data.x_train.dtype if isinstance(self.data, TensorData) else (
                    torch.float32),
                device=self.device, seed=config.seed,
            )
        self.num_batches = math.ceil(math.ceil(n / world) / config.batch_size)  # per rank
        self.total_steps = self.num_batches * (1 + config.replay_steps)
        self.policy = ReplayPolicy(config, self.buffer, self.total_steps)
        marks = log_marks(self.num_batches, config.log_every)
        self.feed = PassFeed(self.data, config.batch_size, marks, config.seed, self.dist)
        self.files = RunFiles(out_dir) if out_dir is not None and self.dist.main else None
        callbacks: list[Any] = [self._extend]
        if self.files is not None:
            if not claimed:
                claim(self.files.dir)
            callbacks.append(self._log)
        if progress and self.dist.main:
            callbacks.append(ProgressBar(len(marks), "onepass"))
        self.engine = Engine(
            model=self.model, data=self.data, optimizer=self.optimizer,
            lr=PerStep(build_schedule(config.schedule, self.optimizer, self.total_steps)),
            feed=self.feed, policy=self.policy, seed=config.seed,
            batch_size=config.batch_size, device=self.device, precision=parts.precision,
            eval_every=1, callbacks=callbacks, dist=self.dist,
        )

    def _log(self, engine: Engine, record: dict[str, Any]) -> None:
        assert self.files is not None
        self.files.append_log(record)

    def _extend(self, engine: Engine, record: dict[str, Any]) -> None:
        """The one-pass fields of a log record: storage and compute shares."""
        n = len(self.data)
        held = torch.tensor([float(record["buffer_size"])], device=self.device)
        record["buffer_size"] = int(self.dist.all_reduce(held)[0])  # rows held by all ranks
        record["storage_pct"] = 100.0 * record["buffer_size"] / n
        record["compute_pct"] = self.compute_pct()

    def compute_pct(self) -> float:
        """100 * examples backpropagated so far / (reference_epochs * N)."""
        total = self.engine.total_counts.backpropagated
        return 100.0 * total / (self.config.reference_epochs * len(self.data))

    def fit(self) -> dict[str, Any]:
        """Stream the data once; log, write files, return the summary."""
        if self.files is not None:
            self.files.write_config(self._config_info())
        self.engine.fit()
        n = len(self.data)
        most = torch.tensor([float(self.policy.max_held)], device=self.device)
        held = int(self.dist.all_reduce(most)[0])  # the ranks' buffers together
        summary = {
            "method": self.config.label(),
            **self.engine.summary(),
            "stream_passes": 1,
            "effective_epochs": self.engine.total_counts.backpropagated / n,
            "storage_pct": 100.0 * held / n,
            "compute_pct": self.compute_pct(),
            "buffer_capacity": self.buffer.capacity if self.buffer is not None else 0,
            "buffer_bytes": self.buffer.nbytes if self.buffer is not None else 0,
            "reference_epochs": self.config.reference_epochs,
            "config": self.config.to_json(),
        }
        summary["epochs"] = len(self.engine.history)
        if self.files is not None:
            self.files.write_summary(summary)
        return summary

    def _config_info(self) -> dict[str, Any]:
        return {
            "kind": "onepass",
            "method": self.config.label(),
            "config": self.config.to_json(),
            "dataset_size": len(self.data),
            "fingerprint": self.data.fingerprint(),
            "device": str(self.device),
            "buffer_capacity": self.buffer.capacity if self.buffer is not None else 0,
            "buffer_bytes": self.buffer.nbytes if self.buffer is not None else 0,
            "num_batches": self.num_batches,
            "total_steps": self.total_steps,
        }


def run_onepass(
    config: OnePassConfig, out_dir: str | Path | None = None, *, claimed: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one one-pass run and return its summary (files under `out_dir` if given;
    `claimed`: the caller claimed that folder already)."""
    return OnePassTrainer(config, out_dir=out_dir, claimed=claimed, progress=progress).fit()
