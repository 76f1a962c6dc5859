"""Closed-form last-layer gradients against torch.autograd; factored atoms; memory checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from subsetsel import memory
from subsetsel.models import build_model, last_linear
from subsetsel.selection.gradients import (
    GradientMemoryError,
    LastLayerAtoms,
    check_memory,
    free_memory,
    last_layer_factors,
    last_layer_gradients,
)
from subsetsel.selection.omp import DenseAtoms, nonneg_omp


def _autograd_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[dL/db | dL/dW] of each sample's own loss, by backpropagation, in eval mode."""
    layer = last_linear(model)
    model.eval()
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([layer.bias.grad.flatten(), layer.weight.grad.flatten()]))
    model.train()
    return torch.stack(rows)


@pytest.fixture(scope="module", params=["mlp", "tv-resnet18"])
def model_and_data(request):
    torch.manual_seed(0)
    shape = (40,) if request.param == "mlp" else (3, 8, 8)
    model = build_model(request.param, shape, 10)
    x = torch.randn(6, *shape)
    y = torch.tensor([0, 3, 3, 9, 1, 0])
    with torch.no_grad():  # train-mode forward once so BatchNorm running stats are not trivial
        model(torch.randn(32, *shape))
    return model, x, y


def test_rows_equal_autograd_gradients(model_and_data):
    model, x, y = model_and_data
    expected = _autograd_rows(model, x, y)
    model.train()
    rows = last_layer_gradients(model, x, y, chunk=4)
    assert model.training  # mode restored
    assert not last_linear(model)._forward_hooks  # hook removed
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-6)
    # per-class-per-gradient: bias entry y_i and row y_i of dL/dW
    c, d = 10, last_linear(model).in_features
    sliced = last_layer_gradients(model, x, y, per_class=True)
    weight = expected[:, c:].reshape(-1, c, d)
    own = torch.cat([expected[torch.arange(6), y].unsqueeze(1), weight[torch.arange(6), y]], 1)
    torch.testing.assert_close(sliced, own, rtol=1e-4, atol=1e-6)
    # per-batch means over a partition with a short last batch
    batches = [torch.tensor([0, 4]), torch.tensor([5, 1, 2]), torch.tensor([3])]
    means = last_layer_gradients(model, x, y, batches=batches)
    torch.testing.assert_close(means, torch.stack([expected[b].mean(0) for b in batches]),
                               rtol=1e-4, atol=1e-6)


def test_eval_mode_model_stays_in_eval():
    model = build_model("mlp", (8,), 3).eval()
    last_layer_factors(model, torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]))
    assert not model.training


def test_linear_without_bias():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3, bias=False))
    x, y = torch.randn(4, 5), torch.tensor([2, 0, 1, 2])
    rows = last_layer_gradients(model, x, y)
    expected = []
    for i in range(4):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        expected.append(model[2].weight.grad.flatten())
    torch.testing.assert_close(rows, torch.stack(expected), rtol=1e-5, atol=1e-7)


def _factored_problem(
    seed: int, counts: torch.Tensor, n: int, c: int, d: int, shift: float, bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded per-problem factors delta (B, n, c) = softmax - shift, emb (B, n, d) >= 0, zero
    past counts (B,), and their materialised rows [delta | delta (x) e] (without delta when
    not bias)."""
    gen = torch.Generator().manual_seed(seed)
    nb = counts.numel()
    delta = torch.softmax(torch.randn(nb, n, c, generator=gen), 2) - shift
    emb = torch.relu(torch.randn(nb, n, d, generator=gen))
    pad = torch.arange(n).view(1, n, 1) >= counts.view(nb, 1, 1)
    delta, emb = delta.masked_fill(pad, 0.0), emb.masked_fill(pad, 0.0)
    outer = (delta.unsqueeze(3) * emb.unsqueeze(2)).flatten(2)
    return delta, emb, (torch.cat([delta, outer], 2) if bias else outer)


@pytest.mark.parametrize("bias,c", [(True, 4), (False, 4), (True, 1)])
@pytest.mark.parametrize("picks", [1, 3])
def test_factored_atoms_give_the_same_omp_result_as_dense_rows(bias, c, picks):
    """LastLayerAtoms (factor form, rows never materialised) == DenseAtoms on the same rows."""
    counts = torch.tensor([70, 50, 64])
    delta, emb, rows = _factored_problem(2, counts, 70, c, 9, 0.5, bias)
    target = rows.double().sum(1) * torch.tensor([[1.0], [0.5], [1.2]], dtype=torch.float64)
    budgets = torch.tensor([10, 6, 12])
    dense = nonneg_omp(DenseAtoms(rows, target, counts), budgets, lam=0.5, picks_per_step=picks)
    factored = nonneg_omp(LastLayerAtoms(delta, emb, counts, target, bias), budgets, lam=0.5,
                          picks_per_step=picks)
    assert torch.equal(dense.slots, factored.slots)
    torch.testing.assert_close(dense.weights, factored.weights, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dense.correlations, factored.correlations, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bias", [True, False])
def test_factored_atoms_inner_products_equal_the_dense_rows(bias):
    """Norms, the chosen atoms' Gram and target products (`add`, float64) and a step's pool
    Gram (`gram`, float32) from the factor rows equal those of the materialised rows."""
    counts = torch.tensor([40, 33])
    delta, emb, rows = _factored_problem(5, counts, 40, 3, 7, 0.4, bias)
    target = rows.double().sum(1)
    factored = LastLayerAtoms(delta, emb, counts, target, bias)
    dense = DenseAtoms(rows, target, counts)
    torch.testing.assert_close(factored.sq_norms(), dense.sq_norms(), rtol=1e-5, atol=1e-6)
    for atoms in (factored, dense):
        atoms.start(8)
    chosen = torch.tensor([[3, 17, 30], [0, 5, 32]])
    take = torch.tensor([[True, True, True], [True, False, True]])
    got, expected = factored.add(0, chosen, take), dense.add(0, chosen, take)
    # (the dense rows are rounded to float32 once materialised: agreement to ~1e-7 relative)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=1e-9)
    pool = torch.tensor([[1, 2, 8, 39], [4, 6, 7, 31]])
    torch.testing.assert_close(factored.gram(3, pool), dense.gram(3, pool), rtol=1e-5, atol=1e-6)


def test_memory_check_refuses_with_one_line(monkeypatch):
    assert free_memory(torch.device("cpu")) > 0
    check_memory(1000, torch.device("cpu"), 0.5, "x", "hint")  # fits
    monkeypatch.setattr(memory, "free_memory", lambda device: 3 * 2**30)
    with pytest.raises(GradientMemoryError) as err:
        check_memory(2 * 2**30, torch.device("cpu"), 0.5, "gradmatch on 50000 examples",
                     [("--strategy gradmatchpb", 2**29), ("--per-gradient", 2**31)])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("gradmatch on 50000 examples needs about 2.00 GiB but only 0.5 of")
    assert "try --strategy gradmatchpb (~0.50 GiB) or a smaller --fraction" in message
    assert "--per-gradient" not in message  # does not fit: not suggested
    assert message.endswith("a smaller --fraction")
    assert isinstance(err.value, MemoryError)
