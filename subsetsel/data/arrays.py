"""Datasets that arrive as arrays (MNIST-1D, digits, npz, torchvision roots) and how they become
either kind of training data: standardised device tensors (`TensorData`) or uint8/float host
arrays read through a DataLoader with per-example transforms (`TorchData`). Both kinds give the
same eval-view values, bit for bit, and hence the same fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from subsetsel.data.base import DataError
from subsetsel.data.tensor import TensorData, crop_padding

if TYPE_CHECKING:
    from subsetsel.data.torch_dataset import TorchData


@dataclass
class Arrays:
    """A dataset as host arrays: x (N, ...) uint8 images or float32 values, y int64 (N,);
    the same for the test split; augmentation as for `TensorData`."""

    name: str
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    augmentation: str | None = None

    def __post_init__(self) -> None:
        for x, y, split in ((self.x, self.y, "train"), (self.x_test, self.y_test, "test")):
            if len(x) != len(y):
                raise DataError(f"{self.name} {split}: {len(x)} inputs but {len(y)} labels")
            if len(x) == 0:
                raise DataError(f"{self.name}: the {split} set is empty")
            if np.issubdtype(x.dtype, np.floating):
                bad = ~np.isfinite(x.reshape(len(x), -1))
                if bad.any():
                    first = int(np.flatnonzero(bad.any(1))[0])
                    raise DataError(f"{self.name} {split}: {int(bad.sum())} non-finite values "
                                    f"(NaN or inf), first in example {first}")
        if self.x.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"{self.name}: train inputs {self.x.shape[1:]} and test inputs "
                            f"{self.x_test.shape[1:]} differ in shape")
        total = len(self.y) + len(self.y_test)
        if not 1 <= self.num_classes <= total:
            raise DataError(f"{self.name}: {self.num_classes} classes for {total} examples is not "
                            "plausible (labels must lie in [0, number of classes))")
        for y, split in ((self.y, "train"), (self.y_test, "test")):
            if y.min() < 0 or y.max() >= self.num_classes:
                i = int(np.flatnonzero((y < 0) | (y >= self.num_classes))[0])
                raise DataError(f"{self.name} {split}: label {int(y[i])} of example {i} is "
                                f"outside [0, {self.num_classes})")

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 per-channel (axis 1) mean and std of the train inputs as images in [0, 1],
        shaped to broadcast against one example (constant channels get std 1)."""
        mean, std = channel_stats(self.x)
        return mean[0].astype(np.float32), np.where(std > 1e-8, std, 1.0)[0].astype(np.float32)

    def tensors(self) -> TensorData:
        """Standardised float32 tensors (the fast path), on the CPU."""
        mean, std = self.stats()
        return TensorData(self.name, _standardised(self.x, mean, std),
                          torch.from_numpy(np.ascontiguousarray(self.y, dtype=np.int64)),
                          _standardised(self.x_test, mean, std),
                          torch.from_numpy(np.ascontiguousarray(self.y_test, dtype=np.int64)),
                          self.num_classes, self.augmentation)

    def torch_data(self, num_workers: int | None = None) -> TorchData:
        """The host arrays read through a DataLoader: each example is scaled, standardised and
        (train view) augmented by per-example transforms in the workers."""
        from subsetsel.data.torch_dataset import TorchData

        mean, std = self.stats()
        scale = Standardise(mean, std)
        train_tf = scale if self.augmentation is None else Compose2(
            scale, PerExampleAugment(self.augmentation))
        return TorchData(ArrayItems(self.x, self.y), ArrayItems(self.x_test, self.y_test),
                         train_transform=train_tf, eval_transform=scale,
                         num_classes=self.num_classes, labels=torch.from_numpy(self.y),
                         name=self.name, num_workers=num_workers)

    def nbytes_as_tensors(self) -> int:
        """float32 bytes of the train and test inputs as tensors."""
        return 4 * (self.x.size + self.x_test.size)


class ArrayItems(torch.utils.data.Dataset):
    """(x[i], y[i]) items of host arrays; `targets` exposes the labels without decoding."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.targets = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.x[index], int(self.targets[index])


class Standardise:
    """Array example -> float32 tensor: uint8 scaled to [0, 1], then (x - mean) / std."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean, self.std = mean, std

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        z = as_images(np.asarray(x)[None])[0]
        z -= self.mean
        z /= self.std
        return torch.from_numpy(z)


class PerExampleAugment:
    """The tensor path's augmentation for one (C, H, W) example, drawn from torch's generator:
    "crop" pads with zeros by `crop_padding` and cuts a random window; "crop-flip" also mirrors
    left-right with probability 1/2."""

    def __init__(self, augmentation: str) -> None:
        self.augmentation = augmentation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from subsetsel.data.tensor import random_crop, random_flip

        gen = torch.default_generator
        out = random_crop(x[None], crop_padding(x.shape[-2], x.shape[-1]), gen)
        if self.augmentation == "crop-flip":
            out = random_flip(out, gen)
        return out[0]


class Compose2:
    """first, then second."""

    def __init__(self, first: object, second: object) -> None:
        self.first, self.second = first, second

    def __call__(self, x: object) -> object:
        return self.second(self.first(x))  # type: ignore[operator]


def as_images(x: np.ndarray) -> np.ndarray:
    """float32 inputs: uint8 scaled to [0, 1]; other dtypes cast unchanged (always a copy)."""
    out = x.astype(np.float32)
    if x.dtype == np.uint8:
        out /= 255.0
    return out


def channel_stats(x: np.ndarray, rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over every axis but 1 of `as_images(x)`, shaped to broadcast against x
    (float64 sums over blocks of `rows` examples: a 50k x 3 x 32 x 32 uint8 set is never held
    as floats)."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    count = max(1, x.size // x.shape[1])
    blocks = range(0, len(x), rows)
    total = sum(as_images(x[i : i + rows]).sum(axis=axes, dtype=np.float64) for i in blocks)
    mean = (np.asarray(total) / count).reshape(shape)
    var = sum(np.square(as_images(x[i : i + rows]) - mean).sum(axis=axes) for i in blocks)
    return mean, np.sqrt(np.asarray(var).reshape(shape) / count)


def _standardised(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    z = as_images(x)
    z -= mean
    z /= std
    return torch.from_numpy(z)

