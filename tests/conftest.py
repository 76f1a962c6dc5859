"""Shared fixtures: a small MNIST-1D dataset and a run folder per test."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("SUBSETSEL_CACHE", os.path.join(os.path.dirname(__file__), ".cache"))
torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to oversubscription


@pytest.fixture(scope="session")
def small_mnist1d():
    """MNIST-1D with 600 train / 200 test examples (CPU)."""
    from subsetsel.data import load_dataset

    return load_dataset("mnist1d", seed=0, train_size=600, test_size=200)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run the test inside an empty folder (runs/ and selections/ land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
