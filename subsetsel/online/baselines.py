"""Baselines that decide whether an online method helps.

"random-keep"  Selective-Backprop's control: a uniformly random int(keep * B) examples of each
               batch (at least 1), no selection forward. `accumulate=True` (default) gathers them
               into full backward batches like "sb"; `accumulate=False` trains on each kept
               sub-batch like "sb-keep". The same keep_start/keep_end/interrupt schedule as
               "sb-keep" and the same plain warm-up epochs as "sb" apply.
"is-uniform"   Importance sampling's control: the same presample read and resampling of b
               rows with replacement, but with uniform p (weights 1) and hence no scoring
               forward and no τ switch.
Echoing's control is `--policy echo --echo 1` (the same prefetching reader, no repeats).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from subsetsel.online.base import Batch, Policy, register_policy
from subsetsel.online.importance import ImportanceSampling, TauSwitch
from subsetsel.online.selective_backprop import (
    BackwardAccumulator,
    ProgressClock,
    check_keep_params,
    keep_active,
    policy_generator,
)

if TYPE_CHECKING:
    from subsetsel.train import BatchSource, Trainer


def random_rows(n: int, keep: float, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 (max(1, int(keep * n)),) distinct positions in [0, n), uniformly at random."""
    count = max(1, int(keep * n))
    return torch.randperm(n, generator=generator, device=device)[:count]


@register_policy
@dataclass
class RandomKeep(Policy):
    """Train on a random share `keep` of each batch (see module doc)."""

    name: ClassVar[str] = "random-keep"
    keep: float = 0.25
    accumulate: bool = True
    keep_start: float = 0.0
    keep_end: float = 1.0
    interrupt: int = 0
    warmup_epochs: int = 1

    def __post_init__(self) -> None:
        check_keep_params(self.keep, self.keep_start, self.keep_end, self.interrupt)
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        self._clock = ProgressClock()
        self._epoch = 0

    def begin_epoch(self, trainer: Trainer, epoch: int) -> None:
        self._epoch = epoch
        self._clock.begin_epoch(epoch, trainer.total_epochs)
        self._generator = policy_generator(trainer, epoch, salt=59)
        self._accumulator = BackwardAccumulator(trainer.config.batch_size)

    def batches(self, source: BatchSource) -> Iterator[Batch]:
        self._clock.begin_pass(len(source))
        return iter(source)

    def step(self, trainer: Trainer, batch: Batch) -> None:
        progress, index = self._clock.tick()
        active = keep_active(progress, index, self.keep_start, self.keep_end, self.interrupt)
        if self._epoch < self.warmup_epochs or not active:
            trainer.train_on(batch)
            return
        kept = batch.take(random_rows(len(batch), self.keep, self._generator, batch.x.device))
        if not self.accumulate:
            trainer.train_on(kept)
            return
        for full in self._accumulator.add(kept):
            trainer.train_on(full)

    def end_epoch(self, trainer: Trainer) -> dict[str, Any]:
        rest = self._accumulator.flush()
        if rest is not None:
            trainer.train_on(rest)
        return {}


@register_policy
@dataclass
class UniformResample(ImportanceSampling):
    """Importance sampling's machinery with uniform probabilities: always on, no scoring."""

    name: ClassVar[str] = "is-uniform"

    def begin_epoch(self, trainer: Trainer, epoch: int) -> None:
        super().begin_epoch(trainer, epoch)
        self.switch = TauSwitch(0.0, self.tau_momentum, 1.0)

    def use_presample(self) -> bool:
        return True

    def step(self, trainer: Trainer, batch: Batch) -> None:
        self._counts[1] += 1
        if len(batch) <= self._own:
            trainer.train_on(batch)
            return
        self._counts[0] += 1
        rows = torch.randint(len(batch), (self._own,), generator=self._generator,
                             device=self._generator.device)
        chosen = batch.take(rows.to(batch.x.device))
        trainer.train_on(chosen)
