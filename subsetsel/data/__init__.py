"""Training data of two kinds behind one interface (`TrainData`): in-memory device tensors
(`TensorData`, the fast path) and any map-style torch Dataset read through a DataLoader
(`TorchData`). `load_dataset` builds either from a name."""

from __future__ import annotations

import torch

from subsetsel import memory
from subsetsel.data.base import Batch, DataError, EpochReader, TrainData
from subsetsel.data.builtin import (
    ARRAY_DATASETS,
    DEFAULT_DATASET,
    DatasetNotFoundError,
    cache_dir,
    load_npz,
)
from subsetsel.data.tensor import TensorData
from subsetsel.data.torch_dataset import TorchData

LOADERS = ("auto", "tensor", "dataloader")
MEMORY_SHARE = 0.5  # "auto" keeps tensors on the device when they take at most this share


def dataset_names() -> list[str]:
    """Every name `load_dataset` accepts (``npz:PATH`` and ``folder:PATH`` stand for paths)."""
    return sorted([*ARRAY_DATASETS.names(), "npz:PATH", "folder:PATH"])


def load_dataset(
    spec: str,
    *,
    root: str | None = None,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    device: str | torch.device = "cpu",
    loader: str = "auto",
    workers: int | None = None,
    image_size: int | None = None,
    labels_only: bool = False,
) -> TrainData:
    """Load a dataset by name as training data delivering batches on `device`.

    root: folder of the torchvision datasets (default ``./data``).
    seed: fixes generation (mnist1d), the digits train/test split and any subsampling.
    train_size, test_size: keep a seeded random subset of this many examples (mnist1d generates
    exactly this many: default 20000 / 2000). Inputs are standardised per channel with the
    statistics of the (subsampled) train split.
    loader: "tensor" (normalised tensors on the device), "dataloader" (host arrays or files read
    through a DataLoader with `workers` processes) or "auto" (tensors when they take at most half
    of the device's free memory; folder: datasets always use the DataLoader).
    image_size: folder: datasets only (see `subsetsel.data.folder`).
    labels_only: the data is wanted for its labels and fingerprint only (folder: datasets then
    decode no image: no normalisation statistics, no transforms).
    """
    spec = spec.strip()
    if loader not in LOADERS:
        raise ValueError(f"unknown --loader {loader!r}; valid: {', '.join(LOADERS)}")
    if workers is not None and workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    for size, what in ((train_size, "--train-size"), (test_size, "--test-size")):
        if size is not None and size < 1:
            raise ValueError(f"{what} must be at least 1, got {size}")
    if spec.startswith("folder:"):
        if loader == "tensor":
            raise ValueError("folder: datasets are read through a DataLoader; drop --loader "
                             "tensor")
        from subsetsel.data.folder import load_folder

        return load_folder(spec, seed=seed, train_size=train_size, test_size=test_size,
                           image_size=image_size, num_workers=workers,
                           transforms=not labels_only).to(device)
    if image_size is not None:
        raise ValueError("--image-size applies to folder: datasets only")
    if spec.startswith("npz:"):
        arrays = load_npz(spec, seed, train_size, test_size)
    else:
        arrays = ARRAY_DATASETS.get(spec.lower())(seed, train_size, test_size, root or "./data")
    if loader == "auto":
        free = memory.free_memory(torch.device(device))
        fits = free is None or arrays.nbytes_as_tensors() <= MEMORY_SHARE * free
        loader = "tensor" if fits else "dataloader"
    if loader == "tensor":
        return arrays.tensors().to(device)
    return arrays.torch_data(workers).to(device)


__all__ = [
    "DEFAULT_DATASET",
    "Batch",
    "DataError",
    "DatasetNotFoundError",
    "EpochReader",
    "LOADERS",
    "TensorData",
    "TorchData",
    "TrainData",
    "cache_dir",
    "dataset_names",
    "load_dataset",
]
