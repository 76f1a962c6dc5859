"""Dataset registry: generated, bundled, npz and torchvision-format data; augmentation; hashing."""

from __future__ import annotations

import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from subsetsel.data import (
    DEFAULT_DATASET,
    DatasetNotFoundError,
    TensorData,
    builtin,
    dataset_names,
    load_dataset,
)
from subsetsel.data import tensor as data
from subsetsel.errors import UnknownNameError


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SUBSETSEL_CACHE", str(cache))
    return cache


def _image_dataset(augmentation: str | None, n: int = 16, side: int = 32) -> TensorData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, side, side, generator=g)
    y = torch.arange(n) % 10
    return TensorData("toy", x, y, x[:4].clone(), y[:4].clone(), 10, augmentation)


# ----------------------------------------------------------------------------------------------
# Registry


def test_names() -> None:
    assert dataset_names() == [
        "cifar10",
        "cifar100",
        "digits",
        "fashionmnist",
        "folder:PATH",
        "mnist",
        "mnist1d",
        "npz:PATH",
        "svhn",
    ]
    assert DEFAULT_DATASET == "mnist1d"


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="cifar10.*mnist1d.*svhn"):
        load_dataset("imagenet")
    assert issubclass(UnknownNameError, ValueError)


def test_sizes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="--train-size must be at least 1"):
        load_dataset("digits", train_size=0)
    with pytest.raises(ValueError, match="--test-size 99999 exceeds the"):
        load_dataset("digits", test_size=99_999)


# ----------------------------------------------------------------------------------------------
# mnist1d


def test_mnist1d_shapes_and_determinism(_cache: Path) -> None:
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    a = load_dataset("mnist1d", train_size=500, test_size=100, seed=3)
    assert np.array_equal(np.random.get_state()[1], np_state), "global numpy RNG was disturbed"
    assert random.getstate() == py_state
    assert a.name == "mnist1d" and len(a) == 500 and a.input_shape == (1, 40)
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.int64
    assert a.x_test.shape == (100, 1, 40) and a.y_test.shape == (100,)
    assert a.num_classes == 10 and a.augmentation is None
    assert set(a.y_train.tolist()) == set(range(10))
    assert abs(a.x_train.mean().item()) < 1e-4 and abs(a.x_train.std().item() - 1) < 1e-2

    files = list(_cache.glob("mnist1d-*.npz"))
    assert len(files) == 1
    files[0].unlink()  # regenerate from scratch: same data
    b = load_dataset("mnist1d", train_size=500, test_size=100, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = load_dataset("mnist1d", train_size=500, test_size=100, seed=4)
    assert not torch.equal(a.x_train, c.x_train)


def test_mnist1d_cache_hit_and_corrupt_file(_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = load_dataset("mnist1d", train_size=200, test_size=50, seed=0)
    (path,) = _cache.glob("mnist1d-*.npz")
    assert not list(_cache.glob("*.tmp"))

    def boom(*args: object) -> None:
        raise AssertionError("cache miss")

    real = builtin._generate_mnist1d
    monkeypatch.setattr(builtin, "_generate_mnist1d", boom)
    hit = load_dataset("mnist1d", train_size=200, test_size=50, seed=0)
    assert torch.equal(a.x_train, hit.x_train)

    path.write_bytes(b"not a zip file")
    monkeypatch.setattr(builtin, "_generate_mnist1d", real)
    again = load_dataset("mnist1d", train_size=200, test_size=50, seed=0)
    assert torch.equal(a.x_train, again.x_train) and torch.equal(a.y_train, again.y_train)
    with np.load(path) as f:  # the corrupt file was replaced by a good one
        assert f["x"].shape == (200, 40)


# ----------------------------------------------------------------------------------------------
# digits


def test_digits() -> None:
    a = load_dataset("digits", seed=0)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10 and a.augmentation is None
    assert len(a) + len(a.y_test) == 1797 and len(a.y_test) == 360
    assert torch.bincount(a.y_test).min() >= 35  # stratified: every class ~36 times
    b = load_dataset("digits", seed=0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = load_dataset("digits", seed=1)
    assert not torch.equal(a.y_train, c.y_train)
    small = load_dataset("digits", seed=0, train_size=100, test_size=50)
    assert len(small) == 100 and small.x_test.shape == (50, 1, 8, 8)
    with pytest.raises(ValueError, match="exceeds"):
        load_dataset("digits", train_size=5000)


# ----------------------------------------------------------------------------------------------
# npz


def _save_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_uint8_grey_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    spec = _save_npz(
        tmp_path / "grey.npz",
        x=rng.integers(0, 256, (30, 12, 12), dtype=np.uint8),
        y=rng.integers(0, 3, 30),
        x_test=rng.integers(0, 256, (10, 12, 12), dtype=np.uint8),
        y_test=np.full(10, 4),
    )
    ds = load_dataset(spec)
    assert ds.name == spec and ds.input_shape == (1, 12, 12) and ds.num_classes == 5
    assert ds.x_train.dtype == torch.float32 and abs(ds.x_train.mean().item()) < 1e-5


def test_npz_float_channel_images_and_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 3.0, (40, 3, 8, 8)).astype(np.float32)
    spec = _save_npz(tmp_path / "rgb.npz", x=x, y=np.arange(40) % 4, x_test=x[:6], y_test=[0] * 6)
    ds = load_dataset(spec, train_size=20)
    assert ds.input_shape == (3, 8, 8) and len(ds) == 20 and ds.num_classes == 4
    channel_means = ds.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(channel_means, torch.zeros(3), atol=1e-5)

    vec = _save_npz(
        tmp_path / "vec.npz",
        x=rng.normal(size=(25, 7)),
        y=np.arange(25) % 2,
        x_test=rng.normal(size=(5, 7)),
        y_test=np.arange(5) % 2,
    )
    ds = load_dataset(vec)
    assert ds.input_shape == (7,) and ds.num_classes == 2 and ds.augmentation is None


def test_npz_missing_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="npz file not found") as err:
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    assert "\n" not in str(err.value)
    spec = _save_npz(tmp_path / "partial.npz", x=np.zeros((3, 4)), y=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="lacks array\\(s\\) x_test, y_test") as err:
        load_dataset(spec)
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_dataset(f"npz:{bad}")


# ----------------------------------------------------------------------------------------------
# torchvision on-disk formats


def _write_fake_cifar10(root: Path, per_batch: int = 8, n_test: int = 10) -> np.ndarray:
    """The real layout: pickled dicts with 'data' uint8 (n, 3072) rows of R, G, B 32x32 planes and
    'labels' (list of int). The originals are Python 2 pickles whose keys read back as str under
    torchvision's encoding="latin1" (as b'data' under encoding="bytes"); str keys match that."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = []
    for i in range(1, 6):
        images = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        train.append(images)
        batch = {"batch_label": "training batch", "data": images, "labels": labels}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    test = {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), "labels": [1] * n_test}
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    meta = {"label_names": names + ["dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(train)


def _skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's CIFAR loader checks each file's md5 on every load (not only on download);
    fake files cannot match, so only that check is replaced by an existence check."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())


def test_fake_cifar10_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _write_fake_cifar10(tmp_path)
    _skip_md5(monkeypatch)
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.input_shape == (3, 32, 32) and len(ds) == 40 and ds.x_test.shape[0] == 10
    assert ds.num_classes == 10 and ds.augmentation == "crop-flip"
    assert ds.y_test.tolist() == [1] * 10
    images = raw.reshape(-1, 3, 32, 32).astype(np.float64) / 255.0  # CIFAR rows are CHW planes
    mean = images.mean(axis=(0, 2, 3), keepdims=True)
    std = images.std(axis=(0, 2, 3), keepdims=True)
    expected = torch.from_numpy(((images - mean) / std).astype(np.float32))
    assert torch.allclose(ds.x_train, expected, atol=1e-5)

    small = load_dataset("cifar10", root=str(tmp_path), train_size=12, test_size=3, seed=1)
    assert len(small) == 12 and small.x_test.shape == (3, 3, 32, 32)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: magic (0, 0, 0x08 = uint8, ndim), big-endian int32 dims, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fake_mnist_through_torchvision(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", train)
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte", train[:5])
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(5))
    ds = load_dataset("mnist", root=str(tmp_path))
    assert ds.input_shape == (1, 28, 28) and len(ds) == 20 and ds.augmentation == "crop"
    assert ds.y_train.tolist() == [i % 10 for i in range(20)]
    assert ds.y_test.tolist() == [0, 1, 2, 3, 4]
    assert abs(ds.x_train.mean().item()) < 1e-5


def test_fake_svhn_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SVHN's .mat files hold X (32, 32, 3, N) uint8 and y (N, 1) with label 10 for digit 0."""
    import scipy.io
    import torchvision.datasets.svhn as svhn

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1)
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    monkeypatch.setattr(svhn, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
    ds = load_dataset("svhn", root=str(tmp_path))
    assert ds.input_shape == (3, 32, 32) and len(ds) == 12 and ds.augmentation == "crop"
    assert ds.y_train.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("mnist", "MNIST/raw/"),
        ("fashionmnist", "FashionMNIST/raw/"),
        ("svhn", "train_32x32.mat"),
    ],
)
def test_missing_torchvision_data_is_one_line(tmp_path: Path, name: str, hint: str) -> None:
    root = tmp_path / "absent"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, root=str(root))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{name} not found under {root}: put ")
    assert hint in message and "never downloads" in message


def test_corrupt_cifar_says_so(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DatasetNotFoundError, match="incomplete or corrupt"):
        load_dataset("cifar10", root=str(tmp_path))


# ----------------------------------------------------------------------------------------------
# TensorData methods


def test_augment_identity_when_none() -> None:
    ds = _image_dataset(None)
    x = ds.x_train[:4]
    assert ds.augment(x, torch.Generator().manual_seed(0)) is x


@pytest.mark.parametrize("kind", ["crop", "crop-flip"])
def test_augment_shape_determinism_and_effect(kind: str) -> None:
    ds = _image_dataset(kind)
    x = ds.x_train
    a = ds.augment(x, torch.Generator().manual_seed(5))
    b = ds.augment(x, torch.Generator().manual_seed(5))
    c = ds.augment(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a != x).flatten(1).any(1)
    assert changed.float().mean() > 0.5  # most of 16 images moved or flipped


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img (H, W) moved down by dy and right by dx, with zeros filling the gap."""
    h, w = img.shape
    padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
    return padded[1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def test_crop_is_a_shift_with_zero_fill() -> None:
    x = torch.arange(1, 65, dtype=torch.float32).reshape(1, 1, 8, 8).repeat(50, 2, 1, 1)
    out = data.random_crop(x, 1, torch.Generator().manual_seed(0))
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    seen = set()
    for img in out:
        assert torch.equal(img[0], img[1])  # both channels get the same window
        match = [s for s in shifts if torch.equal(img[0], _shifted(x[0, 0], *s))]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) >= 6


def test_flip_mirrors_some_images() -> None:
    x = torch.randn(64, 3, 4, 4)
    out = data.random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert (flipped | same).all() and 10 < int(flipped.sum()) < 54


def test_crop_padding_sizes() -> None:
    assert [data.crop_padding(s, s) for s in (32, 28, 8)] == [4, 3, 1]


def test_fingerprint() -> None:
    ds = load_dataset("digits", seed=0)
    fp = ds.fingerprint()
    assert len(fp) == 64 and fp == load_dataset("digits", seed=0).fingerprint()
    assert ds.to("cpu").fingerprint() == fp
    renamed = TensorData("other", ds.x_train, ds.y_train, ds.x_test, ds.y_test, 10, None)
    assert renamed.fingerprint() == fp
    y = ds.y_train.clone()
    y[7] = (y[7] + 1) % 10
    changed = TensorData("digits", ds.x_train, y, ds.x_test, ds.y_test, 10, None)
    assert changed.fingerprint() != fp
    assert load_dataset("digits", seed=1).fingerprint() != fp


def test_to_device_and_properties() -> None:
    ds = load_dataset("digits", seed=0, device="cpu")
    assert ds.device == torch.device("cpu") and len(ds) == ds.x_train.shape[0]
    moved = ds.to(torch.device("cpu"))
    assert moved is not ds and torch.equal(moved.x_train, ds.x_train)


def test_dataset_validates_its_fields() -> None:
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="augmentation"):
        TensorData("v", x, y, x, y, 2, "rotate")
    with pytest.raises(ValueError, match="images"):
        TensorData("v", x, y, x, y, 2, "crop")
    with pytest.raises(ValueError, match="labels"):
        TensorData("v", x, y[:3], x, y, 2, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fingerprint_and_augment() -> None:
    ds = _image_dataset("crop-flip")
    gpu = ds.to("cuda")
    assert gpu.device.type == "cuda" and gpu.fingerprint() == ds.fingerprint()
    out = gpu.augment(gpu.x_train, torch.Generator(device="cuda").manual_seed(0))
    assert out.device.type == "cuda" and out.shape == ds.x_train.shape
