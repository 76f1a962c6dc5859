"""Model-free strategies: Full, Random (a new uniform subset each round) and RandomPB."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subsetsel.selection.base import (
    Selection,
    SelectionContext,
    Strategy,
    budget,
    fixed_partition,
    register_strategy,
    round_generator,
    whole_batches,
)


@register_strategy
@dataclass
class Full(Strategy):
    """Every training example with weight 1: the reference other methods are timed against."""

    name = "full"

    def select(self, ctx: SelectionContext) -> Selection:
        return Selection.full(len(ctx.dataset), epoch=ctx.epoch)


@register_strategy
@dataclass
class Random(Strategy):
    """A fresh uniform subset of round(fraction*N) examples each round, weight 1."""

    name = "random"

    def select(self, ctx: SelectionContext) -> Selection:
        n = len(ctx.dataset)
        k = budget(self.fraction, n)
        gen = round_generator(self.seed, ctx.round_index, salt=1)
        indices = torch.randperm(n, generator=gen)[:k].sort().values
        return Selection(indices, torch.ones(k), epoch=ctx.epoch)


@register_strategy
@dataclass
class RandomPB(Strategy):
    """Random whole mini-batches of a fixed, seeded partition of the training set.

    The partition (batches of the trainer's batch size) is drawn once from the seed; each round
    picks ceil(round(fraction*N) / batch_size) batches uniformly without replacement, weight 1.
    """

    name = "randompb"

    def select(self, ctx: SelectionContext) -> Selection:
        n = len(ctx.dataset)
        batches = fixed_partition(n, ctx.batch_size, self.seed)
        m = whole_batches(budget(self.fraction, n), len(batches), ctx.batch_size, n,
                          self.fraction, self.name)
        gen = round_generator(self.seed, ctx.round_index, salt=2)
        chosen = torch.randperm(len(batches), generator=gen)[:m].sort().values
        indices = torch.cat([batches[b] for b in chosen.tolist()])
        return Selection(indices, torch.ones(indices.numel()), epoch=ctx.epoch, batch_ids=chosen)
