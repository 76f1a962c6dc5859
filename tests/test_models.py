"""Model registry: every model maps (B, *input_shape) to logits (B, C) through a final nn.Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subsetsel.errors import UnknownNameError
from subsetsel.models import (
    TORCHVISION_MODELS,
    build_model,
    default_model,
    last_linear,
    model_names,
)


def _check_logits(name: str, shape: tuple[int, ...], classes: int = 7) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, classes).eval()
    lin = last_linear(model)
    assert isinstance(lin, nn.Linear) and lin.out_features == classes
    seen: list[torch.Tensor] = []
    hook = lin.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        logits = model(torch.randn(2, *shape))
    hook.remove()
    assert logits.shape == (2, classes)
    assert len(seen) == 1 and torch.equal(seen[0], logits)  # the hooked layer runs last


def test_names() -> None:
    names = model_names()
    for own in ("cnn1d", "lenet", "mlp", "resnet18", "smallcnn"):
        assert own in names
    assert "tv-mobilenet_v2" in names and "tv-resnet18" in names
    assert all(f"tv-{n}" in names for n in TORCHVISION_MODELS)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="cnn1d.*mlp.*tv-resnet18"):
        build_model("transformer", (1, 40), 10)
    with pytest.raises(UnknownNameError):
        build_model("tv-squeezenet1_0", (3, 32, 32), 10)  # ends in a conv, not an nn.Linear


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", (1, 40)),
        ("mlp", (7,)),
        ("cnn1d", (1, 40)),
        ("cnn1d", (40,)),
        ("smallcnn", (3, 32, 32)),
        ("smallcnn", (1, 28, 28)),
        ("smallcnn", (1, 8, 8)),
        ("lenet", (1, 28, 28)),
        ("lenet", (3, 32, 32)),
        ("resnet18", (3, 8, 8)),
        ("tv-mobilenet_v2", (3, 32, 32)),
        ("tv-mobilenet_v2", (1, 28, 28)),
        ("tv-resnet18", (3, 32, 32)),
        ("tv-resnet18", (1, 28, 28)),
    ],
)
def test_logits_and_last_linear(name: str, shape: tuple[int, ...]) -> None:
    _check_logits(name, shape)


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_every_torchvision_model(name: str) -> None:
    _check_logits(f"tv-{name}", (3, 32, 32))
    _check_logits(f"tv-{name}", (1, 28, 28))


def test_small_image_resnet_stem() -> None:
    model = build_model("tv-resnet18", (1, 28, 28), 10)
    assert model.conv1.in_channels == 1 and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    mobile = build_model("tv-mobilenet_v2", (1, 28, 28), 10)
    first = next(m for m in mobile.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1


def test_deterministic_init() -> None:
    for name, shape in (("cnn1d", (1, 40)), ("smallcnn", (3, 32, 32))):
        torch.manual_seed(3)
        a = build_model(name, shape, 10).state_dict()
        torch.manual_seed(3)
        b = build_model(name, shape, 10).state_dict()
        torch.manual_seed(4)
        c = build_model(name, shape, 10).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("smallcnn", (1, 40)),
        ("resnet18", (40,)),
        ("tv-resnet18", (1, 40)),
        ("lenet", (1, 40)),
        ("cnn1d", (1, 28, 28)),
        ("cnn1d", (1, 10)),
        ("lenet", (1, 8, 8)),
    ],
)
def test_wrong_input_kind_is_one_line(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError) as err:
        build_model(name, shape, 10)
    assert "\n" not in str(err.value) and not isinstance(err.value, UnknownNameError)


def test_last_linear_without_linear() -> None:
    with pytest.raises(ValueError, match="no nn.Linear"):
        last_linear(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_default_models() -> None:
    assert default_model("mnist1d") == "cnn1d"
    assert default_model("digits") == "mlp"
    for name in ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn"):
        assert default_model(name) == "smallcnn"
    assert default_model("npz:x.npz") == "mlp"
    assert default_model("npz:x.npz", (3, 32, 32)) == "smallcnn"
    assert default_model("npz:x.npz", (1, 100)) == "cnn1d"
    assert default_model("npz:x.npz", (20,)) == "mlp"
