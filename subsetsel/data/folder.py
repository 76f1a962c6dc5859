"""``folder:PATH``: torchvision ImageFolders under PATH/train and PATH/val (or PATH/test).

Transforms (torchvision), at image size S (`--image-size`; default: the shorter side of the
first training image, at most 224):
- train, S >= 96: RandomResizedCrop(S), horizontal flip; S < 96: Resize(S), CenterCrop(S), then
  a pad-crop (RandomCrop(S, padding=S // 8)) and a horizontal flip;
- eval (selection, scoring, test): Resize(round(S * 8 / 7)) and CenterCrop(S) for S >= 96,
  Resize(S) and CenterCrop(S) below;
- both end in ToTensor and Normalize with per-channel statistics of up to 512 training images
  (seeded sample, eval transform).
Classes are the train folder's sub-folders; the validation folder may hold a subset of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from subsetsel.data.base import DataError
from subsetsel.data.builtin import DatasetNotFoundError, subsample_rows
from subsetsel.data.torch_dataset import TorchData

LARGE = 96  # image sizes from here on use ImageNet-style transforms
STAT_SAMPLE = 512


def load_folder(spec: str, *, seed: int = 0, train_size: int | None = None,
                test_size: int | None = None, image_size: int | None = None,
                num_workers: int | None = None, transforms: bool = True) -> TorchData:
    """The ImageFolder dataset `folder:PATH` as `TorchData` (see the module docstring).
    transforms=False: no transforms and no statistics (labels and fingerprint only)."""
    root = Path(spec[len("folder:") :]).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"folder dataset not found: {root} is not a folder (it needs "
                                   "train/ and val/ sub-folders of class folders of images)")
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = "train/" if not train_dir.is_dir() else "val/ (or test/)"
        raise DatasetNotFoundError(f"{root} has no {missing} sub-folder; folder: datasets need "
                                   "PATH/train/CLASS/*.png and PATH/val/CLASS/*.png")
    train = _image_folder(train_dir, None)
    test = _image_folder(test_dir, train.class_to_idx)
    if len(test) == 0:
        raise DataError(f"{test_dir} holds no images: no test accuracy could be measured")
    keep = subsample_rows(len(train), train_size, seed, 1, "--train-size")
    keep_test = subsample_rows(len(test), test_size, seed, 2, "--test-size")
    train_data: Any = train if keep is None else torch.utils.data.Subset(train, keep.tolist())
    test_data: Any = test if keep_test is None else torch.utils.data.Subset(test,
                                                                            keep_test.tolist())
    if not transforms:
        return TorchData(train_data, test_data, num_classes=len(train.classes), name=spec,
                         num_workers=num_workers)
    if image_size is None:
        image_size = _first_size(train)
    if image_size < 8:
        raise ValueError(f"--image-size must be >= 8, got {image_size}")
    s = image_size
    if s >= LARGE:
        geometry_eval = [T.Resize(round(s * 8 / 7)), T.CenterCrop(s)]
        geometry_train = [T.RandomResizedCrop(s), T.RandomHorizontalFlip()]
    else:
        geometry_eval = [T.Resize(s), T.CenterCrop(s)]
        geometry_train = [*geometry_eval, T.RandomCrop(s, padding=max(1, s // 8)),
                          T.RandomHorizontalFlip()]
    mean, std = _stats(train_data, T.Compose([*geometry_eval, T.ToTensor()]), seed)
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    return TorchData(
        train_data, test_data, train_transform=T.Compose([*geometry_train, *norm]),
        eval_transform=T.Compose([*geometry_eval, *norm]), num_classes=len(train.classes),
        name=spec, num_workers=num_workers,
    )


class _ImageFolder(ImageFolder):
    """An ImageFolder whose classes may be fixed to another folder's (the train folder's)."""

    def __init__(self, root: str, class_to_idx: dict[str, int] | None = None) -> None:
        self.fixed_classes = class_to_idx
        # the train folder's classes must all have images; a val folder may lack some of them
        super().__init__(root, allow_empty=class_to_idx is not None)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, found = super().find_classes(directory)
        fixed = self.fixed_classes
        if fixed is None:
            return classes, found
        extra = sorted(set(classes) - set(fixed))
        if extra:
            raise DataError(f"{directory} has class folder(s) {', '.join(extra[:3])} that the "
                            "train folder lacks")
        return sorted(fixed, key=fixed.__getitem__), dict(fixed)


def _image_folder(folder: Path, class_to_idx: dict[str, int] | None) -> _ImageFolder:
    try:
        return _ImageFolder(str(folder), class_to_idx)
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise DataError(f"{folder}: {_first(err)}") from None


def _first(err: BaseException) -> str:
    return (str(err).strip() or type(err).__name__).splitlines()[0]


def _first_size(folder: Any) -> int:
    """The shorter side of the first training image, at most 224."""
    path = folder.samples[0][0]
    try:
        with open(path, "rb") as f:
            from PIL import Image

            size = min(Image.open(f).size)
    except Exception as err:  # noqa: BLE001 - any decoding error becomes one line
        raise DataError(f"{path} could not be read as an image: {_first(err)}") from None
    return min(224, size)


def _stats(dataset: Any, transform: Any, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (ToTensor scale) of up to STAT_SAMPLE seeded training images."""
    n = len(dataset)
    gen = torch.Generator().manual_seed(seed * 7919 + 5)
    picks = torch.randperm(n, generator=gen)[:STAT_SAMPLE].tolist()
    total = square = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in picks:
        try:
            image, _ = dataset[i]
        except Exception as err:  # noqa: BLE001
            raise DataError(f"train example {i} could not be read: {type(err).__name__}: "
                            f"{_first(err)}") from None
        x = transform(image).double()  # (C, S, S)
        total = total + x.sum((1, 2))
        square = square + (x * x).sum((1, 2))
        count += x.shape[1] * x.shape[2]
    mean = total / count
    std = (square / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), torch.where(std > 1e-4, std, torch.ones_like(std)).tolist()
