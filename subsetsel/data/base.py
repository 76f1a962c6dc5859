"""The interface every kind of training data gives the engine, and the batches it yields.

Two kinds implement it: `TensorData` (in-memory tensors on the training device, the fast path)
and `TorchData` (any map-style `torch.utils.data.Dataset` read through a `DataLoader`). The
engine, the strategies and the policies only use what is declared here.
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Batch:
    """A mini-batch on the training device.

    indices: int64 (B,) positions in the training set; x: inputs (B, *input_shape) (augmented
    unless the reader says otherwise), or a list of B decoded items (raw batches of a DataLoader
    source, before their transform); y: int64 (B,) labels; w: float32 (B,) selection weights.
    """

    indices: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def take(self, rows: torch.Tensor | slice) -> Batch:
        """The sub-batch at positions `rows` (int64 or bool tensor on the batch's device, or a
        slice)."""
        x = self.x
        if isinstance(x, list):
            x = x[rows] if isinstance(rows, slice) else [x[i] for i in _positions(rows)]
        else:
            x = x[rows]
        return Batch(self.indices[rows], x, self.y[rows], self.w[rows])

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        if batches and isinstance(batches[0].x, list):
            x: Any = [item for b in batches for item in b.x]
        else:
            x = torch.cat([b.x for b in batches])
        return Batch(torch.cat([b.indices for b in batches]), x,
                     torch.cat([b.y for b in batches]), torch.cat([b.w for b in batches]))


def _positions(rows: torch.Tensor) -> list[int]:
    if rows.dtype == torch.bool:
        rows = torch.nonzero(rows).squeeze(1)
    return rows.tolist()


class EpochReader(ABC):
    """Reads the examples of one epoch's order (dataset positions with their weights).

    `fresh` counts examples read from the source so far (echoed copies are not fresh).
    Batches are split from the order in sequence: `batches(size)` yields ceil(n / size) of
    them, the last one smaller.
    """

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor) -> None:
        self.indices = indices  # int64 (n,) dataset positions, CPU, in training order
        self.weights = weights  # float32 (n,), CPU
        self.fresh = 0

    def __len__(self) -> int:
        return int(self.indices.numel())

    def num_batches(self, size: int) -> int:
        return -(-len(self) // size)

    def window(self, start: int, stop: int) -> EpochReader:
        """A reader over positions [start, stop) of this order that draws from the same
        augmentation state (a one-pass stream cut into periods); its `fresh` starts at 0."""
        part = copy.copy(self)
        part.indices, part.weights = self.indices[start:stop], self.weights[start:stop]
        part.fresh = 0
        return part

    def spans(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices, weights) of consecutive blocks of `size` of the order."""
        for start in range(0, len(self), size):
            yield self.indices[start : start + size], self.weights[start : start + size]

    def batches(self, size: int) -> Iterator[Batch]:
        """Augmented training batches of `size` in order."""
        return self.read(self.spans(size))

    def raw_batches(self, size: int) -> Iterator[Batch]:
        """Un-augmented batches of `size` in order (pass them through `augment` to train)."""
        return self.read(self.spans(size), augment=False)

    @abstractmethod
    def read(self, plan: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             augment: bool = True) -> Iterator[Batch]:
        """One batch per (indices, weights) pair of `plan` (consumed lazily, in order)."""

    @abstractmethod
    def augment(self, batch: Batch) -> Batch:
        """The training augmentation applied to an un-augmented batch (each call draws anew)."""


class TrainData(ABC):
    """Training (and test) data of one classification task, of whatever kind.

    Every kind gives: the number of examples, the labels without decoding inputs where possible,
    a train view (augmenting, through `reader`), an eval view (deterministic, through
    `eval_batches`, used by every selection and scoring forward), the test split, and a
    fingerprint that identifies the training examples.
    """

    name: str
    num_classes: int

    @abstractmethod
    def __len__(self) -> int: ...

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one training input after the eval transforms (no batch dimension)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where batches are delivered."""

    @abstractmethod
    def to(self, device: str | torch.device) -> TrainData:
        """This data delivering batches on `device`."""

    @abstractmethod
    def labels(self) -> torch.Tensor:
        """int64 (N,) training labels on the CPU, in [0, num_classes)."""

    @abstractmethod
    def test_size(self) -> int: ...

    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex digest identifying the training examples (see `fingerprint_rows`)."""

    @abstractmethod
    def reader(self, indices: torch.Tensor, weights: torch.Tensor, aug_seed: int,
               read_delay: float = 0.0) -> EpochReader:
        """An `EpochReader` over the given order; `aug_seed` fixes the epoch's augmentation;
        `read_delay` (seconds per example read) simulates a slow source."""

    @abstractmethod
    def eval_batches(self, indices: torch.Tensor | None = None, chunk: int = 1024
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(indices (m,), x (m, ...), y (m,)) on the device, eval view, in chunks of `chunk`,
        over `indices` (default: every training example in order)."""

    @abstractmethod
    def test_batches(self, chunk: int = 1024, rank: int = 0, world: int = 1
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of the test split on the device, eval view, in chunks; under torch.distributed
        rank r reads test examples r, r + world, ... (the sums over ranks cover the split)."""

    def check_length(self) -> None:  # noqa: B027 - nothing to check for fixed-size data
        """Raise DataError when the underlying data changed size since it was opened."""

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release worker processes and other resources (idempotent)."""


class DataError(ValueError):
    """The training data is unusable (bad items, labels, shapes or values): one line."""


def check_labels(y: torch.Tensor, num_classes: int, where: str) -> None:
    """DataError unless every label lies in [0, num_classes); names the first bad index."""
    if y.numel() == 0:
        return
    bad = torch.nonzero((y < 0) | (y >= num_classes))
    if bad.numel():
        i = int(bad[0, 0])
        raise DataError(
            f"{where}: label {int(y[i])} of example {i} is outside [0, {num_classes}) "
            f"({bad.shape[0]} such labels)"
        )


def check_finite(x: torch.Tensor, where: str) -> None:
    """DataError when x holds NaN or infinite values: their count and the first example."""
    if x.is_floating_point():
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1) if x.dim() > 1 else x)
        if bool(bad.any()):
            rows = bad.reshape(bad.shape[0], -1).any(1) if bad.dim() > 1 else bad
            first = int(torch.nonzero(rows)[0, 0])
            raise DataError(
                f"{where}: {int(bad.sum())} non-finite values (NaN or inf), first in example "
                f"{first}"
            )


def fingerprint_rows(shape: tuple[int, ...], num_classes: int, labels: torch.Tensor,
                     rows: torch.Tensor) -> str:
    """The fingerprint both kinds of data share: sha256 of the train shape (N, *input_shape),
    num_classes, the label bytes, and ~1000 evenly strided eval-view inputs rounded to 4 decimals
    as float32 bytes (so CPU and CUDA copies agree). `rows` must be those inputs, i.e. the
    examples at `strided_rows(N)`."""
    h = hashlib.sha256()
    h.update(repr((tuple(shape), (int(shape[0]),))).encode())
    h.update(repr(int(num_classes)).encode())
    h.update(np.ascontiguousarray(labels.to("cpu", torch.int64).numpy(), dtype="<i8").tobytes())
    sample = rows.detach().to("cpu", torch.float64)
    sample = torch.round(sample * 1e4) / 1e4 + 0.0  # + 0.0 turns -0.0 into 0.0
    h.update(np.ascontiguousarray(sample.numpy(), dtype="<f4").tobytes())
    return h.hexdigest()


def strided_rows(n: int) -> torch.Tensor:
    """int64 positions of the (at most 1000) evenly strided examples the fingerprint reads."""
    return torch.arange(0, n, max(1, n // 1000))[:1000]
