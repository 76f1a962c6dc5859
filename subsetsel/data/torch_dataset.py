"""Any map-style `torch.utils.data.Dataset` of (input, label) items, read through a DataLoader.

`TorchData(train, test, train_transform=..., eval_transform=...)`: the items of `train` are
decoded examples; the train view applies `train_transform` (augmenting) to them, the eval view
`eval_transform` (deterministic). Without transforms the items are used as they come (then the
eval view equals the train view: pass datasets without random transforms, or give the
transforms here).

Reading: worker processes (`num_workers`, persistent across epochs), pinned memory on CUDA, and
a batch sampler that hands the DataLoader the engine's order batch by batch. Every item's
augmentation is seeded by (epoch seed, dataset index, draw), so an epoch's batches do not depend
on the number of workers, and a resumed run reads what the uninterrupted one did.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from subsetsel.data.base import (
    Batch,
    DataError,
    EpochReader,
    TrainData,
    check_labels,
    fingerprint_rows,
    strided_rows,
)

Transform = Callable[[Any], Any]


def default_workers() -> int:
    """DataLoader worker processes when none are asked for: min(4, CPU cores - 1)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class TorchData(TrainData):
    """Training data from map-style Datasets whose items are (input, label) pairs.

    train, test: the datasets (test optional: no test evaluation without it).
    train_transform, eval_transform: applied to an item's input in the train / eval view.
    num_classes: default `len(train.classes)` when the dataset has `.classes`, else
    max(label) + 1. labels: int64 (N,) training labels, when the dataset exposes none of
    `.targets` / `.labels` (else they are read in one pass over the data).
    num_workers (None: `default_workers()`), pin_memory (None: on CUDA), prefetch_factor: as for
    `DataLoader`; workers persist across epochs.
    """

    def __init__(
        self,
        train: Dataset,
        test: Dataset | None = None,
        *,
        train_transform: Transform | None = None,
        eval_transform: Transform | None = None,
        num_classes: int | None = None,
        labels: Sequence[int] | torch.Tensor | None = None,
        name: str = "dataset",
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        prefetch_factor: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not hasattr(train, "__getitem__") or not hasattr(train, "__len__"):
            raise DataError(f"{name}: a map-style Dataset (with __getitem__ and __len__) is "
                            f"needed, got {type(train).__name__}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"--workers must be >= 0, got {num_workers}")
        self.name = name
        self.train = train
        self.test = test
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.num_workers = default_workers() if num_workers is None else num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self._device = torch.device(device)
        self._n = len(train)
        if self._n == 0:
            raise DataError(f"{name}: the training set is empty")
        self._labels = self._read_labels(labels)
        self.num_classes = int(num_classes if num_classes is not None else self._classes())
        if self.num_classes < 1 or self.num_classes > self._n:
            raise DataError(f"{name}: {self.num_classes} classes for {self._n} examples is not "
                            "plausible; pass num_classes")
        check_labels(self._labels, self.num_classes, f"{name} train")
        self._shape: tuple[int, ...] | None = None
        self._loaders: dict[str, DataLoader] = {}

    # ---- description ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self._shape is None:
            _, x, _ = _ItemView(self.train, self.eval_transform, self.num_classes)[0]
            self._shape = tuple(torch.as_tensor(x).shape)
        return self._shape

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> TorchData:
        if torch.device(device) == self._device:
            return self
        other = copy.copy(self)
        other._device = torch.device(device)
        other._loaders = {}
        return other

    def labels(self) -> torch.Tensor:
        return self._labels

    def test_size(self) -> int:
        return 0 if self.test is None else len(self.test)

    def check_length(self) -> None:
        if len(self.train) != self._n:
            raise DataError(f"{self.name}: the training set changed size from {self._n} to "
                            f"{len(self.train)} examples during the run")

    def fingerprint(self) -> str:
        """Folder datasets (`.samples` of (path, class)): the relative file paths, labels and the
        raw bytes of up to 64 strided files (nothing decoded). Others: `fingerprint_rows` over
        the eval view of ~1000 strided examples, as for tensors, so the same data held as
        tensors and read through a DataLoader have the same fingerprint."""
        samples = _samples(self.train)
        if samples is not None:
            return _folder_fingerprint(samples, self._labels, self.num_classes)
        rows = strided_rows(self._n)
        x = torch.cat([x.cpu() for _, x, _ in self.eval_batches(rows, chunk=256)])
        return fingerprint_rows((self._n, *self.input_shape), self.num_classes, self._labels, x)

    # ---- reading ----------------------------------------------------------------------------
    def reader(self, indices: torch.Tensor, weights: torch.Tensor, aug_seed: int,
               read_delay: float = 0.0) -> TorchReader:
        return TorchReader(self, indices, weights, aug_seed, read_delay)

    def eval_batches(self, indices: torch.Tensor | None = None, chunk: int = 1024
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.arange(self._n) if indices is None else indices.detach().cpu()
        plan = (order[s : s + chunk].tolist() for s in range(0, int(order.numel()), chunk))
        for idx, x, y in self._run("eval", plan):
            yield idx.to(self._device), x, y

    def test_batches(self, chunk: int = 1024, rank: int = 0, world: int = 1
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.test is None:
            return
        mine = list(range(rank, len(self.test), world))
        plan = (mine[s : s + chunk] for s in range(0, len(mine), chunk))
        for _, x, y in self._run("test", plan):
            yield x, y

    def close(self) -> None:
        self._loaders = {}  # persistent workers exit when their DataLoader iterator is dropped

    def _view(self, kind: str) -> Dataset:
        if kind == "train":
            return _ItemView(self.train, self.train_transform, self.num_classes)
        if kind == "raw":
            return _ItemView(self.train, None, self.num_classes)
        if kind == "eval":
            return _ItemView(self.train, self.eval_transform, self.num_classes)
        assert self.test is not None
        return _ItemView(self.test, self.eval_transform, self.num_classes, split="test")

    def _loader(self, kind: str) -> DataLoader:
        """The DataLoader of a view, made once: its batch sampler is re-pointed at each plan."""
        if kind not in self._loaders:
            workers = self.num_workers
            pin = self._device.type == "cuda" if self.pin_memory is None else self.pin_memory
            extra: dict[str, Any] = {}
            if workers:
                extra.update(persistent_workers=True, prefetch_factor=self.prefetch_factor)
            self._loaders[kind] = DataLoader(
                self._view(kind), batch_sampler=_PlanSampler(), num_workers=workers,
                pin_memory=pin, collate_fn=_collate_list if kind == "raw" else _collate,
                **extra,
            )
        return self._loaders[kind]

    def _run(self, kind: str, plan: Iterable[list[Any]]) -> Iterator[tuple[Any, Any, Any]]:
        """Batches (indices, x, y) of `plan` through the `kind` view's DataLoader; x and y on
        the device (x stays a list for raw batches)."""
        loader = self._loader(kind)
        loader.batch_sampler.plan = plan  # type: ignore[union-attr]
        try:
            for idx, x, y in loader:
                if kind != "raw":
                    x = x.to(self._device, non_blocking=True)
                yield idx, x, y.to(self._device, non_blocking=True)
        except DataError:
            raise
        except Exception as err:
            raise DataError(worker_error_line(err)) from None

    # ---- labels -----------------------------------------------------------------------------
    def _read_labels(self, given: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
        """int64 (N,) labels: given, exposed by the dataset, or read in one pass."""
        labels = given if given is not None else _exposed_labels(self.train)
        if labels is None:
            labels = self._scan_labels()
        out = torch.as_tensor(np.asarray(labels)).reshape(-1)
        if out.is_floating_point() or out.dtype == torch.bool:
            raise DataError(f"{self.name}: labels must be integers, got {out.dtype}")
        if out.numel() != self._n:
            raise DataError(f"{self.name}: {out.numel()} labels for {self._n} examples")
        return out.to(torch.int64)

    def _scan_labels(self) -> list[int]:
        """One pass over the raw items, reading only their labels."""
        view = _ItemView(self.train, None, None)
        loader = DataLoader(view, batch_size=512, num_workers=self.num_workers,
                            collate_fn=_collate_labels)
        try:
            return [y for batch in loader for y in batch]
        except DataError:
            raise
        except Exception as err:
            raise DataError(worker_error_line(err)) from None

    def _classes(self) -> int:
        classes = getattr(self.train, "classes", None)
        if isinstance(self.train, Subset):
            classes = getattr(self.train.dataset, "classes", None)
        if classes is not None and len(classes) > int(self._labels.max()):
            return len(classes)
        return int(self._labels.max()) + 1


class TorchReader(EpochReader):
    """Reads an epoch's order through the train view's DataLoader.

    Every plan entry becomes one DataLoader batch; each item carries a seed drawn from the epoch's
    augmentation generator, and its transform runs under that seed (in whichever worker)."""

    def __init__(self, data: TorchData, indices: torch.Tensor, weights: torch.Tensor,
                 aug_seed: int, read_delay: float) -> None:
        super().__init__(indices.cpu(), weights.cpu())
        self.data = data
        self.read_delay = read_delay
        self.generator = torch.Generator().manual_seed(aug_seed)

    def _keys(self, indices: torch.Tensor) -> list[tuple[int, int]]:
        seeds = torch.randint(2**62, (int(indices.numel()),), generator=self.generator)
        return list(zip(indices.tolist(), seeds.tolist(), strict=True))

    def read(self, plan: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             augment: bool = True) -> Iterator[Batch]:
        weights: list[torch.Tensor] = []

        def keys() -> Iterator[list[Any]]:
            for indices, w in plan:
                weights.append(w)
                yield self._keys(indices) if augment else indices.tolist()

        for idx, x, y in self.data._run("train" if augment else "raw", keys()):
            if self.read_delay:
                time.sleep(self.read_delay * len(idx))
            self.fresh += len(idx)
            w = weights.pop(0).to(self.data.device)
            yield Batch(idx.to(self.data.device), x, y, w)

    def augment(self, batch: Batch) -> Batch:
        """Apply the train transform to a raw batch's decoded inputs (in this process)."""
        view = _ItemView(self.data.train, self.data.train_transform, self.data.num_classes)
        keys = self._keys(batch.indices.cpu())
        xs = [view.transform_item(item, seed) for item, (_, seed) in zip(batch.x, keys,
                                                                          strict=True)]
        x = torch.stack([torch.as_tensor(v) for v in xs]).to(self.data.device)
        return Batch(batch.indices, x, batch.y, batch.w)


class _PlanSampler:
    """A batch sampler whose batches are whatever plan it was last pointed at."""

    def __init__(self) -> None:
        self.plan: Iterable[list[Any]] = ()

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.plan)  # a DataLoader may call this twice per epoch: same iterator


class _ItemView(Dataset):
    """Items of `dataset` as (index, input, label), the input through `transform`.

    A key is an index, or (index, seed): the transform then runs with torch's and Python's
    random generators seeded by `seed` (restored afterwards in the main process)."""

    def __init__(self, dataset: Dataset, transform: Transform | None,
                 num_classes: int | None, split: str = "train") -> None:
        self.dataset = dataset
        self.transform = transform
        self.num_classes = num_classes
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[int, Any, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        x, y = self.item(index)
        if seed is not None:
            x = self.transform_item(x, seed)
        elif self.transform is not None:
            x = self.transform(x)
        return index, x, y

    def item(self, index: int) -> tuple[Any, int]:
        try:
            item = self.dataset[index]
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"{self.split} example {index} could not be read: "
                            f"{type(err).__name__}: {_first(err)}") from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{self.split} example {index} is a {type(item).__name__}, not an "
                            "(input, label) pair")
        x, y = item
        try:
            label = int(y)
        except (TypeError, ValueError):
            raise DataError(f"{self.split} example {index}: label {y!r} is not an integer"
                            ) from None
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise DataError(f"{self.split} example {index}: label {label} is outside "
                            f"[0, {self.num_classes})")
        return x, label

    def transform_item(self, x: Any, seed: int) -> Any:
        """`transform(x)` with torch's CPU generator and Python's generator (those torchvision's
        random transforms draw from) seeded by `seed`, both restored afterwards in the main
        process. Only the CPU generator is seeded: `torch.manual_seed` also queues a seeding of
        every accelerator's generators, with a stack trace each time (~1 ms per item)."""
        if self.transform is None:
            return x
        import random

        cpu = torch.default_generator
        if get_worker_info() is not None:  # a worker's generators are its own
            cpu.manual_seed(seed)
            random.seed(seed)
            return self.transform(x)
        torch_state, python_state = cpu.get_state(), random.getstate()
        cpu.manual_seed(seed)
        random.seed(seed)
        try:
            return self.transform(x)
        finally:
            cpu.set_state(torch_state)
            random.setstate(python_state)


def _collate(items: list[tuple[int, Any, int]]) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    idx = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
    try:
        x = torch.stack([torch.as_tensor(x) for _, x, _ in items])
    except (RuntimeError, TypeError) as err:
        raise DataError(f"inputs of examples {idx[:4].tolist()}... cannot be batched (give a "
                        f"transform that makes equal-shape tensors): {_first(err)}") from None
    y = torch.tensor([y for _, _, y in items], dtype=torch.int64)
    return idx, x, y


def _collate_list(items: list[tuple[int, Any, int]]) -> tuple[torch.Tensor, list[Any],
                                                               torch.Tensor]:
    idx = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
    y = torch.tensor([y for _, _, y in items], dtype=torch.int64)
    return idx, [x for _, x, _ in items], y


def _collate_labels(items: list[tuple[int, Any, int]]) -> list[int]:
    return [y for _, _, y in items]


def _first(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def worker_error_line(err: BaseException) -> str:
    """One line for an error raised while reading data, also when a DataLoader worker raised it
    (the worker's message then sits at the end of the re-raised text)."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return f"reading the data failed: {_first(err)}"


def _exposed_labels(dataset: Dataset) -> Any:
    """Labels the dataset exposes without decoding (`.targets`, `.labels`, a Subset's parent)."""
    if isinstance(dataset, Subset):
        parent = _exposed_labels(dataset.dataset)
        if parent is None:
            return None
        return np.asarray(parent)[np.asarray(dataset.indices)]
    for attr in ("targets", "labels"):
        value = getattr(dataset, attr, None)
        if value is not None and not callable(value) and hasattr(value, "__len__"):
            return value
    return None


def _samples(dataset: Dataset) -> list[tuple[str, int]] | None:
    if isinstance(dataset, Subset):
        parent = _samples(dataset.dataset)
        return None if parent is None else [parent[i] for i in dataset.indices]
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], tuple):
        return samples
    return None


def _folder_fingerprint(samples: list[tuple[str, int]], labels: torch.Tensor,
                        num_classes: int) -> str:
    h = hashlib.sha256()
    h.update(repr((len(samples), num_classes)).encode())
    h.update(np.ascontiguousarray(labels.numpy(), dtype="<i8").tobytes())
    root = os.path.commonpath([os.path.dirname(p) for p, _ in samples]) if samples else ""
    for path, _ in samples:
        h.update(os.path.relpath(path, root).encode() + b"\0")
    for i in torch.arange(0, len(samples), max(1, len(samples) // 64))[:64].tolist():
        h.update(hashlib.sha256(Path(samples[i][0]).read_bytes()).digest())
    return h.hexdigest()
