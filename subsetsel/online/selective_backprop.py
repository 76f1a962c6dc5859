"""Selective-Backprop (Jiang et al. 2019): backpropagate mostly the examples with high loss.

Pure cores (usable from any training loop):
  `percentiles(losses, history)`            fraction of the history strictly below each loss
  `selection_probabilities(losses, history, beta, floor)`  P(select) = max(floor, percentile^beta)
  `LossHistory(capacity)`                   rolling buffer of the most recent losses
  `keep_probabilities(n, keep)` / `keep_rows(losses, keep, generator)`  the in-batch keep variant
  `keep_active(progress, batch_index, start, end, interrupt)`            its schedule

Policies (trainer shells):
  "sb"        forward every example (eval mode, no grad), select with P = percentile^beta,
              accumulate the selected ones into full backward batches of the trainer's batch size,
              flush the remainder at the end of the epoch; the first `warmup_epochs` are plain.
  "stale-sb"  the same with per-example cached losses, keyed by dataset index, reused for
              `staleness` epochs, so examples with a valid cached loss cost no selection forward.
  "sb-keep"   within each batch keep int(keep * B) examples drawn without replacement with
              probability proportional to rank-percentile^(1/keep - 1) (Composer-style), active
              for keep_start <= training progress < keep_end, every `interrupt`-th batch normal.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from subsetsel.online.base import Batch, Policy, register_policy
from subsetsel.selection.base import round_generator

if TYPE_CHECKING:
    from subsetsel.train import BatchSource, Trainer


# ---- pure cores ------------------------------------------------------------------------------
def percentiles(losses: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """float (B,): for each loss, the fraction of `history` (H,) strictly below it (0 if H = 0)."""
    if history.numel() == 0:
        return torch.zeros_like(losses, dtype=torch.float32)
    ordered = torch.sort(history.to(losses.dtype)).values
    below = torch.searchsorted(ordered, losses.contiguous(), side="left")
    return below.to(torch.float32) / float(history.numel())


def selection_probabilities(
    losses: torch.Tensor, history: torch.Tensor, beta: float = 3.0, floor: float = 0.0
) -> torch.Tensor:
    """float (B,) in [floor, 1]: max(floor, percentile(loss)^beta) against `history` (H,).

    With losses i.i.d. like the history, the expected selected share is 1/(beta+1) (a quarter at
    beta = 3) when floor = 0.
    """
    return percentiles(losses, history).pow(beta).clamp_min(floor)


class LossHistory:
    """The `capacity` most recent losses (a ring buffer on one device)."""

    def __init__(self, capacity: int, device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"history must be >= 1, got {capacity}")
        self.buffer = torch.zeros(capacity, device=device)
        self.size = 0
        self.next = 0  # position the next loss is written to

    def push(self, losses: torch.Tensor) -> None:
        """Append losses (B,) in order; the oldest ones fall out."""
        losses = losses.detach().reshape(-1).to(self.buffer)
        capacity = self.buffer.numel()
        if losses.numel() >= capacity:
            self.buffer.copy_(losses[-capacity:])
            self.size, self.next = capacity, 0
            return
        positions = (self.next + torch.arange(losses.numel(), device=self.buffer.device)) % capacity
        self.buffer[positions] = losses
        self.next = (self.next + losses.numel()) % capacity
        self.size = min(capacity, self.size + losses.numel())

    def values(self) -> torch.Tensor:
        """float (size,) the stored losses (order unspecified)."""
        return self.buffer[: self.size]

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.cpu(), "size": self.size, "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = state["buffer"].to(self.buffer.device)
        self.size, self.next = int(state["size"]), int(state["next"])


def keep_probabilities(n: int, keep: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """float (n,): sampling weights by loss rank (0 = smallest loss), summing to 1.

    Rank r gets ((r + 0.5) / n)^(1/keep - 1): keep = 0.5 weighs linearly by rank percentile,
    smaller keep favours the highest losses more sharply, keep = 1 is uniform.
    """
    ranks = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
    weights = ranks.pow(1.0 / keep - 1.0)
    return weights / weights.sum()


def keep_rows(
    losses: torch.Tensor, keep: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """int64 (int(keep * B),) positions of the kept examples of a batch with losses (B,).

    Draws ranks without replacement with `keep_probabilities` and maps them back to positions.
    At least one example is kept.
    """
    n = losses.numel()
    count = max(1, int(keep * n))
    by_rank = torch.argsort(losses)
    probs = keep_probabilities(n, keep, device=losses.device)
    ranks = torch.multinomial(probs, count, replacement=False, generator=generator)
    return by_rank[ranks]


def keep_active(
    progress: float, batch_index: int, start: float, end: float, interrupt: int
) -> bool:
    """Whether the keep variant selects on this batch: start <= progress < end, and the batch is
    not one of every `interrupt`-th (batch_index 0-based; (batch_index + 1) % interrupt == 0 are
    normal batches; interrupt = 0 never interrupts)."""
    if not start <= progress < end:
        return False
    return interrupt <= 0 or (batch_index + 1) % interrupt != 0


class BackwardAccumulator:
    """Collects selected examples; hands them out in full batches of `size`, first in first out."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pending: list[Batch] = []
        self.count = 0

    def add(self, batch: Batch) -> Iterator[Batch]:
        """Add examples; yield every full batch now available."""
        if len(batch):
            self.pending.append(batch)
            self.count += len(batch)
        while self.count >= self.size:
            merged = Batch.cat(self.pending)
            yield merged.take(slice(0, self.size))
            rest = merged.take(slice(self.size, None))
            self.pending = [rest] if len(rest) else []
            self.count = len(rest)

    def flush(self) -> Batch | None:
        """The partial batch left over (None if empty); empties the accumulator."""
        if not self.count:
            return None
        merged = Batch.cat(self.pending)
        self.pending, self.count = [], 0
        return merged


def downscale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Images (B, C, H, W) resized by `scale` (bilinear) for a cheaper selection forward."""
    if scale >= 1.0:
        return x
    if x.dim() != 4:
        raise ValueError(f"--keep-scale < 1 needs image inputs (B, C, H, W), got {tuple(x.shape)}")
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def policy_generator(trainer: Trainer, epoch: int, salt: int) -> torch.Generator:
    """A generator on the trainer's device seeded by (seed, epoch, salt): resumes draw the same."""
    base = round_generator(trainer.config.seed, epoch, salt)
    seed = int(torch.randint(2**62, (1,), generator=base))
    return torch.Generator(device=trainer.device).manual_seed(seed)


# ---- policies --------------------------------------------------------------------------------
@register_policy
@dataclass
class SelectiveBackprop(Policy):
    """Selective-Backprop with an optional per-index loss cache (staleness > 1 = Stale-SB).

    beta: selectivity exponent; history: number of recent losses the percentile is taken against;
    floor: minimum selection probability; staleness: epochs a loss is trusted, counted from the
    epoch it was computed in (1 = recompute every epoch); warmup_epochs: plain epochs first.
    Every loss an example is selected on enters the history before the batch's percentiles are
    taken. The cache also keeps the (pre-step) losses of the backward passes and of warm-up steps.
    """

    name: ClassVar[str] = "sb"
    beta: float = 3.0
    history: int = 1024
    floor: float = 0.0
    staleness: int = 1
    warmup_epochs: int = 1

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"--beta must be >= 0, got {self.beta}")
        if self.history < 1:
            raise ValueError(f"--history must be >= 1, got {self.history}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"--floor must be in [0, 1], got {self.floor}")
        if self.staleness < 1:
            raise ValueError(f"--staleness must be >= 1, got {self.staleness}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        self._losses: LossHistory | None = None
        self._cache_loss: torch.Tensor | None = None  # float (N,) by dataset index
        self._cache_epoch: torch.Tensor | None = None  # int64 (N,) epoch each loss was computed
        self._epoch = 0
        self._stats = [0, 0, 0]  # examples considered, selected, scored from the cache

    @property
    def caching(self) -> bool:
        return self.staleness > 1

    def begin_epoch(self, trainer: Trainer, epoch: int) -> None:
        self._epoch = epoch
        device = trainer.device
        if self._losses is None:
            self._losses = LossHistory(self.history, device)
        self._losses.buffer = self._losses.buffer.to(device)
        if self.caching and self._cache_loss is None:
            n = len(trainer.dataset)
            self._cache_loss = torch.zeros(n, device=device)
            self._cache_epoch = torch.full((n,), -(2**40), dtype=torch.int64, device=device)
        self._generator = policy_generator(trainer, epoch, salt=41)
        self._accumulator = BackwardAccumulator(trainer.config.batch_size)
        self._stats = [0, 0, 0]

    def step(self, trainer: Trainer, batch: Batch) -> None:
        if self._epoch < self.warmup_epochs:
            losses = trainer.train_on(batch)
            self._remember(batch.indices, losses)
            return
        losses, reused = self._losses_for(trainer, batch)
        assert self._losses is not None
        self._losses.push(losses)
        probs = selection_probabilities(losses, self._losses.values(), self.beta, self.floor)
        chosen = torch.rand(probs.shape, generator=self._generator, device=probs.device) < probs
        selected = batch.take(chosen)
        self._stats[0] += len(batch)
        self._stats[1] += len(selected)
        self._stats[2] += reused
        for full in self._accumulator.add(selected):
            self._backprop(trainer, full)

    def end_epoch(self, trainer: Trainer) -> dict[str, Any]:
        rest = self._accumulator.flush()
        if rest is not None:
            self._backprop(trainer, rest)
        if self._epoch < self.warmup_epochs:
            return {}
        considered, selected, reused = self._stats
        extra = {"sb_selected_fraction": selected / max(1, considered)}
        if self.caching:
            extra["sb_reused_fraction"] = reused / max(1, considered)
        return extra

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        if self._losses is not None:
            state["history"] = self._losses.state_dict()
        if self._cache_loss is not None and self._cache_epoch is not None:
            state["cache_loss"] = self._cache_loss.cpu()
            state["cache_epoch"] = self._cache_epoch.cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "history" in state:
            buffer = state["history"]["buffer"]
            self._losses = LossHistory(buffer.numel(), buffer.device)
            self._losses.load_state_dict(state["history"])
        if "cache_loss" in state:
            self._cache_loss = state["cache_loss"]
            self._cache_epoch = state["cache_epoch"]

    # ---- helpers ----------------------------------------------------------------------------
    def _losses_for(self, trainer: Trainer, batch: Batch) -> tuple[torch.Tensor, int]:
        """(losses (B,) of the batch's examples, number of them taken from the cache)."""
        if not self.caching:
            _, losses = trainer.score(batch.x, batch.y)
            return losses, 0
        self._move_cache(trainer.device)
        assert self._cache_loss is not None and self._cache_epoch is not None
        valid = self._cache_epoch[batch.indices] > self._epoch - self.staleness
        stale_rows = torch.nonzero(~valid).squeeze(1)
        if stale_rows.numel():
            _, fresh = trainer.score(batch.x[stale_rows], batch.y[stale_rows])
            self._store(batch.indices[stale_rows], fresh)
        return self._cache_loss[batch.indices], len(batch) - stale_rows.numel()

    def _backprop(self, trainer: Trainer, batch: Batch) -> None:
        losses = trainer.train_on(batch)
        if self.caching:
            self._store(batch.indices, losses)

    def _remember(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        assert self._losses is not None
        self._losses.push(losses)
        if self.caching:
            self._store(indices, losses)

    def _store(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        assert self._cache_loss is not None and self._cache_epoch is not None
        self._move_cache(losses.device)
        self._cache_loss[indices] = losses.to(self._cache_loss.dtype)
        self._cache_epoch[indices] = self._epoch

    def _move_cache(self, device: torch.device) -> None:
        if self._cache_loss is not None and self._cache_loss.device != device:
            self._cache_loss = self._cache_loss.to(device)
            self._cache_epoch = self._cache_epoch.to(device)  # type: ignore[union-attr]


@register_policy
@dataclass
class StaleSelectiveBackprop(SelectiveBackprop):
    """Selective-Backprop reusing each example's cached loss for `staleness` epochs (default 2)."""

    name: ClassVar[str] = "stale-sb"
    staleness: int = 2


@register_policy
@dataclass
class KeepSelectiveBackprop(Policy):
    """In-batch Selective-Backprop (Composer-style).

    keep: share of each batch backpropagated (int(keep * B) examples, at least 1);
    keep_start, keep_end: active while keep_start <= progress < keep_end, progress = completed
    share of all training batches; interrupt: every interrupt-th batch trains normally (0: none);
    keep_scale: resize images by this factor for the selection forward (1: no resizing; the model
    must accept the smaller input).
    """

    name: ClassVar[str] = "sb-keep"
    keep: float = 0.5
    keep_start: float = 0.5
    keep_end: float = 0.9
    interrupt: int = 2
    keep_scale: float = 1.0

    def __post_init__(self) -> None:
        check_keep_params(self.keep, self.keep_start, self.keep_end, self.interrupt)
        if not 0.0 < self.keep_scale <= 1.0:
            raise ValueError(f"--keep-scale must be in (0, 1], got {self.keep_scale}")
        self._schedule = ProgressClock()
        self._selected = [0, 0]

    def begin_epoch(self, trainer: Trainer, epoch: int) -> None:
        if self.keep_scale < 1.0 and trainer.dataset.x_train.dim() != 4:  # fail now, not mid-run
            downscale(trainer.dataset.x_train[:1], self.keep_scale)
        self._schedule.begin_epoch(epoch, trainer.total_epochs)
        self._generator = policy_generator(trainer, epoch, salt=43)
        self._selected = [0, 0]  # batches selected on, batches

    def batches(self, source: BatchSource) -> Iterator[Batch]:
        self._schedule.begin_pass(len(source))
        return iter(source)

    def step(self, trainer: Trainer, batch: Batch) -> None:
        progress, index = self._schedule.tick()
        self._selected[1] += 1
        if not keep_active(progress, index, self.keep_start, self.keep_end, self.interrupt):
            trainer.train_on(batch)
            return
        self._selected[0] += 1
        _, losses = trainer.score(downscale(batch.x, self.keep_scale), batch.y)
        trainer.train_on(batch.take(keep_rows(losses, self.keep, self._generator)))

    def end_epoch(self, trainer: Trainer) -> dict[str, Any]:
        return {"keep_active_fraction": self._selected[0] / max(1, self._selected[1])}


def check_keep_params(keep: float, start: float, end: float, interrupt: int) -> None:
    """ValueError (one line) for an invalid keep share or schedule."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"--keep must be in (0, 1], got {keep}")
    if not 0.0 <= start <= end:
        raise ValueError(f"need 0 <= --keep-start <= --keep-end, got {start} and {end}")
    if interrupt < 0:
        raise ValueError(f"--interrupt must be >= 0, got {interrupt}")


class ProgressClock:
    """Training progress in [0, 1) at each batch: (epoch + batch / batches_per_epoch) / epochs."""

    def __init__(self) -> None:
        self.epoch, self.epochs, self.batches, self.index = 0, 1, 1, 0

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch, self.epochs, self.index = epoch, max(1, epochs), 0

    def begin_pass(self, batches: int) -> None:
        self.batches, self.index = max(1, batches), 0

    def tick(self) -> tuple[float, int]:
        """(progress at the current batch, its 0-based index in the epoch); advances the clock."""
        index = self.index
        self.index += 1
        return (self.epoch + index / self.batches) / self.epochs, index
