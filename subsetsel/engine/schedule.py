"""The selection schedule: which `Selection` is in force at each epoch, and every interaction
with the selection file, in one object.

`StrategySchedule` selects with a strategy every R epochs (after full-data warm-up epochs);
`ReplaySchedule` replays the rounds of a stored file (Cached-Grad-Match). `SubsetFeed` hands the
engine each epoch's reader over the subset in force, appends new rounds to the selection file,
marks the file complete at the end and checks, on resume, that the file is still the one the
run was writing.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from subsetsel.data.base import TrainData
from subsetsel.data.sampler import epoch_order, shard
from subsetsel.engine.dist import Dist
from subsetsel.engine.loop import Period
from subsetsel.engine.precision import Precision
from subsetsel.selection.base import (
    Selection,
    SelectionContext,
    Strategy,
    strategy_mean_loss,
)
from subsetsel.selection.losses import LossRecord
from subsetsel.store import SelectionMetadata, SelectionStore


class Schedule(Protocol):
    """Source of the subset in force: a new Selection at epochs where it changes, else None.
    It may also have `log_fields(epoch) -> dict` (extra log fields) and `params() -> dict`
    (provenance stored in selection files)."""

    def selection_for(self, epoch: int) -> Selection | None: ...


@dataclass
class StrategySchedule:
    """Select with `strategy` every `select_every` epochs after `warm_epochs` full-data epochs.

    The strategy sees `model` (in eval mode while it selects) and the eval view of `data`."""

    strategy: Strategy
    select_every: int
    model: nn.Module
    data: TrainData
    batch_size: int
    seed: int
    device: torch.device
    precision: Precision
    warm_epochs: int = 0
    dist: Dist | None = None
    epochs: int | None = None  # the run's length (strategies that schedule by it need it)
    losses: LossRecord | None = None  # made when the strategy first wants losses

    @property
    def mean_loss(self) -> bool:
        """Whether steps on these selections use mean(w * l) (`Strategy.mean_loss`)."""
        return self.strategy.mean_loss

    def recorder(self, epoch: int) -> LossRecord | None:
        """Where epoch `epoch`'s training losses go, or None when the strategy does not want
        them (then nothing is recorded)."""
        if epoch < self.warm_epochs or not self.strategy.wants_losses(epoch, self.epochs):
            return None
        if self.losses is None:
            self.losses = LossRecord(len(self.data), self.device, self.dist)
        return self.losses

    def selection_for(self, epoch: int) -> Selection | None:
        if epoch < self.warm_epochs:
            return Selection.full(len(self.data), epoch=epoch) if epoch == 0 else None
        offset = epoch - self.warm_epochs
        if offset % self.select_every:
            return None
        ctx = SelectionContext(
            model=self.model, dataset=self.data, epoch=epoch,
            round_index=offset // self.select_every, batch_size=self.batch_size, seed=self.seed,
            device=self.device, precision=self.precision, dist=self.dist, epochs=self.epochs,
            losses=self.losses,
        )
        start = time.perf_counter()
        was_training = self.model.training
        try:
            chosen = self.strategy.select(ctx)
        finally:
            self.model.train(was_training)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        return dataclasses.replace(chosen, epoch=epoch, seconds=seconds)

    def log_fields(self, epoch: int) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The recorded losses (a resumed run draws the same subsets)."""
        return {} if self.losses is None else {"losses": self.losses.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "losses" in state:
            if self.losses is None:
                self.losses = LossRecord(len(self.data), self.device, self.dist)
            self.losses.load_state_dict(state["losses"])

    def params(self) -> dict[str, Any]:
        """The strategy's parameters plus the schedule settings (provenance)."""
        return {"select_every": self.select_every, "warm_epochs": self.warm_epochs,
                **self.strategy.params()}


class ReplaySchedule:
    """Replay the rounds of a selection file (Cached-Grad-Match): no selection cost.

    Rounds map to the new run's epochs by relative training progress (see
    `SelectionStore.selection_at`): epoch e of a run of `total_epochs` uses the round in force
    at stored epoch floor(e * span / total_epochs), span being the epochs the file covers.
    """

    def __init__(self, store: SelectionStore, total_epochs: int) -> None:
        self.store = store
        self.total_epochs = total_epochs
        self.starts = set(store.round_starts(total_epochs))
        # the loss normalisation of the strategy that made the file (InfoBatch: mean(w * l))
        self.mean_loss = strategy_mean_loss(store.metadata.strategy)

    def selection_for(self, epoch: int) -> Selection | None:
        if epoch not in self.starts:
            return None
        return dataclasses.replace(self.store.selection_at(epoch, self.total_epochs), seconds=0.0)

    def log_fields(self, epoch: int) -> dict[str, Any]:
        """Which file and stored round the epoch trained on."""
        return {
            "replay_file": str(self.store.path),
            "replay_round": self.store.round_index_at(epoch, self.total_epochs),
        }

    def params(self) -> dict[str, Any]:
        """The replayed file's strategy parameters, and where they came from."""
        meta = self.store.metadata
        return {**meta.strategy_params, "replayed_from": str(self.store.path),
                "replayed_file_id": meta.file_id}


class SubsetFeed:
    """Epochs of training on the subset in force (see the module docstring).

    store: the selection file new rounds are appended to (None: nothing is saved; under
    torch.distributed only rank 0 holds it). read_delay: simulated upstream cost, seconds per
    example read. dist: under torch.distributed each rank reads its shard of the order
    (`subsetsel.data.sampler.shard`).
    """

    def __init__(self, schedule: Schedule, data: TrainData, *, epochs: int, seed: int,
                 store: SelectionStore | None = None, read_delay: float = 0.0,
                 dist: Dist | None = None) -> None:
        self.schedule = schedule
        self.data = data
        self.periods = epochs
        self.seed = seed
        self.store = store
        self.read_delay = read_delay
        self.dist = dist or Dist.local()
        self.selection: Selection | None = None

    def open(self, period: int) -> Period:
        new = self.schedule.selection_for(period)
        select_seconds = new.seconds if new is not None else 0.0  # replayed rounds cost 0
        if new is not None:
            self.selection = new
            if self.store is not None:
                self.store.append(new)
        if self.selection is None:
            raise RuntimeError(f"the schedule gave no selection for the first epoch ({period})")
        order = shard(epoch_order(self.selection, self.seed, period), self.dist.rank,
                      self.dist.world)
        reader = self.data.reader(order.indices, order.weights, order.aug_seed, self.read_delay)
        fields = {"subset_size": len(self.selection), "new_selection": new is not None}
        log_fields = getattr(self.schedule, "log_fields", None)
        if log_fields is not None:
            fields.update(log_fields(period))
        recorder = getattr(self.schedule, "recorder", None)
        losses = recorder(period) if recorder is not None else None
        return Period(reader, select_seconds, fields, losses,
                      bool(getattr(self.schedule, "mean_loss", False)))

    def finish(self) -> None:
        """The schedule ran to its end: the selection file says so."""
        if self.store is not None:
            self.store.finish()

    def state_dict(self) -> dict[str, Any]:
        sel = self.selection
        state: dict[str, Any] = {"selection": None}
        if sel is not None:
            state["selection"] = {
                "indices": sel.indices, "weights": sel.weights, "epoch": sel.epoch,
                "seconds": sel.seconds, "batch_ids": sel.batch_ids,
            }
        if self.store is not None:
            state["store"] = self.store.identity()
        schedule_state = getattr(self.schedule, "state_dict", None)
        if schedule_state is not None:
            state["schedule"] = schedule_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["selection"] is not None:
            self.selection = Selection(**state["selection"])
        load = getattr(self.schedule, "load_state_dict", None)
        if load is not None and state.get("schedule"):
            load(state["schedule"])


def open_replay(path: str | Path, data: TrainData, *, dataset: str, total_epochs: int,
                allow_incomplete: bool = False) -> ReplaySchedule:
    """A ReplaySchedule over a selection file, after checking the file can be replayed
    (complete, unless allowed; a round at epoch 0) and was made for `data`."""
    store = SelectionStore.open(path)
    store.check_replayable(allow_incomplete)
    store.check_compatible(fingerprint=data.fingerprint(), dataset_size=len(data),
                           dataset=dataset, num_classes=data.num_classes)
    return ReplaySchedule(store, total_epochs)


def create_store(path: str | Path, *, data: TrainData, dataset: str, schedule: Schedule,
                 strategy: str, model: str, seed: int, epochs: int,
                 config: dict[str, Any]) -> SelectionStore:
    """A new selection file for the rounds `schedule` will choose over `epochs` epochs (a
    replayed schedule records the replayed file's strategy)."""
    if isinstance(schedule, ReplaySchedule):
        strategy = schedule.store.metadata.strategy
    params = getattr(schedule, "params", None)
    metadata = SelectionMetadata(
        dataset=dataset, dataset_size=len(data), fingerprint=data.fingerprint(),
        num_classes=data.num_classes, strategy=strategy,
        strategy_params=params() if callable(params) else {}, model=model, seed=seed,
        epochs=epochs, config=config,
    )
    return SelectionStore.create(path, metadata)
