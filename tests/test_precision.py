"""Precision: the eval pass runs CPU conv nets in channels_last and puts them back."""

from __future__ import annotations

import torch
from torch import nn

from subsetsel.engine.precision import Precision
from subsetsel.models import build_model
from subsetsel.selection.gradients import collect_factors, tensor_chunks

CPU = torch.device("cpu")


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def _image_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("smallcnn", (1, 12, 12), 4).eval()


def test_eval_pass_uses_channels_last_then_restores_the_layout_and_values():
    model = _image_model()
    before = [p.detach().clone() for p in _weights(model)]
    params = list(model.parameters())
    with Precision(CPU).eval_pass(model) as settings:
        assert settings.channels_last
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _weights(model))
        assert not all(p.is_contiguous() for p in _weights(model))
    assert all(p.is_contiguous() for p in _weights(model))
    assert list(model.parameters()) == params  # the same Parameter objects (optimizers keep them)
    for p, q in zip(_weights(model), before, strict=True):
        assert torch.equal(p, q)


def test_eval_pass_leaves_other_layouts_and_models_alone():
    model = _image_model().to(memory_format=torch.channels_last)
    with Precision(CPU).eval_pass(model) as settings:  # the user's own layout: not converted
        assert not settings.channels_last
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _weights(model))
    asked = Precision(CPU, channels_last=True)
    with asked.eval_pass(model) as settings:
        assert settings is asked
    mlp = build_model("mlp", (8,), 3)
    with Precision(CPU).eval_pass(mlp) as settings:
        assert not settings.channels_last


def test_selection_factors_equal_the_standard_layout_forward():
    model = _image_model()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(70, 1, 12, 12, generator=gen), torch.randint(0, 4, (70,), generator=gen)
    got = collect_factors(model, tensor_chunks(x, y, 32), 70)
    seen = {}
    handle = model[-1].register_forward_hook(lambda m, i, o: seen.update(emb=i[0], logits=o))
    with torch.no_grad():
        model(x)  # NCHW, as the model was built
    handle.remove()
    delta = torch.softmax(seen["logits"], 1)
    delta[torch.arange(70), y] -= 1
    torch.testing.assert_close(got.emb, seen["emb"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.delta, delta, rtol=1e-4, atol=1e-5)
    assert all(p.is_contiguous() for p in _weights(model))
