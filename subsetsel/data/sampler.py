"""Selection -> the epoch's order of examples, and its shards under torch.distributed.

The order is a seeded permutation of the selection (seed, epoch), the same on every rank and
after a resume; the augmentation seed of the epoch is drawn from the same generator first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subsetsel.selection.base import Selection, round_generator


@dataclass
class EpochOrder:
    """indices: int64 (k,) dataset positions in training order; weights: float32 (k,) theirs;
    aug_seed: seed of the epoch's augmentation."""

    indices: torch.Tensor
    weights: torch.Tensor
    aug_seed: int


def epoch_order(selection: Selection, seed: int, epoch: int) -> EpochOrder:
    """The selection shuffled by (seed, epoch)."""
    generator = round_generator(seed, epoch, salt=3)
    aug_seed = int(torch.randint(2**62, (1,), generator=generator))
    order = torch.randperm(len(selection), generator=generator)
    return EpochOrder(selection.indices[order], selection.weights[order], aug_seed)


def shard(order: EpochOrder, rank: int, world: int) -> EpochOrder:
    """Rank `rank`'s share of an epoch's order under `world` ranks, as DistributedSampler cuts it:
    the order is padded to a multiple of `world` (with copies of its first examples, given
    weight 0, so that they change no weighted loss) and rank r takes positions r, r + world, ...
    Hence every rank has ceil(k / world) examples, and its j-th batch of b holds the rank's
    part of the j-th batch of world * b of one process: N ranks with batch b train like one
    with batch N * b."""
    if world == 1:
        return order
    k = order.indices.numel()
    pad = -k % world
    copies = order.indices.repeat(-(-pad // max(k, 1)))[:pad]
    indices = torch.cat([order.indices, copies])
    weights = torch.cat([order.weights, torch.zeros(pad, dtype=order.weights.dtype)])
    return EpochOrder(indices[rank::world], weights[rank::world], order.aug_seed)
