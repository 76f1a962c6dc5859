"""Baselines that decide whether an online method helps.

"random-keep"  Selective-Backprop's control: a uniformly random int(keep * B) examples of each
               batch (at least 1), no selection forward. `accumulate=True` (default) draws
               candidate batches of round(b / keep) like "sb" (so about b are backpropagated per
               step); `accumulate=False` keeps a share of each batch of b like "sb-keep". The
               same keep_start/keep_end/interrupt schedule as "sb-keep" and the same plain
               warm-up epochs as "sb" apply; inactive candidate batches train in steps of b.
"is-uniform"   Importance sampling's control: the same presample read and resampling of b
               rows with replacement, but with uniform p (weights 1) and hence no scoring
               forward and no τ switch.
Echoing's control is `--policy echo --echo 1` (the same prefetching reader, no repeats).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from subsetsel.data.base import Batch, EpochReader
from subsetsel.online.base import (
    EpochPlan,
    Policy,
    PolicyContext,
    StepBatch,
    register_policy,
    split,
)
from subsetsel.online.importance import ImportanceSampling, TauSwitch
from subsetsel.online.selective_backprop import candidate_size, check_keep_params, keep_active


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

    def plan(self, reader: EpochReader, ctx: PolicyContext) -> EpochPlan:
        b = ctx.batch_size
        if ctx.epoch < self.warmup_epochs:
            return super().plan(reader, ctx)
        size = candidate_size(b, self.keep) if self.accumulate else b
        count = reader.num_batches(size)
        lengths = [min(size, len(reader) - i * size) for i in range(count)]
        active = [self._active(ctx, i, count) for i in range(count)]
        steps = sum(1 if on else -(-n // b) for n, on in zip(lengths, active, strict=True))
        return EpochPlan(steps, self._steps(reader.batches(size), active, ctx))

    def _active(self, ctx: PolicyContext, index: int, count: int) -> bool:
        progress = (ctx.epoch + index / count) / max(1, ctx.epochs)
        return keep_active(progress, index, self.keep_start, self.keep_end, self.interrupt)

    def _steps(self, batches: Iterator[Batch], active: list[bool], ctx: PolicyContext
               ) -> Iterator[StepBatch]:
        generator = ctx.generator(salt=59)
        for batch, on in zip(batches, active, strict=True):
            if not on:
                yield from (StepBatch(part) for part in split(batch, ctx.batch_size))
                continue
            rows = random_rows(len(batch), self.keep, generator, batch.indices.device)
            yield StepBatch(batch.take(rows))


@register_policy
@dataclass
class UniformResample(ImportanceSampling):
    """Importance sampling's machinery with uniform probabilities: always on, no scoring."""

    name: ClassVar[str] = "is-uniform"

    def plan(self, reader: EpochReader, ctx: PolicyContext) -> EpochPlan:
        self.switch = TauSwitch(0.0, self.tau_momentum, 1.0)
        return super().plan(reader, ctx)

    def use_presample(self) -> bool:
        return True

    def _resampled(self, batch: Batch, own: int, generator: torch.Generator,
                   ctx: PolicyContext) -> StepBatch:
        rows = torch.randint(len(batch), (own,), generator=generator, device=generator.device)
        return StepBatch(batch.take(rows.to(batch.indices.device)))
