"""The built-in datasets, by name: ``mnist1d`` (generated offline, cached), ``digits``
(scikit-learn), ``npz:PATH`` (your own arrays), the torchvision datasets ``cifar10``,
``cifar100``, ``mnist``, ``fashionmnist``, ``svhn`` (read from a local root in torchvision's own
folder layout, never downloaded) and ``folder:PATH`` (an ImageFolder, see `subsetsel.data.folder`).
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from subsetsel.atomic import atomic_open
from subsetsel.data.arrays import Arrays
from subsetsel.data.base import DataError
from subsetsel.registry import Registry

DEFAULT_DATASET = "mnist1d"
MNIST1D_TRAIN, MNIST1D_TEST = 20000, 2000
MNIST1D_MAX = 1_000_000  # train + test: the generator makes ~1000 examples a second
_CACHE_FORMAT = 1  # bump when the cached mnist1d arrays change meaning


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they should be; the message says what to put where."""


# name -> loader(seed, train_size, test_size, root) -> Arrays
ARRAY_DATASETS: Registry[Any] = Registry("dataset")


def _generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) % 2**63)


def subsample_rows(n: int, size: int | None, seed: int, salt: int, what: str) -> np.ndarray | None:
    """Sorted positions of a seeded random subset of `size` of n rows (None: keep all)."""
    if size is None or size == n:
        return None
    if size > n:
        raise ValueError(f"{what} {size} exceeds the {n} examples available")
    return torch.randperm(n, generator=_generator(seed, salt))[:size].sort().values.numpy()


def subsample(
    x: np.ndarray, y: np.ndarray, size: int | None, seed: int, salt: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of `size` rows in their original order (all rows for None)."""
    keep = subsample_rows(len(y), size, seed, salt, what)
    return (x, y) if keep is None else (x[keep], y[keep])


# ----------------------------------------------------------------------------------------------
# mnist1d


def cache_dir() -> Path:
    """Folder for generated data: ``$SUBSETSEL_CACHE`` or ``~/.cache/subsetsel``."""
    return Path(os.environ.get("SUBSETSEL_CACHE") or Path.home() / ".cache" / "subsetsel")


def _load_mnist1d(seed: int, train_size: int | None, test_size: int | None) -> Arrays:
    n_train = MNIST1D_TRAIN if train_size is None else train_size
    n_test = MNIST1D_TEST if test_size is None else test_size
    if not 0 <= seed < 2**32:  # the generator seeds numpy
        raise ValueError(f"mnist1d: --data-seed must be in [0, 2**32), got {seed}")
    if n_train + n_test > MNIST1D_MAX:
        raise ValueError(f"mnist1d: --train-size + --test-size must be at most {MNIST1D_MAX:,} "
                         f"(it is generated, ~1000 examples a second), got {n_train + n_test:,}")
    arrays = _mnist1d_arrays(n_train, n_test, seed)
    x, x_test = arrays["x"][:, None, :], arrays["x_test"][:, None, :]  # (N, 1, 40)
    return Arrays("mnist1d", x, arrays["y"], x_test, arrays["y_test"], 10, None)


def _mnist1d_arrays(n_train: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    """Generated float32 signals (N, 40) and int64 labels, from the cache when possible."""
    path = cache_dir() / f"mnist1d-v{_CACHE_FORMAT}-train{n_train}-test{n_test}-seed{seed}.npz"
    keys = ("x", "y", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in keys}
        if arrays["x"].shape == (n_train, 40) and arrays["x_test"].shape == (n_test, 40):
            return arrays
    except Exception:  # absent, truncated or foreign file: regenerate it
        pass
    arrays = _generate_mnist1d(n_train, n_test, seed)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run some seconds
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)
    return arrays


def _generate_mnist1d(n_train: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    """Run the MNIST-1D generator offline without disturbing the global random states.

    Train and test come from one generator call over n_train + n_test examples, so a different
    test size also changes the training examples (the fingerprint records this and replay
    refuses such data). Kept as is: the default benchmark's data, and every measurement made on
    it, depend on this scheme.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    total = n_train + n_test
    args = get_dataset_args()
    args.num_samples = -(-total // 10) * 10  # the generator makes num_samples // 10 per class
    args.train_split = n_train / args.num_samples
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = np.concatenate([raw["x"], raw["x_test"]]).astype(np.float32)
    y = np.concatenate([raw["y"], raw["y_test"]]).astype(np.int64)
    return {
        "x": x[:n_train],
        "y": y[:n_train],
        "x_test": x[n_train:total],
        "y_test": y[n_train:total],
    }


@ARRAY_DATASETS.register("mnist1d")
def _mnist1d(seed: int, train_size: int | None, test_size: int | None, root: str) -> Arrays:
    return _load_mnist1d(seed, train_size, test_size)


# ----------------------------------------------------------------------------------------------
# digits


@ARRAY_DATASETS.register("digits")
def _load_digits(seed: int, train_size: int | None, test_size: int | None, root: str) -> Arrays:
    """scikit-learn's 1797 8x8 digits, (N, 1, 8, 8); stratified 80/20 train/test split by seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    x_tr, y_tr = subsample(x_tr, y_tr, train_size, seed, 1, "--train-size")
    x_te, y_te = subsample(x_te, y_te, test_size, seed, 2, "--test-size")
    return Arrays("digits", x_tr, y_tr, x_te, y_te, 10, None)


# ----------------------------------------------------------------------------------------------
# npz


_NPZ_KEYS = ("x", "y", "x_test", "y_test")


def load_npz(spec: str, seed: int, train_size: int | None, test_size: int | None) -> Arrays:
    """Arrays x, y, x_test, y_test: images (N, H, W), (N, C, H, W) or (N, H, W, C), or (N, D);
    an optional scalar `num_classes` (default: the largest label + 1)."""
    path = Path(spec[len("npz:") :]).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(
            f"npz file not found: {path} (make one with arrays {', '.join(_NPZ_KEYS)})"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            raw = {k: f[k] for k in (*_NPZ_KEYS, "num_classes") if k in f.files}
    except Exception as err:  # zip, pickle or format errors: one clear line instead
        raise DataError(f"{path} is not a readable .npz file ({type(err).__name__})") from None
    missing = [k for k in _NPZ_KEYS if k not in raw]
    if missing:
        raise DataError(
            f"{path} lacks array(s) {', '.join(missing)}; an npz dataset needs "
            f"{', '.join(_NPZ_KEYS)}"
        )
    x, x_test = _npz_inputs(raw["x"], "x"), _npz_inputs(raw["x_test"], "x_test")
    y = _labels(raw["y"], len(x), f"{path}: y")
    y_test = _labels(raw["y_test"], len(x_test), f"{path}: y_test")
    if x.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: x is {x.shape[1:]} per example but x_test is {x_test.shape[1:]}")
    if "num_classes" in raw:
        num_classes = _whole(raw["num_classes"], f"{path}: num_classes")
    else:
        num_classes = int(max(y.max(initial=0), y_test.max(initial=0))) + 1
        if num_classes > len(y) + len(y_test):
            raise DataError(f"{path}: the largest label is {num_classes - 1}, more classes than "
                            f"the {len(y) + len(y_test)} examples; labels must be 0..C-1 (or "
                            "store a num_classes array)")
    x, y = subsample(x, y, train_size, seed, 1, "--train-size")
    x_test, y_test = subsample(x_test, y_test, test_size, seed, 2, "--test-size")
    return Arrays(spec, x, y, x_test, y_test, num_classes, None)


def _whole(value: np.ndarray, where: str) -> int:
    try:
        number = float(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        raise DataError(f"{where} must be one whole number") from None
    if not number.is_integer():
        raise DataError(f"{where} must be a whole number, got {number}")
    return int(number)


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """int64 (n,) class labels; float labels must be whole numbers; all must be >= 0."""
    y = np.asarray(y)
    if y.size != n:
        raise DataError(f"{where}: {n} inputs but {y.size} labels")
    y = y.reshape(-1)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataError(f"{where}: labels must be whole numbers")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        i = int(np.argmin(y))
        raise DataError(f"{where}: labels must be >= 0, got {y[i]} at example {i}")
    return y


def _npz_inputs(x: np.ndarray, key: str) -> np.ndarray:
    """(N, D) or (N, C, H, W) inputs, uint8 kept (scaled later), others as float32;
    channels-last (N, H, W, C<=4) is moved to channels-first."""
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"npz array {key} must be numeric, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] > 4 and x.shape[3] <= 4:
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim not in (2, 4):
        raise DataError(
            f"npz array {key} must be (N, D), (N, H, W) or (N, C, H, W), got {x.shape}"
        )
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------------------------
# torchvision


@dataclass(frozen=True)
class _TorchvisionSpec:
    cls: str  # torchvision.datasets class name
    num_classes: int
    augmentation: str
    folder: str  # path under the root that torchvision reads
    what: str  # what the user must put under the root


_IDX = "holding the 4 unzipped idx files (train-images-idx3-ubyte ...)"
_TORCHVISION: dict[str, _TorchvisionSpec] = {
    "cifar10": _TorchvisionSpec(
        "CIFAR10",
        10,
        "crop-flip",
        "cifar-10-batches-py",
        "the extracted 'cifar-10-batches-py' folder",
    ),
    "cifar100": _TorchvisionSpec(
        "CIFAR100", 100, "crop-flip", "cifar-100-python", "the extracted 'cifar-100-python' folder"
    ),
    "mnist": _TorchvisionSpec("MNIST", 10, "crop", "MNIST/raw", f"'MNIST/raw/' {_IDX}"),
    "fashionmnist": _TorchvisionSpec(
        "FashionMNIST", 10, "crop", "FashionMNIST/raw", f"'FashionMNIST/raw/' {_IDX}"
    ),
    "svhn": _TorchvisionSpec(
        "SVHN", 10, "crop", "train_32x32.mat", "'train_32x32.mat' and 'test_32x32.mat'"
    ),
}


def load_torchvision(name: str, root: str, seed: int, train_size: int | None,
                     test_size: int | None) -> Arrays:
    spec = _TORCHVISION[name]
    x, y = _torchvision_arrays(name, root, train=True)
    x_test, y_test = _torchvision_arrays(name, root, train=False)
    x, y = subsample(x, y, train_size, seed, 1, "--train-size")
    x_test, y_test = subsample(x_test, y_test, test_size, seed, 2, "--test-size")
    return Arrays(name, x, y, x_test, y_test, spec.num_classes, spec.augmentation)


def _register_torchvision(name: str) -> None:
    def load(seed: int, train_size: int | None, test_size: int | None, root: str) -> Arrays:
        return load_torchvision(name, root, seed, train_size, test_size)

    ARRAY_DATASETS.add(name, load)


for _name in _TORCHVISION:
    _register_torchvision(_name)


def _torchvision_arrays(name: str, root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, C, H, W) images and int64 labels straight from the dataset object's arrays."""
    import torchvision.datasets as tvd

    spec = _TORCHVISION[name]
    cls = getattr(tvd, spec.cls)
    kwargs: dict[str, Any] = (
        {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    )
    try:
        ds = cls(root, download=False, **kwargs)
    except ImportError:
        raise
    except Exception as err:  # RuntimeError: absent or failed md5; pickle/zip errors: corrupt
        raise DatasetNotFoundError(_not_found_message(name, root, err)) from None
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    labels = ds.labels if name == "svhn" else ds.targets
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if data.ndim == 3:  # MNIST-style (N, H, W)
        data = data[:, None]
    elif name in ("cifar10", "cifar100"):  # stored (N, H, W, C)
        data = data.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(data), labels.astype(np.int64)


def _not_found_message(name: str, root: str, err: BaseException) -> str:
    """One line saying what to put where; "incomplete or corrupt" when the folder is there."""
    spec = _TORCHVISION[name]
    problem = "not found"
    if (Path(root) / spec.folder).exists():
        problem = f"incomplete or corrupt ({type(err).__name__})"
    return (
        f"{name} {problem} under {root}: put {spec.what} there "
        "(download it yourself; subsetsel never downloads)"
    )


