"""Dataset registry: every dataset becomes normalised tensors that live on the training device.

Names: ``mnist1d`` (generated offline, cached), ``digits`` (scikit-learn), ``npz:PATH`` (your own
arrays) and the torchvision datasets ``cifar10``, ``cifar100``, ``mnist``, ``fashionmnist``,
``svhn``, read from a local root in torchvision's own folder layout (never downloaded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from subsetsel.errors import UnknownNameError

DEFAULT_DATASET = "mnist1d"
AUGMENTATIONS = (None, "crop", "crop-flip")
MNIST1D_TRAIN, MNIST1D_TEST = 20000, 2000
_CACHE_FORMAT = 1  # bump when the cached mnist1d arrays change meaning


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they should be; the message says what to put where."""


@dataclass
class Dataset:
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
                raise ValueError(f"{split}: {x.shape[0]} inputs but {y.shape[0]} labels")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"train inputs {tuple(self.x_train.shape[1:])} and test inputs "
                f"{tuple(self.x_test.shape[1:])} differ in shape"
            )

    def __len__(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device: str | torch.device) -> Dataset:
        """A copy whose tensors live on `device` (the same object's tensors if already there)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )

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

    def fingerprint(self) -> str:
        """sha256 hex digest identifying the training data, independent of name and device.

        Hashes the train shapes, num_classes, train label bytes and ~1000 evenly strided train
        rows rounded to 4 decimals (as float32 bytes, so CPU and CUDA copies agree). The test split
        does not enter: selections index the train set only.
        """
        h = hashlib.sha256()
        h.update(repr((tuple(self.x_train.shape), tuple(self.y_train.shape))).encode())
        h.update(repr(int(self.num_classes)).encode())
        labels = self.y_train.detach().to("cpu", torch.int64).numpy()
        h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
        n = len(self)
        rows = torch.arange(0, n, max(1, n // 1000), device=self.x_train.device)[:1000]
        sample = self.x_train.detach()[rows].to("cpu", torch.float64)
        sample = torch.round(sample * 1e4) / 1e4 + 0.0  # + 0.0 turns -0.0 into 0.0
        h.update(np.ascontiguousarray(sample.numpy(), dtype="<f4").tobytes())
        return h.hexdigest()

    def split_validation(
        self, fraction: float, seed: int
    ) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
        """Carve a stratified random validation split off the train set.

        Takes round(fraction * n_c) examples of each class c (at least one example overall).
        Returns (dataset with the remaining train examples in their original order, x_val, y_val).
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
        y = self.y_train.detach().cpu()
        val_mask = _stratified_mask(y, fraction, _generator(seed, salt=101))
        if val_mask.all():
            raise ValueError(f"validation fraction {fraction} leaves no training examples")
        keep = torch.nonzero(~val_mask).squeeze(1).to(self.device)
        val = torch.nonzero(val_mask).squeeze(1).to(self.device)
        rest = dataclasses.replace(self, x_train=self.x_train[keep], y_train=self.y_train[keep])
        return rest, self.x_train[val], self.y_train[val]


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


# ----------------------------------------------------------------------------------------------
# Registry


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


def dataset_names() -> list[str]:
    """Every name `load_dataset` accepts (``npz:PATH`` stands for any .npz file)."""
    return sorted(["mnist1d", "digits", "npz:PATH", *_TORCHVISION])


def load_dataset(
    spec: str,
    *,
    root: str | None = None,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Dataset:
    """Load a dataset by name as normalised tensors on `device`.

    root: folder of the torchvision datasets (default ``./data``).
    seed: fixes generation (mnist1d), the digits train/test split and any subsampling.
    train_size, test_size: keep a seeded random subset of this many examples (mnist1d generates
    exactly this many: default 20000 / 2000). Inputs are standardised per channel with the
    statistics of the (subsampled) train split.
    """
    spec = spec.strip()
    for size, what in ((train_size, "train_size"), (test_size, "test_size")):
        if size is not None and size < 1:
            raise ValueError(f"{what} must be at least 1, got {size}")
    if spec.startswith("npz:"):
        dataset = _load_npz(spec, seed, train_size, test_size)
    else:
        name = spec.lower()
        if name == "mnist1d":
            dataset = _load_mnist1d(seed, train_size, test_size)
        elif name == "digits":
            dataset = _load_digits(seed, train_size, test_size)
        elif name in _TORCHVISION:
            dataset = _load_torchvision(name, root or "./data", seed, train_size, test_size)
        else:
            raise UnknownNameError(f"unknown dataset {spec!r}; valid: {', '.join(dataset_names())}")
    return dataset.to(device)


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + salt) % 2**63)


def _stratified_mask(y: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """bool (N,) choosing round(fraction * n_c) random members of each class (>= 1 in total)."""
    n = y.numel()
    perm = torch.randperm(n, generator=gen)
    y_perm = y[perm]
    order = torch.sort(y_perm, stable=True).indices  # groups classes, keeps the random order
    counts = torch.bincount(y, minlength=int(y.max()) + 1 if n else 0)
    starts = torch.cumsum(counts, 0) - counts
    take = torch.round(counts.double() * fraction).long()
    if int(take.sum()) == 0:
        take[torch.argmax(counts)] = 1
    sorted_labels = y_perm[order]
    rank = torch.arange(n) - starts[sorted_labels]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[perm[order[rank < take[sorted_labels]]]] = True
    return mask


def _subsample(
    x: np.ndarray, y: np.ndarray, size: int | None, seed: int, salt: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random subset of `size` rows in their original order (all rows for None)."""
    if size is None or size == len(y):
        return x, y
    if size > len(y):
        raise ValueError(f"{what} {size} exceeds the {len(y)} examples available")
    keep = torch.randperm(len(y), generator=_generator(seed, salt))[:size].sort().values.numpy()
    return x[keep], y[keep]


def _as_images(x: np.ndarray) -> np.ndarray:
    """float32 inputs: uint8 scaled to [0, 1]; other dtypes cast unchanged."""
    out = x.astype(np.float32)  # always a fresh array that later steps may overwrite
    if x.dtype == np.uint8:
        out /= 255.0
    return out


def _channel_stats(x: np.ndarray, rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over every axis but 1, shaped to broadcast against x (float64 sums, computed
    in blocks of `rows` examples so a 50k x 3 x 32 x 32 set needs no float64 copy)."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    count = max(1, x.size // x.shape[1])
    total = sum(x[i : i + rows].sum(axis=axes, dtype=np.float64) for i in range(0, len(x), rows))
    mean = (np.asarray(total) / count).reshape(shape)
    blocks = (np.square(x[i : i + rows] - mean) for i in range(0, len(x), rows))
    var = np.asarray(sum(b.sum(axis=axes) for b in blocks)).reshape(shape) / count
    return mean, np.sqrt(var)


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (x - mean) / std with train statistics per channel (axis 1: image channels, or
    features of (N, D) vectors); constant channels are only centred. Overwrites float32 inputs
    (every caller here passes arrays it owns) to keep one copy of a large dataset in memory."""
    mean, std = _channel_stats(x_train)
    mean32 = mean.astype(np.float32)
    std32 = np.where(std > 1e-8, std, 1.0).astype(np.float32)
    out = []
    for x in (x_train, x_test):
        z = x.astype(np.float32, copy=False)
        z -= mean32
        z /= std32
        out.append(torch.from_numpy(z))
    return out[0], out[1]


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """int64 (n,) class labels; float labels must be whole numbers; all must be >= 0."""
    y = np.asarray(y)
    if y.size != n:
        raise ValueError(f"{where}: {n} inputs but {y.size} labels")
    y = y.reshape(-1)
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError(f"{where}: labels must be whole numbers")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got {y.min()}")
    return y


def _build(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    augmentation: str | None,
) -> Dataset:
    xt, xs = _standardise(x_train, x_test)
    return Dataset(
        name=name,
        x_train=xt,
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=xs,
        y_test=torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64)),
        num_classes=num_classes,
        augmentation=augmentation,
    )


# ----------------------------------------------------------------------------------------------
# mnist1d


def cache_dir() -> Path:
    """Folder for generated data: ``$SUBSETSEL_CACHE`` or ``~/.cache/subsetsel``."""
    return Path(os.environ.get("SUBSETSEL_CACHE") or Path.home() / ".cache" / "subsetsel")


def _load_mnist1d(seed: int, train_size: int | None, test_size: int | None) -> Dataset:
    n_train = MNIST1D_TRAIN if train_size is None else train_size
    n_test = MNIST1D_TEST if test_size is None else test_size
    arrays = _mnist1d_arrays(n_train, n_test, seed)
    x, x_test = arrays["x"][:, None, :], arrays["x_test"][:, None, :]  # (N, 1, 40)
    return _build("mnist1d", x, arrays["y"], x_test, arrays["y_test"], 10, None)


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
        _atomic_savez(path, arrays)
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


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz next to `path` and rename it into place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# digits


def _load_digits(seed: int, train_size: int | None, test_size: int | None) -> Dataset:
    """scikit-learn's 1797 8x8 digits, (N, 1, 8, 8); stratified 80/20 train/test split by seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    x_tr, y_tr = _subsample(x_tr, y_tr, train_size, seed, 1, "train_size")
    x_te, y_te = _subsample(x_te, y_te, test_size, seed, 2, "test_size")
    return _build("digits", x_tr, y_tr, x_te, y_te, 10, None)


# ----------------------------------------------------------------------------------------------
# npz


_NPZ_KEYS = ("x", "y", "x_test", "y_test")


def _load_npz(spec: str, seed: int, train_size: int | None, test_size: int | None) -> Dataset:
    """Arrays x, y, x_test, y_test: images (N, H, W), (N, C, H, W) or (N, H, W, C), or (N, D)."""
    path = Path(spec[len("npz:") :]).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(
            f"npz file not found: {path} (make one with arrays {', '.join(_NPZ_KEYS)})"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            raw = {k: f[k] for k in _NPZ_KEYS if k in f.files}
    except Exception as err:  # zip, pickle or format errors: one clear line instead
        raise ValueError(f"{path} is not a readable .npz file ({type(err).__name__})") from None
    missing = [k for k in _NPZ_KEYS if k not in raw]
    if missing:
        raise ValueError(
            f"{path} lacks array(s) {', '.join(missing)}; an npz dataset needs "
            f"{', '.join(_NPZ_KEYS)}"
        )
    x, x_test = _npz_inputs(raw["x"], "x"), _npz_inputs(raw["x_test"], "x_test")
    y = _labels(raw["y"], len(x), f"{path}: y")
    y_test = _labels(raw["y_test"], len(x_test), f"{path}: y_test")
    if x.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{path}: x is {x.shape[1:]} per example but x_test is {x_test.shape[1:]}")
    num_classes = int(max(y.max(initial=0), y_test.max(initial=0))) + 1
    x, y = _subsample(x, y, train_size, seed, 1, "train_size")
    x_test, y_test = _subsample(x_test, y_test, test_size, seed, 2, "test_size")
    return _build(spec, x, y, x_test, y_test, num_classes, None)


def _npz_inputs(x: np.ndarray, key: str) -> np.ndarray:
    """float32 (N, D) or (N, C, H, W); channels-last (N, H, W, C<=4) is moved to channels-first."""
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"npz array {key} must be numeric, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] > 4 and x.shape[3] <= 4:
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim not in (2, 4):
        raise ValueError(
            f"npz array {key} must be (N, D), (N, H, W) or (N, C, H, W), got {x.shape}"
        )
    return np.ascontiguousarray(_as_images(x))


# ----------------------------------------------------------------------------------------------
# torchvision


def _load_torchvision(
    name: str, root: str, seed: int, train_size: int | None, test_size: int | None
) -> Dataset:
    spec = _TORCHVISION[name]
    x, y = _torchvision_arrays(name, root, train=True)
    x_test, y_test = _torchvision_arrays(name, root, train=False)
    x, y = _subsample(x, y, train_size, seed, 1, "train_size")
    x_test, y_test = _subsample(x_test, y_test, test_size, seed, 2, "test_size")
    return _build(
        name, _as_images(x), y, _as_images(x_test), y_test, spec.num_classes, spec.augmentation
    )


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


__all__ = [
    "DEFAULT_DATASET",
    "Dataset",
    "DatasetNotFoundError",
    "UnknownNameError",
    "cache_dir",
    "dataset_names",
    "load_dataset",
]
