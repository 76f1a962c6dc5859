"""Selective-Backprop (Jiang et al. 2019): backpropagate mostly the examples with high loss.

Pure cores (usable from any training loop):
  `percentiles(losses, history)`            fraction of the history strictly below each loss
  `selection_probabilities(losses, history, beta, floor)`  P(select) = max(floor, percentile^beta)
  `LossHistory(capacity)`                   rolling buffer of the most recent losses
  `keep_probabilities(n, keep)` / `keep_rows(losses, keep, generator)`  the in-batch keep variant
  `keep_active(progress, batch_index, start, end, interrupt)`            its schedule
  `expected_share(beta, floor)` / `candidate_size(b, share)`     the candidate batch of a step

Policies (batch-stream transforms):
  "sb"        each step scores a candidate batch of c = round(b / s) examples (s =
              `expected_share(beta, floor)`, 1/4 at beta 3: c = 4b) in one eval-mode no-grad
              forward, selects each with P = percentile^beta against the recent-loss history
              and backpropagates the selected ones (about b, at least one). This replaces the
              paper's accumulation of selected examples into exactly-b backward batches: the
              number of steps of an epoch, ceil(n / c), is then known before it starts (every
              rank of a distributed run takes the same number), while the backward batch size
              varies around b. The first `warmup_epochs` are plain.
  "stale-sb"  the same with per-example cached losses, keyed by dataset index, reused for
              `staleness` epochs, so examples with a valid cached loss cost no selection forward.
  "sb-keep"   within each batch keep int(keep * B) examples drawn without replacement with
              probability proportional to rank-percentile^(1/keep - 1) (Composer-style), active
              for keep_start <= training progress < keep_end, every `interrupt`-th batch normal.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from subsetsel.data.base import Batch, EpochReader
from subsetsel.online.base import (
    EpochPlan,
    Policy,
    PolicyContext,
    StepBatch,
    StepOut,
    register_policy,
)


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
    """The `capacity` most recent losses (a ring buffer on one device). The buffer grows with the
    losses pushed, up to `capacity`, so a huge capacity costs only the memory of what is held."""

    def __init__(self, capacity: int, device: torch.device | str = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"history must be >= 1, got {capacity}")
        self.capacity = capacity
        self.buffer = torch.zeros(min(capacity, 1024), device=device)
        self.size = 0
        self.next = 0  # position the next loss is written to

    def _reserve(self, count: int) -> None:
        """Grow the buffer to hold `count` losses (at most `capacity`). It grows only before it
        first fills, so the losses held are buffer[:size], in order."""
        length = self.buffer.numel()
        if length >= min(count, self.capacity):
            return
        grown = torch.zeros(min(self.capacity, max(count, 2 * length)), device=self.buffer.device)
        grown[: self.size] = self.buffer[: self.size]
        self.buffer = grown

    def push(self, losses: torch.Tensor) -> None:
        """Append losses (B,) in order; the oldest ones fall out."""
        losses = losses.detach().reshape(-1).to(self.buffer)
        self._reserve(self.size + losses.numel())
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


def expected_share(beta: float, floor: float = 0.0) -> float:
    """Expected selected share E[max(floor, U^beta)] for a percentile U uniform on [0, 1]:
    floor^((beta+1)/beta) + (1 - floor^((beta+1)/beta)) / (beta + 1); 1/(beta+1) at floor 0."""
    if beta <= 0:
        return 1.0
    corner = floor ** ((beta + 1.0) / beta)
    return corner + (1.0 - corner) / (beta + 1.0)


def candidate_size(batch_size: int, share: float) -> int:
    """Examples to score per step so that `share` of them make about one backward batch."""
    return max(batch_size, round(batch_size / max(share, 1e-6)))


def downscale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Images (B, C, H, W) resized by `scale` (bilinear) for a cheaper selection forward."""
    if scale >= 1.0:
        return x
    if x.dim() != 4:
        raise ValueError(f"--keep-scale < 1 needs image inputs (B, C, H, W), got {tuple(x.shape)}")
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


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

    def plan(self, reader: EpochReader, ctx: PolicyContext) -> EpochPlan:
        self._epoch = ctx.epoch
        if self._losses is None:
            self._losses = LossHistory(self.history, ctx.device)
        self._losses.buffer = self._losses.buffer.to(ctx.device)
        if self.caching and self._cache_loss is None:
            n = ctx.dataset_size
            self._cache_loss = torch.zeros(n, device=ctx.device)
            self._cache_epoch = torch.full((n,), -(2**40), dtype=torch.int64, device=ctx.device)
        self._stats = [0, 0, 0]
        if ctx.epoch < self.warmup_epochs:
            return super().plan(reader, ctx)
        size = candidate_size(ctx.batch_size, expected_share(self.beta, self.floor))
        return EpochPlan(reader.num_batches(size), self._select(reader.batches(size), ctx))

    def _select(self, candidates: Iterator[Batch], ctx: PolicyContext) -> Iterator[StepBatch]:
        generator = ctx.generator(salt=41)
        assert self._losses is not None
        for batch in candidates:
            losses, reused = self._losses_for(batch, ctx)
            self._losses.push(losses)
            probs = selection_probabilities(losses, self._losses.values(), self.beta, self.floor)
            chosen = torch.rand(probs.shape, generator=generator, device=probs.device) < probs
            # never an empty step: without any pick, the most probable example is taken
            top = torch.arange(len(batch), device=probs.device) == probs.argmax()
            chosen = chosen | (top & ~chosen.any())
            selected = batch.take(chosen)
            self._stats[0] += len(batch)
            self._stats[1] += len(selected)
            self._stats[2] += reused
            yield StepBatch(selected)

    def observe(self, step: StepBatch, out: StepOut) -> None:
        if self._epoch < self.warmup_epochs:
            assert self._losses is not None
            self._losses.push(out.losses)
        if self.caching:
            self._store(step.batch.indices, out.losses)

    def end_epoch(self) -> dict[str, Any]:
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
    def _losses_for(self, batch: Batch, ctx: PolicyContext) -> tuple[torch.Tensor, int]:
        """(losses (B,) of the batch's examples, number of them taken from the cache)."""
        if not self.caching:
            return ctx.score(batch.x, batch.y).losses, 0
        self._move_cache(ctx.device)
        assert self._cache_loss is not None and self._cache_epoch is not None
        valid = self._cache_epoch[batch.indices] > self._epoch - self.staleness
        stale_rows = torch.nonzero(~valid).squeeze(1)
        if stale_rows.numel():
            fresh = ctx.score(batch.x[stale_rows], batch.y[stale_rows]).losses
            self._store(batch.indices[stale_rows], fresh)
        return self._cache_loss[batch.indices], len(batch) - stale_rows.numel()

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
        self._selected = [0, 0]

    def check(self, ctx: PolicyContext) -> None:
        if self.keep_scale < 1.0 and not ctx.image_inputs:
            raise ValueError("--keep-scale < 1 needs image inputs (C, H, W)")

    def plan(self, reader: EpochReader, ctx: PolicyContext) -> EpochPlan:
        self.check(ctx)
        steps = reader.num_batches(ctx.batch_size)
        self._selected = [0, 0]  # batches selected on, batches
        return EpochPlan(steps, self._steps(reader.batches(ctx.batch_size), steps, ctx))

    def _steps(self, batches: Iterator[Batch], steps: int, ctx: PolicyContext
               ) -> Iterator[StepBatch]:
        generator = ctx.generator(salt=43)
        for index, batch in enumerate(batches):
            progress = (ctx.epoch + index / steps) / max(1, ctx.epochs)
            self._selected[1] += 1
            if not keep_active(progress, index, self.keep_start, self.keep_end, self.interrupt):
                yield StepBatch(batch)
                continue
            self._selected[0] += 1
            losses = ctx.score(downscale(batch.x, self.keep_scale), batch.y).losses
            yield StepBatch(batch.take(keep_rows(losses, self.keep, generator)))

    def end_epoch(self) -> dict[str, Any]:
        return {"keep_active_fraction": self._selected[0] / max(1, self._selected[1])}


def check_keep_params(keep: float, start: float, end: float, interrupt: int) -> None:
    """ValueError (one line) for an invalid keep share or schedule."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"--keep must be in (0, 1], got {keep}")
    if not 0.0 <= start <= end:
        raise ValueError(f"need 0 <= --keep-start <= --keep-end, got {start} and {end}")
    if interrupt < 0:
        raise ValueError(f"--interrupt must be >= 0, got {interrupt}")
