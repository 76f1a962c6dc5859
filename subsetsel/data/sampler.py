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
