"""`SubsetLoader`: subsetsel's selection and sampling for a training loop you write yourself.

    loader = SubsetLoader(dataset, model=model, strategy="gradmatch", fraction=0.1,
                          select_every=5, epochs=E, batch_size=128, num_workers=4,
                          save_selections="sel.h5")
    for epoch in range(E):
        for inputs, targets, weights in loader:
            losses = F.cross_entropy(model(inputs), targets, reduction="none")
            loss = (losses * weights).sum() / weights.sum()
            loader.record(losses)  # per-example losses back (infobatch uses them; else a no-op)
            ...

Each `iter(loader)` is one epoch. When a round is due it selects first (the model in eval mode,
its mode restored afterwards; the seconds are in `select_seconds`), writes the round to the
selection file exactly as `subsetsel train` does, then yields (inputs, targets, weights) batches
of the subset in a seeded order, on `device`. `SubsetLoader(dataset, replay="sel.h5")` replays a
file instead: no model, no selection cost (the file's fingerprint must match the dataset).

Strategies that select from training losses (`infobatch`) take them from your loop:
`loader.record(losses)` after each batch, `losses` being the (B,) per-example losses of the
batch just yielded, in its order (`loader.record(losses, indices)` with the dataset positions
`loader.indices` of that batch also works, e.g. from a later point of the loop). For other
strategies `record` only checks the shape: calling it always is safe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subsetsel.data.base import EpochReader, TrainData
from subsetsel.data.torch_dataset import TorchData
from subsetsel.engine import dist
from subsetsel.engine.dist import Dist
from subsetsel.engine.precision import Precision
from subsetsel.engine.schedule import (
    Schedule,
    StrategySchedule,
    SubsetFeed,
    create_store,
    open_replay,
)
from subsetsel.selection.base import Selection, Strategy, create_strategy, fixed_settings
from subsetsel.selection.losses import LossRecord
from subsetsel.store import SelectionStore, find_existing


class SubsetLoader:
    """Weighted subsets of `dataset`, re-selected every `select_every` epochs.

    dataset: a map-style `torch.utils.data.Dataset` of (input, label) items (read through a
    DataLoader with `num_workers` processes; `train_transform` / `eval_transform` are applied
    to the inputs in the train / eval view, see `TorchData`), or a `TrainData`.
    model: the network you train (needed by model-based strategies such as Grad-Match; its last
    nn.Linear must output the logits). strategy: a registered name or a `Strategy` object;
    `strategy_params` go to a named strategy. epochs: the run's length (recorded in the
    selection file, which is marked complete after the last epoch; None: open-ended).
    warm_start: kappa of Grad-Match's warm start (full-data epochs first).
    replay: a selection file to replay instead (`epochs` defaults to the file's).
    device: where batches are delivered (default: the model's device, else the CPU).
    name: the dataset's name in selection files.
    distributed: under torch.distributed (None: whenever a process group is initialised) every
    rank iterates its shard of the subset (the same number of batches everywhere, padded with
    weight-0 copies as DistributedSampler pads), Grad-Match selects with the ranks together,
    and rank 0 alone writes the selection file. Use `global_loss` for the loss normalised over
    the whole global batch.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        model: nn.Module | None = None,
        strategy: str | Strategy = "gradmatch",
        fraction: float = 0.1,
        select_every: int = 5,
        epochs: int | None = None,
        batch_size: int = 128,
        num_workers: int | None = None,
        save_selections: str | Path | None = None,
        replay: str | Path | None = None,
        allow_incomplete: bool = False,
        strategy_params: dict[str, Any] | None = None,
        warm_start: float = 0.0,
        seed: int = 0,
        device: str | torch.device | None = None,
        train_transform: Callable[[Any], Any] | None = None,
        eval_transform: Callable[[Any], Any] | None = None,
        num_classes: int | None = None,
        name: str = "dataset",
        amp: bool = False,
        channels_last: bool = False,
        distributed: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if select_every < 1:
            raise ValueError(f"select_every must be >= 1, got {select_every}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if device is None:
            device = next(model.parameters()).device if model is not None else "cpu"
        self.device = torch.device(device)
        group = dist.current(self.device)
        if distributed and not group.active:
            raise ValueError("distributed=True needs an initialised torch.distributed process "
                             "group of more than one rank")
        self.dist = group if distributed is not False else Dist.local(self.device)
        if not isinstance(dataset, TrainData):
            dataset = TorchData(dataset, train_transform=train_transform,
                                eval_transform=eval_transform, num_classes=num_classes,
                                name=name, num_workers=num_workers)
        self.data: TrainData = dataset.to(self.device)
        self.name = name
        self.batch_size = batch_size
        self.seed = seed
        self.model = model
        self.epoch = 0
        self.select_seconds = 0.0  # all rounds so far
        self.last_select_seconds = 0.0  # the current epoch's
        if replay is not None:
            path = find_existing(replay)
            if epochs is None:
                epochs = SelectionStore.open(path).metadata.epochs
            schedule: Schedule = open_replay(path, self.data, dataset=name, total_epochs=epochs,
                                             allow_incomplete=allow_incomplete)
            strategy_name = "replay"
        else:
            given = {"select_every": select_every, "fraction": fraction,
                     "warm_start": warm_start}
            name_of = strategy if isinstance(strategy, str) else strategy.name
            fixed = fixed_settings(name_of, given, SubsetLoader.__init__.__kwdefaults__)
            select_every, fraction, warm_start = (fixed["select_every"], fixed["fraction"],
                                                  fixed["warm_start"])
            if isinstance(strategy, str):
                strategy_name = strategy
                strategy = create_strategy(strategy, fraction=fraction, seed=seed,
                                           **(strategy_params or {}))
            else:
                strategy_name = strategy.name
            warm = 0
            if warm_start:
                from subsetsel.train import plan_epochs

                if epochs is None:
                    raise ValueError("warm_start needs epochs")
                warm, epochs = plan_epochs(epochs, strategy.fraction, warm_start)
            schedule = StrategySchedule(
                strategy, select_every, model if model is not None else _NoModel(strategy_name),
                self.data, batch_size, seed, self.device,
                Precision(self.device, amp, channels_last), warm, self.dist, epochs=epochs,
            )
        self.epochs = epochs
        self.schedule = schedule
        self.feed = SubsetFeed(schedule, self.data, epochs=epochs or 0, seed=seed, dist=self.dist)
        if save_selections is not None and epochs is None:
            raise ValueError("save_selections needs epochs (recorded in the file)")
        self.save_selections = (None if save_selections is None or not self.dist.main
                                else Path(save_selections))  # rank 0 alone writes it
        self._store_info = {
            "dataset": name, "strategy": strategy_name, "seed": seed, "epochs": epochs,
            "model": type(model).__name__ if model is not None else "-",
            "config": {"batch_size": batch_size, "select_every": select_every,
                       "fraction": fraction, "seed": seed, "epochs": epochs,
                       "source": "SubsetLoader"},
        }
        self._reader: EpochReader | None = None
        self._sink: LossRecord | None = None  # where this epoch's recorded losses go
        self._last: torch.Tensor | None = None  # indices of the batch just yielded
        self._last_recorded = False

    # ---- the epoch ---------------------------------------------------------------------------
    def _prepare(self) -> EpochReader:
        """Open the current epoch (selecting when a round is due), once."""
        if self._reader is None:
            if self.epochs is not None and self.epoch >= self.epochs:
                raise LoaderExhausted(f"all {self.epochs} epochs were iterated")
            if self.save_selections is not None and self.feed.store is None:
                self.feed.store = create_store(self.save_selections, data=self.data,
                                               schedule=self.schedule, **self._store_info)
            self.data.check_length()
            period = self.feed.open(self.epoch)
            self.last_select_seconds = period.select_seconds
            self.select_seconds += period.select_seconds
            self._reader = period.reader
            self._sink = period.losses  # type: ignore[assignment]
        return self._reader

    def __len__(self) -> int:
        """Batches of the current epoch (selects first when a round is due)."""
        return self._prepare().num_batches(self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor]]:
        reader = self._prepare()
        sink = self._sink
        for batch in reader.batches(self.batch_size):
            self._last, self._last_recorded = batch.indices, False
            yield batch.x, batch.y, batch.w
        self._last = None
        if sink is not None:
            if sink.recorded == 0:
                warnings.warn(
                    f"SubsetLoader: strategy {self._store_info['strategy']!r} selects from "
                    f"training losses, but epoch {self.epoch} recorded none: call "
                    "loader.record(losses) after each batch (until then it keeps every "
                    "example)", stacklevel=2)
            sink.flush()  # under torch.distributed: the ranks' losses combined
        self._reader = None
        self._sink = None
        self.epoch += 1
        if self.epochs is not None and self.epoch == self.epochs:
            self.feed.finish()

    @property
    def indices(self) -> torch.Tensor | None:
        """int64 (B,) dataset positions of the batch just yielded (None outside an epoch)."""
        return self._last

    def record(self, losses: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Hand back per-example training losses: `losses` (B,), one per example of the batch
        just yielded, in its order (e.g. `F.cross_entropy(logits, targets, reduction="none")`;
        detached here), or of the examples at dataset positions `indices` (B,) when given
        (e.g. `loader.indices` saved earlier). Strategies that select from losses (infobatch)
        use them for the next epoch's draw; for the others this only checks the shape.
        A device-side scatter: no host sync."""
        if indices is None:
            if self._last is None:
                raise RuntimeError("record(losses) refers to the batch just yielded, and no "
                                   "batch is in flight: call it inside the loop over the "
                                   "loader, or pass indices")
            if self._last_recorded:
                raise RuntimeError("record(losses) was already called for this batch; pass "
                                   "indices to record other examples")
            indices = self._last
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or (
                losses.numel() != indices.numel()):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
            raise ValueError(f"record() takes one loss per example, shape ({indices.numel()},) "
                             f"(reduction='none'); got {shape}")
        if indices is self._last:
            self._last_recorded = True
        if self._sink is not None:
            self._sink.record(indices, losses)

    def global_loss(self, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum(w * l) / sum(w) over the global batch of all ranks, scaled so that DDP's
        gradient average gives that loss's gradient (in one process: the plain weighted mean).
        For strategies whose weights rescale the gradient (`mean_loss`: infobatch, and replays
        of its files) the divisor is the number of rows instead: mean(w * l).
        Costs one all-reduce of sum(w) per step under torch.distributed."""
        if self.mean_loss:
            total = torch.tensor(float(weights.numel()), device=weights.device)
        else:
            total = weights.sum()
        if self.dist.active:
            total = self.dist.all_reduce(total.detach().clone()) / self.dist.world
        return (losses * weights).sum() / total.clamp_min(1e-12)

    @property
    def mean_loss(self) -> bool:
        """Whether this loader's selections are meant to train with mean(w * l) rather than
        sum(w * l) / sum(w) (infobatch; `global_loss` does it for you)."""
        return bool(getattr(self.schedule, "mean_loss", False))

    @property
    def selection(self) -> Selection | None:
        """The subset of the current (or last) epoch."""
        return self.feed.selection

    @property
    def store(self) -> SelectionStore | None:
        return self.feed.store

    # ---- resuming ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The epoch reached, the subset in force and the selection file's identity."""
        return {"epoch": self.epoch, "feed": self.feed.state_dict(),
                "select_seconds": self.select_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state_dict` was taken (the selection file must be the same one;
        rounds written after it are dropped and chosen again)."""
        self.epoch = int(state["epoch"])
        self.select_seconds = float(state.get("select_seconds", 0.0))
        self.feed.load_state_dict(state["feed"])
        self._reader = None
        identity = state["feed"].get("store")
        if self.save_selections is not None:
            if identity is None:
                raise ValueError("the state records no selection file, but this loader saves one")
            store = SelectionStore.open_for_resume(self.save_selections, identity)
            store.truncate(before_epoch=self.epoch)
            self.feed.store = store

    def close(self) -> None:
        self.data.close()


class LoaderExhausted(RuntimeError):
    """Iterating past the last epoch."""


class _NoModel(nn.Module):
    """Stands in for a missing model: a strategy that needs one gets a clear error."""

    def __init__(self, strategy: str) -> None:
        super().__init__()
        self.strategy = strategy

    def modules(self) -> Iterator[nn.Module]:  # type: ignore[override]
        raise ValueError(f"strategy {self.strategy!r} needs model= (the network you train)")


__all__ = ["LoaderExhausted", "SubsetLoader"]
