"""The trainer: epochs over a schedule of weighted subsets, a weighted loss, evaluation, JSON-line
logs and resumable checkpoints.

Weighted loss: each mini-batch's loss is sum_i w_i * l_i / sum_i w_i (the reference Grad-Match
normalisation), so weights shape the relative contribution of examples within a batch while the
step size stays comparable to unweighted training.

Time accounting (all wall seconds, CUDA synchronised): `select_seconds` is time spent choosing
subsets, `train_seconds` the time in training steps, `eval_seconds` the test evaluation.
`elapsed_seconds` is the cumulative select + train time: the clock that time-to-accuracy reports
use (evaluation is bookkeeping, not training cost, and is excluded).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from subsetsel.errors import UnknownNameError
from subsetsel.online.base import Batch, Policy
from subsetsel.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_schedule
from subsetsel.selection.base import (
    Selection,
    SelectionContext,
    Strategy,
    create_strategy,
    round_generator,
    strategy_names,
)

if TYPE_CHECKING:
    from subsetsel.data import Dataset
    from subsetsel.store import SelectionStore


@dataclass
class TrainConfig:
    """Everything that defines a run (stored as JSON in logs and selection files)."""

    dataset: str = "mnist1d"
    data_root: str = "data"
    train_size: int | None = None
    test_size: int | None = None
    data_seed: int = 0  # generation/subsampling of the data; fixed across training seeds
    model: str | None = None  # None: the dataset's default model
    strategy: str = "gradmatch"
    fraction: float = 0.1
    select_every: int = 5
    warm_start: float = 0.0
    strategy_params: dict[str, Any] = field(default_factory=dict)
    policy: str = "plain"
    policy_params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1  # epochs between test evaluations; 0: only after the last epoch
    slow_input: float = 0.0  # simulated upstream cost, seconds per batch of fresh examples
    replay: str | None = None  # path of a selection file to replay instead of selecting
    save_selections: str | None = None  # path of the selection file this run writes

    def validate(self) -> None:
        """Raise ValueError (one line) for out-of-range numbers."""
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.select_every < 1:
            raise ValueError(f"--select-every must be >= 1, got {self.select_every}")
        if not 0.0 <= self.warm_start < 1.0:
            raise ValueError(f"--warm-start must be in [0, 1), got {self.warm_start}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.slow_input < 0:
            raise ValueError(f"--slow-input must be >= 0, got {self.slow_input}")
        _check_name("strategy", self.strategy, strategy_names())
        _check_name("optimizer", self.optimizer, list(OPTIMIZERS))
        _check_name("schedule", self.schedule, list(SCHEDULES))
        from subsetsel.online.base import policy_names

        _check_name("policy", self.policy, policy_names())

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_name(kind: str, name: str, valid: list[str]) -> None:
    if name not in valid:
        raise UnknownNameError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def plan_epochs(epochs: int, fraction: float, warm_start: float) -> tuple[int, int]:
    """(full-data warm-up epochs, total epochs) for a compute budget of fraction * epochs epochs.

    Without warm start: (0, epochs). With kappa > 0: ceil(kappa * epochs * fraction) full-data
    epochs, then epochs - round(kappa * epochs) subset epochs, so full-data-equivalent compute
    stays ~fraction * epochs.
    """
    if warm_start <= 0:
        return 0, epochs
    warm = math.ceil(warm_start * epochs * fraction)
    return warm, warm + max(1, epochs - round(warm_start * epochs))


class Schedule(Protocol):
    """Source of the subset in force: a new Selection at epochs where it changes, else None."""

    def selection_for(self, epoch: int, trainer: Trainer) -> Selection | None: ...


@dataclass
class StrategySchedule:
    """Select with `strategy` every `select_every` epochs after `warm_epochs` full-data epochs."""

    strategy: Strategy
    select_every: int
    warm_epochs: int = 0

    def selection_for(self, epoch: int, trainer: Trainer) -> Selection | None:
        if epoch < self.warm_epochs:
            return Selection.full(len(trainer.dataset), epoch=epoch) if epoch == 0 else None
        offset = epoch - self.warm_epochs
        if offset % self.select_every:
            return None
        ctx = SelectionContext(
            model=trainer.model,
            dataset=trainer.dataset,
            epoch=epoch,
            round_index=offset // self.select_every,
            batch_size=trainer.config.batch_size,
            seed=trainer.config.seed,
            device=trainer.device,
        )
        start = time.perf_counter()
        chosen = self.strategy.select(ctx)
        _sync(trainer.device)
        seconds = time.perf_counter() - start
        return dataclasses.replace(chosen, epoch=epoch, seconds=seconds)


class ReplaySchedule:
    """Replay the rounds of a selection file (Cached-Grad-Match): no selection cost.

    Rounds map to the new run's epochs by relative training progress (see
    `SelectionStore.selection_at`): epoch e of a run of `total_epochs` uses the round in force
    at stored epoch floor(e * stored_epochs / total_epochs).
    """

    def __init__(self, store: SelectionStore, total_epochs: int) -> None:
        self.store = store
        self.total_epochs = total_epochs
        self.starts = set(store.round_starts(total_epochs))

    def selection_for(self, epoch: int, trainer: Trainer) -> Selection | None:
        if epoch not in self.starts:
            return None
        return dataclasses.replace(self.store.selection_at(epoch, self.total_epochs), seconds=0.0)

    def log_fields(self, epoch: int) -> dict[str, Any]:
        """Which file and stored round the epoch trained on."""
        return {
            "replay_file": str(self.store.path),
            "replay_round": self.store.round_index_at(epoch, self.total_epochs),
        }


class BatchSource:
    """One epoch of shuffled mini-batches drawn from a Selection, gathered on the device.

    Iterating yields `Batch`es of `batch_size` (last one smaller) in a seeded order; inputs are
    augmented by the dataset's augmentation. `read_delay` (seconds per batch) simulates a slow
    upstream pipeline; `fresh` counts examples read.
    """

    def __init__(
        self,
        dataset: Dataset,
        selection: Selection,
        batch_size: int,
        generator: torch.Generator,
        read_delay: float = 0.0,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.generator = generator  # CPU generator: order
        device = dataset.x_train.device
        self.aug_generator = torch.Generator(device=device).manual_seed(
            int(torch.randint(2**62, (1,), generator=generator))
        )
        order = torch.randperm(len(selection), generator=generator)
        self.indices = selection.indices[order].to(device)
        self.weights = selection.weights[order].to(device)
        self.read_delay = read_delay
        self.fresh = 0

    def __len__(self) -> int:
        return math.ceil(self.indices.numel() / self.batch_size)

    def read(self, indices: torch.Tensor, weights: torch.Tensor) -> Batch:
        """Gather (un-augmented) examples from the source, paying the simulated read cost."""
        if self.read_delay:
            time.sleep(self.read_delay * indices.numel() / self.batch_size)
        self.fresh += int(indices.numel())
        return Batch(indices, self.dataset.x_train[indices], self.dataset.y_train[indices], weights)

    def augment(self, batch: Batch) -> Batch:
        x = self.dataset.augment(batch.x, self.aug_generator)
        return Batch(batch.indices, x, batch.y, batch.w)

    def raw_batches(self) -> Iterator[Batch]:
        """Batches as read, before augmentation."""
        for start in range(0, self.indices.numel(), self.batch_size):
            stop = start + self.batch_size
            yield self.read(self.indices[start:stop], self.weights[start:stop])

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.raw_batches():
            yield self.augment(batch)


@dataclass
class Counters:
    """Examples forwarded, backpropagated and freshly read; optimizer steps."""

    forwarded: int = 0
    backpropagated: int = 0
    fresh: int = 0
    steps: int = 0

    def add(self, other: Counters) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


EpochCallback = Callable[[dict[str, Any]], None]


class Trainer:
    """Trains `model` on `dataset` following a schedule of weighted subsets.

    Python use: `Trainer(config).fit()`, or pass your own `model`/`dataset`/`schedule`/`policy`.
    `out_dir` (optional) receives config.json, log.jsonl (one JSON object per epoch),
    checkpoint.pt (after every epoch) and summary.json; `resume=True` continues from its
    checkpoint with the same schedule. `store` (optional) receives every new selection.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: nn.Module | None = None,
        dataset: Dataset | None = None,
        schedule: Schedule | None = None,
        policy: Policy | None = None,
        store: SelectionStore | None = None,
        out_dir: str | Path | None = None,
        resume: bool = False,
        callbacks: list[EpochCallback] | None = None,
        progress: bool = False,
    ) -> None:
        config.validate()
        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        if dataset is None:
            from subsetsel.data import load_dataset

            dataset = load_dataset(
                config.dataset, root=config.data_root, seed=config.data_seed,
                train_size=config.train_size, test_size=config.test_size, device=self.device,
            )
        self.dataset = dataset.to(self.device)
        if model is None:
            from subsetsel.models import build_model, default_model

            config.model = config.model or default_model(config.dataset, self.dataset.input_shape)
            torch.manual_seed(config.seed)
            model = build_model(config.model, self.dataset.input_shape, self.dataset.num_classes)
        self.model = model.to(self.device)
        self.warm_epochs, self.total_epochs = plan_epochs(
            config.epochs, config.fraction, config.warm_start
        )
        if schedule is None and config.replay:
            schedule = self._replay_schedule(config.replay)
        if schedule is None:
            strategy = create_strategy(
                config.strategy, fraction=config.fraction, seed=config.seed,
                **config.strategy_params,
            )
            schedule = StrategySchedule(strategy, config.select_every, self.warm_epochs)
        self.schedule = schedule
        if policy is None:
            from subsetsel.online.base import create_policy

            policy = create_policy(config.policy, **config.policy_params)
        self.policy = policy
        self.store = store
        self.optimizer = build_optimizer(
            config.optimizer, self.model.parameters(), lr=config.lr, momentum=config.momentum,
            nesterov=config.nesterov, weight_decay=config.weight_decay,
        )
        self.lr_schedule = build_schedule(config.schedule, self.optimizer, self.total_epochs)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.callbacks = list(callbacks or [])
        self.progress = progress
        self.selection: Selection | None = None
        self.epoch_counts = Counters()
        self.total_counts = Counters()
        self.elapsed = 0.0
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_count = 0
        if resume:
            self._load_checkpoint()

    def _replay_schedule(self, path: str) -> ReplaySchedule:
        """Open a selection file read-only and check it was made for this dataset."""
        from subsetsel.store import SelectionFileError, SelectionStore

        store = SelectionStore.open(path)
        if not store.rounds or store.rounds[0].epoch != 0:
            raise SelectionFileError(f"{path}: no round starts at epoch 0, nothing to replay")
        store.check_compatible(
            fingerprint=self.dataset.fingerprint(), dataset_size=len(self.dataset),
            dataset=self.config.dataset,
        )
        self.warm_epochs, self.total_epochs = 0, self.config.epochs  # the file holds the warm-up
        return ReplaySchedule(store, self.total_epochs)

    def attach_store(self, store: SelectionStore) -> None:
        """Append every new selection to `store` (rounds at or after the resume epoch dropped)."""
        store.truncate(before_epoch=self.start_epoch)
        self.store = store

    def schedule_params(self) -> dict[str, Any]:
        """The selecting strategy's parameters plus schedule settings (provenance)."""
        params: dict[str, Any] = {
            "select_every": self.config.select_every,
            "warm_start": self.config.warm_start,
            "warm_epochs": self.warm_epochs,
        }
        strategy = getattr(self.schedule, "strategy", None)
        if strategy is not None:
            params.update(strategy.params())
        return params

    # ---- steps, used by policies -------------------------------------------------------------
    def train_on(self, batch: Batch, normalize: bool = True) -> torch.Tensor:
        """One optimizer step on `batch` with the weighted loss; returns per-sample losses (B,),
        detached. `normalize=False` uses mean(w * l) instead of sum(w * l) / sum(w) (importance
        sampling's unbiased estimator). The step's logits stay in `last_logits` (detached)."""
        self.model.train()
        logits = self.model(batch.x)
        self.last_logits = logits.detach()
        losses = F.cross_entropy(logits, batch.y, reduction="none")
        if normalize:
            loss = (losses * batch.w).sum() / batch.w.sum().clamp_min(1e-12)
        else:
            loss = (losses * batch.w).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        n = len(batch)
        self.epoch_counts.forwarded += n
        self.epoch_counts.backpropagated += n
        self.epoch_counts.steps += 1
        self._loss_sum += loss.detach()
        self._loss_count += 1
        return losses.detach()

    @torch.no_grad()
    def score(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward without grad in eval mode: (logits (B, C), per-sample losses (B,)).
        Counted as forwarded examples; the model is left in train mode."""
        self.model.eval()
        logits = self.model(x)
        self.model.train()
        self.epoch_counts.forwarded += int(x.shape[0])
        return logits, F.cross_entropy(logits, y, reduction="none")

    @torch.no_grad()
    def evaluate(self, batch_size: int = 1024) -> tuple[float, float]:
        """(test accuracy in [0, 1], mean test loss)."""
        self.model.eval()
        correct = torch.zeros((), device=self.device)
        loss = torch.zeros((), device=self.device)
        x, y = self.dataset.x_test, self.dataset.y_test
        for start in range(0, y.numel(), batch_size):
            logits = self.model(x[start : start + batch_size])
            target = y[start : start + batch_size]
            correct += (logits.argmax(1) == target).sum()
            loss += F.cross_entropy(logits, target, reduction="sum")
        self.model.train()
        n = max(1, y.numel())
        return float(correct) / n, float(loss) / n

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train all remaining epochs; return the run summary."""
        self._write_config()
        epochs = range(self.start_epoch, self.total_epochs)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(epochs, desc="train", unit="epoch", leave=False)
            epochs = bar
        for epoch in epochs:
            record = self._run_epoch(epoch)
            if bar is not None:
                acc = record["test_acc"]
                bar.set_postfix(acc="-" if acc is None else f"{acc:.3f}",
                                subset=record["subset_size"])
            for callback in self.callbacks:
                callback(record)
        return self._write_summary()

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        torch.manual_seed(self.config.seed * 100_003 + epoch)
        self.epoch_counts = Counters()
        self._loss_sum.zero_()
        self._loss_count = 0
        start = time.perf_counter()
        new = self.schedule.selection_for(epoch, self)
        select_seconds = 0.0
        if new is not None:
            select_seconds = time.perf_counter() - start
            self.selection = new
            if self.store is not None:
                self.store.append(new)
        if self.selection is None:
            raise RuntimeError(f"the schedule gave no selection for the first epoch ({epoch})")
        start = time.perf_counter()
        source = BatchSource(
            self.dataset, self.selection, self.config.batch_size,
            round_generator(self.config.seed, epoch, salt=3),
            read_delay=self.config.slow_input,
        )
        self.policy.begin_epoch(self, epoch)
        for batch in self.policy.batches(source):
            self.policy.step(self, batch)
        extra = self.policy.end_epoch(self)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this epoch trained at
        self.lr_schedule.step()
        self.epoch_counts.fresh = source.fresh
        train_loss = float(self._loss_sum) / max(1, self._loss_count)
        _sync(self.device)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        test_acc = test_loss = None
        every = self.config.eval_every
        if epoch == self.total_epochs - 1 or (every and (epoch + 1) % every == 0):
            test_acc, test_loss = self.evaluate()
        eval_seconds = time.perf_counter() - start
        self.elapsed += select_seconds + train_seconds
        self.total_counts.add(self.epoch_counts)
        record = {
            "epoch": epoch,
            "subset_size": len(self.selection),
            "new_selection": new is not None,
            "select_seconds": round(select_seconds, 6),
            "train_seconds": round(train_seconds, 6),
            "eval_seconds": round(eval_seconds, 6),
            "elapsed_seconds": round(self.elapsed, 6),
            **dataclasses.asdict(self.epoch_counts),
            **{f"total_{k}": v for k, v in dataclasses.asdict(self.total_counts).items()},
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": lr,
            **extra,
        }
        if isinstance(self.schedule, ReplaySchedule):
            record.update(self.schedule.log_fields(epoch))
        self.history.append(record)
        if self.out_dir is not None:
            with open(self.out_dir / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            self._save_checkpoint(epoch)
        return record

    # ---- files -------------------------------------------------------------------------------
    def _check_same_config(self) -> None:
        """A run directory resumes only the run it holds: refuse another config."""
        assert self.out_dir is not None
        stored = self.out_dir / "config.json"
        if not stored.exists():
            return
        before = json.loads(stored.read_text()).get("config")
        if before != json.loads(json.dumps(self.config.to_json())):
            raise ValueError(f"{self.out_dir} holds a run with another config; not resuming it")

    def _write_config(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        info = {
            "config": self.config.to_json(),
            "warm_epochs": self.warm_epochs,
            "total_epochs": self.total_epochs,
            "dataset_size": len(self.dataset),
            "fingerprint": self.dataset.fingerprint(),
            "device": str(self.device),
            "policy_params": self.policy.params(),
        }
        _atomic_write_text(self.out_dir / "config.json", json.dumps(info, indent=2))

    def _write_summary(self) -> dict[str, Any]:
        accs = [r["test_acc"] for r in self.history if r["test_acc"] is not None]
        summary = {
            "final_acc": accs[-1] if accs else None,
            "best_acc": max(accs) if accs else None,
            "epochs": self.total_epochs,
            "elapsed_seconds": self.elapsed,
            "select_seconds": sum(r["select_seconds"] for r in self.history),
            **{f"total_{k}": v for k, v in dataclasses.asdict(self.total_counts).items()},
            "config": self.config.to_json(),
        }
        if self.out_dir is not None:
            _atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        return summary

    def _save_checkpoint(self, epoch: int) -> None:
        assert self.out_dir is not None and self.selection is not None
        sel = self.selection
        state = {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "selection": {
                "indices": sel.indices, "weights": sel.weights, "epoch": sel.epoch,
                "seconds": sel.seconds, "batch_ids": sel.batch_ids,
            },
            "policy": self.policy.state_dict(),
            "total_counts": dataclasses.asdict(self.total_counts),
            "elapsed": self.elapsed,
            "history": self.history,
        }
        tmp = self.out_dir / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.out_dir / "checkpoint.pt")

    def _load_checkpoint(self) -> None:
        """Continue from out_dir's checkpoint; without one, start over (dropping any log lines
        of an epoch that crashed before its checkpoint was written)."""
        if self.out_dir is None:
            return
        path = self.out_dir / "checkpoint.pt"
        self._check_same_config()
        if not path.exists():
            (self.out_dir / "log.jsonl").unlink(missing_ok=True)
            return
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.selection = Selection(**state["selection"])
        self.policy.load_state_dict(state["policy"])
        self.total_counts = Counters(**state["total_counts"])
        self.elapsed = state["elapsed"]
        self.history = list(state["history"])
        self.start_epoch = state["epoch"] + 1
        log = "".join(json.dumps(r) + "\n" for r in self.history)
        _atomic_write_text(self.out_dir / "log.jsonl", log)


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run directory's log.jsonl."""
    with open(Path(run_dir) / "log.jsonl") as log:
        return [json.loads(line) for line in log if line.strip()]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
