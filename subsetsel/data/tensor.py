"""In-memory tensor data on the training device: the fast path (no DataLoader, no copies).

Batches are gathered by index from device tensors and augmented on the device with vectorised
tensor ops (random crop with zero padding, horizontal flip).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from subsetsel.data.base import (
    Batch,
    DataError,
    EpochReader,
    TrainData,
    check_labels,
    fingerprint_rows,
    strided_rows,
)

AUGMENTATIONS = (None, "crop", "crop-flip")


@dataclass
class TensorData(TrainData):
    """A classification dataset as tensors on one device.

    x_train: float32 (N, *input_shape), normalised; y_train: int64 (N,) in [0, num_classes).
    x_test, y_test: the same for the test split.
    augmentation: None, "crop" (random shift with zero padding) or "crop-flip" (plus a random
    horizontal flip); applied per batch by `augment`, never stored.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augmentation: str | None = None

    def __post_init__(self) -> None:
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"augmentation must be one of {AUGMENTATIONS}, got {self.augmentation!r}"
            )
        if self.augmentation is not None and self.x_train.dim() != 4:
            raise ValueError(f"augmentation {self.augmentation!r} needs (N, C, H, W) images")
        for x, y, split in (
            (self.x_train, self.y_train, "train"),
            (self.x_test, self.y_test, "test"),
        ):
            if x.shape[0] != y.shape[0]:
                raise DataError(f"{split}: {x.shape[0]} inputs but {y.shape[0]} labels")
        if self.x_train.shape[0] == 0:
            raise DataError(f"{self.name}: the training set is empty")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"train inputs {tuple(self.x_train.shape[1:])} and test inputs "
                f"{tuple(self.x_test.shape[1:])} differ in shape"
            )
        if self.num_classes < 1:
            raise DataError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
        check_labels(self.y_train.detach().cpu(), self.num_classes, f"{self.name} train")
        check_labels(self.y_test.detach().cpu(), self.num_classes, f"{self.name} test")

    def __len__(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: str | torch.device) -> TensorData:
        """A copy whose tensors live on `device` (the same tensors if already there)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )

    def labels(self) -> torch.Tensor:
        return self.y_train.detach().to("cpu", torch.int64)

    def test_size(self) -> int:
        return int(self.y_test.shape[0])

    def fingerprint(self) -> str:
        rows = strided_rows(len(self)).to(self.device)
        return fingerprint_rows(tuple(self.x_train.shape), self.num_classes, self.y_train,
                                self.x_train.detach()[rows])

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch (B, C, H, W) on its own device with vectorised tensor ops.

        "crop": zero-pad by `crop_padding(H, W)` pixels (4 for 32x32, 3 for 28x28, 1 for 8x8; zero
        is the channel mean after normalisation) and cut a random H x W window per sample.
        "crop-flip": also mirror each sample left-right with probability 1/2.
        `generator` must live on x's device. Returns x itself when augmentation is None.
        """
        if self.augmentation is None or x.shape[0] == 0:
            return x
        x = random_crop(x, crop_padding(x.shape[-2], x.shape[-1]), generator)
        if self.augmentation == "crop-flip":
            x = random_flip(x, generator)
        return x

    def reader(self, indices: torch.Tensor, weights: torch.Tensor, aug_seed: int,
               read_delay: float = 0.0) -> TensorReader:
        return TensorReader(self, indices, weights, aug_seed, read_delay)

    def eval_batches(self, indices: torch.Tensor | None = None, chunk: int = 1024
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if indices is None:
            for start in range(0, len(self), chunk):
                stop = min(start + chunk, len(self))
                positions = torch.arange(start, stop, device=self.device)
                yield positions, self.x_train[start:stop], self.y_train[start:stop]
            return
        indices = indices.to(self.device)
        for start in range(0, int(indices.numel()), chunk):
            part = indices[start : start + chunk]
            yield part, self.x_train[part], self.y_train[part]

    def test_batches(self, chunk: int = 1024, rank: int = 0, world: int = 1
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.x_test, self.y_test
        if world > 1:
            x, y = x[rank::world], y[rank::world]
        for start in range(0, int(y.shape[0]), chunk):
            yield x[start : start + chunk], y[start : start + chunk]


class TensorReader(EpochReader):
    """Gathers examples from the device tensors; augments on the device."""

    def __init__(self, data: TensorData, indices: torch.Tensor, weights: torch.Tensor,
                 aug_seed: int, read_delay: float) -> None:
        super().__init__(indices.to(data.device), weights.to(data.device))
        self.data = data
        self.read_delay = read_delay
        self.aug_generator = torch.Generator(device=data.device).manual_seed(aug_seed)

    def read(self, plan: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             augment: bool = True) -> Iterator[Batch]:
        for indices, weights in plan:
            if self.read_delay:
                time.sleep(self.read_delay * indices.numel())
            self.fresh += int(indices.numel())
            indices = indices.to(self.data.device)
            raw = Batch(indices, self.data.x_train[indices], self.data.y_train[indices],
                        weights.to(self.data.device))
            yield self.augment(raw) if augment else raw

    def augment(self, batch: Batch) -> Batch:
        return Batch(batch.indices, self.data.augment(batch.x, self.aug_generator), batch.y,
                     batch.w)


def crop_padding(height: int, width: int) -> int:
    """Padding in pixels for a random crop: min(H, W) // 8, at least 1 (32: 4, 28: 3, 8: 1)."""
    return max(1, min(height, width) // 8)


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image (B, C, H, W) by up to `pad` pixels per axis, filling with zeros."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).flatten(2)  # (B, C, (H + 2p) * (W + 2p))
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    flat = rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]  # (B, H, W) positions in padded
    return padded.gather(2, flat.reshape(b, 1, h * w).expand(b, c, h * w)).reshape(b, c, h, w)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image (B, C, H, W) left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
