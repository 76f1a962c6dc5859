"""InfoBatch: lossless dynamic data pruning (Qin et al., ICLR 2024), as a selection strategy.

Every epoch e < stop = floor(delta * E + 1/2) (E epochs in the run), with each example's most
recent training loss l_i (recorded from the training forward, `LossRecord`; no extra pass):

- "well-learned" examples, l_i < mean of the recorded losses, are dropped at random, each with
  probability r (`prune_ratio`); those kept get weight 1 / (1 - r), so the expected gradient of
  the epoch is the full-data one;
- every other example, and every example without a recorded loss yet, is kept with weight 1.

From epoch `stop` on (the last 1 - delta of the run) every example is kept with weight 1
(annealing). The step loss is mean(w * l) over the batch (the reference's normalisation,
`Strategy.mean_loss`), so an epoch's expected total update equals the full-data epoch's
although it takes fewer steps. Each epoch's kept set is one `Selection` (stored in the
selection file, hence replayable; a replay trains with the same normalisation). The draw uses
`round_generator(seed, round, salt)` on the CPU, the same on every rank; under
torch.distributed the ranks' losses are combined before it (`LossRecord.flush`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from subsetsel.selection.base import (
    Selection,
    SelectionContext,
    Strategy,
    register_strategy,
    round_generator,
)

SALT = 13


def prune_stop(delta: float, epochs: int) -> int:
    """The first full-data (annealing) epoch: floor(delta * epochs + 1/2) (rounded half up)."""
    return min(epochs, int(math.floor(delta * epochs + 0.5)))


def infobatch_prune(losses: torch.Tensor, prune_ratio: float, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruning rule on a loss vector: (kept indices int64 (k,), their weights float32 (k,)).

    losses: float (N,), NaN for an example never seen (kept, weight 1). Examples below the mean
    of the finite losses are dropped with probability `prune_ratio` (one uniform draw per
    example from `generator`, a CPU generator); the kept ones among them get weight
    1 / (1 - prune_ratio). Expected kept count: N - prune_ratio * #(below the mean)."""
    losses = losses.detach().to("cpu", torch.float32).reshape(-1)
    n = losses.numel()
    draws = torch.rand(n, generator=generator)  # drawn for every example: rank/seed-stable
    seen = torch.isfinite(losses)
    if not bool(seen.any()) or prune_ratio <= 0.0:
        return torch.arange(n), torch.ones(n)
    mean = losses[seen].mean()
    well = seen & (losses < mean)
    keep = ~(well & (draws < prune_ratio))
    weights = torch.where(well, torch.tensor(1.0 / (1.0 - prune_ratio)), torch.tensor(1.0))
    indices = torch.nonzero(keep).squeeze(1)
    return indices, weights[indices].float()


@register_strategy
@dataclass
class InfoBatch(Strategy):
    """Lossless dynamic pruning (module docstring): selects every epoch from the losses of the
    previous one; the last 1 - delta of the epochs train on the full data."""

    name = "infobatch"
    mean_loss = True  # the reference's (w * l).mean(): the expected epoch update is full data's
    fixed = {"select_every": 1, "fraction": 1.0, "warm_start": 0.0}
    fixed_reason = ("it selects every epoch from the last training losses (its kept share "
                    "follows from --prune-ratio; --select-every 1, --fraction 1, no warm start)")

    prune_ratio: float = field(default=0.5, metadata={
        "help": "probability of dropping an example whose last training loss is below the "
                "epoch's mean; kept ones get weight 1/(1-r); in [0, 1)."})
    delta: float = field(default=0.875, metadata={
        "help": "prune in epochs e < round(delta*epochs); the rest train on the full data; "
                "in (0, 1]."})

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("prune_ratio", "delta"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"--{key.replace('_', '-')} must be a finite number, "
                                 f"got {value}")
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"--prune-ratio must be in [0, 1), got {self.prune_ratio}")
        if not 0.0 < self.delta <= 1.0:
            raise ValueError(f"--delta must be in (0, 1], got {self.delta}")

    def stop(self, epochs: int | None) -> int:
        if epochs is None:
            raise ValueError("strategy 'infobatch' needs the run's number of epochs (its "
                             "full-data tail starts at delta * epochs)")
        return prune_stop(self.delta, epochs)

    def wants_losses(self, epoch: int, epochs: int | None) -> bool:
        """The losses of epoch e feed the draw of epoch e + 1, if that one prunes."""
        return epoch + 1 < self.stop(epochs)

    def select(self, ctx: SelectionContext) -> Selection:
        n = len(ctx.dataset)
        if ctx.epoch >= self.stop(ctx.epochs) or ctx.losses is None:
            return Selection.full(n, epoch=ctx.epoch)
        gen = round_generator(self.seed, ctx.round_index, salt=SALT)
        indices, weights = infobatch_prune(ctx.losses.values, self.prune_ratio, gen)
        return Selection(indices, weights, epoch=ctx.epoch)


__all__ = ["InfoBatch", "infobatch_prune", "prune_stop"]
