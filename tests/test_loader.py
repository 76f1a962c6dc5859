"""SubsetLoader: selection inside a user's own loop, files the CLI reads, replay, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from subsetsel import SubsetLoader
from subsetsel.cli import main
from subsetsel.data import load_dataset
from subsetsel.loader import LoaderExhausted
from subsetsel.models import build_model
from subsetsel.selection.random import Random
from subsetsel.store import SelectionStore
from subsetsel.train import read_log


class Pairs(torch.utils.data.Dataset):
    """A user's own Dataset: (input, label) items from tensors, labels exposed as `targets`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.targets = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.targets[i])


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist1d", train_size=400, test_size=100)


def user_dataset(mnist) -> Pairs:
    return Pairs(mnist.x_train, mnist.y_train)


def train(loader: SubsetLoader, model: torch.nn.Module, epochs: int) -> list[list[int]]:
    """The documented loop; returns the indices of each epoch's subset."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    subsets = []
    for _ in range(epochs):
        for inputs, targets, weights in loader:
            losses = F.cross_entropy(model(inputs), targets, reduction="none")
            loss = (losses * weights).sum() / weights.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        subsets.append(loader.selection.indices.tolist())
    return subsets


def test_gradmatch_in_a_user_loop_writes_a_file_the_cli_reads(in_tmp, mnist):
    torch.manual_seed(0)
    model = build_model("cnn1d", mnist.input_shape, 10)
    loader = SubsetLoader(mnist, model=model, strategy="gradmatch", fraction=0.1, select_every=2,
                          epochs=4, batch_size=32, save_selections="sel.h5", name="mnist1d")
    assert len(loader) == 2  # selects now: 40 examples, batches of 32
    assert loader.last_select_seconds > 0 and model.training
    subsets = train(loader, model, 4)
    assert subsets[0] == subsets[1] != subsets[2] == subsets[3]
    store = SelectionStore.open("sel.h5")
    assert store.complete and [r.epoch for r in store.rounds] == [0, 2]
    assert [r.indices.tolist() for r in store.rounds] == [subsets[0], subsets[2]]
    assert store.metadata.strategy == "gradmatch"
    assert CliRunner().invoke(main, ["inspect", "sel.h5"]).exit_code == 0
    replay = CliRunner().invoke(main, ["train", "--train-size", "400", "--test-size", "100",
                                       "--replay", "sel.h5", "--quiet", "--out", "r"])
    assert replay.exit_code == 0, replay.output
    assert [r["subset_size"] for r in read_log(in_tmp / "r")] == [40] * 4
    with pytest.raises(LoaderExhausted):
        list(loader)


def test_replay_needs_no_model_and_matches_the_file(in_tmp, mnist):
    data = user_dataset(mnist)
    made = SubsetLoader(data, strategy="random", fraction=0.25, select_every=1, epochs=3,
                        batch_size=50, num_workers=0, save_selections="r.h5")
    seen = []
    for _ in range(3):
        assert sum(len(y) for _, y, _ in made) == 100
        seen.append(made.selection.indices.tolist())
    replay = SubsetLoader(data, replay="r.h5", batch_size=50, num_workers=0)
    assert replay.epochs == 3
    for epoch in range(3):
        labels = torch.cat([y for _, y, _ in replay])
        assert replay.selection.indices.tolist() == seen[epoch]
        assert torch.equal(labels.sort().values,
                           mnist.y_train[replay.selection.indices].sort().values)
    assert replay.select_seconds == 0.0


def test_model_mode_is_restored_and_strategy_objects_are_accepted(mnist):
    model = build_model("cnn1d", mnist.input_shape, 10).eval()
    loader = SubsetLoader(user_dataset(mnist), model=model, strategy="gradmatchpb",
                          fraction=0.2, epochs=1, batch_size=20, num_workers=0)
    len(loader)
    assert not model.training
    own = SubsetLoader(user_dataset(mnist), strategy=Random(fraction=0.5, seed=3), epochs=1,
                       num_workers=0)
    assert own.selection is None and len(own) == 2  # 200 examples in batches of 128
    assert len(own.selection) == 200


def test_a_strategy_that_needs_a_model_says_so(mnist):
    loader = SubsetLoader(user_dataset(mnist), strategy="gradmatch", epochs=1, num_workers=0)
    with pytest.raises(ValueError, match="needs model="):
        len(loader)


def test_state_dict_resumes_with_the_same_subsets_and_file(in_tmp, mnist):
    def make() -> SubsetLoader:
        return SubsetLoader(user_dataset(mnist), strategy="random", fraction=0.2, select_every=1,
                            epochs=4, batch_size=40, num_workers=0, save_selections="s.h5")

    straight = make()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 10))
    expected = train(straight, model, 4)
    SelectionStore.open("s.h5").path.unlink()
    cut = make()
    got = train(cut, model, 2)
    state = cut.state_dict()
    cut.feed.store.append(type(cut.selection)(torch.tensor([1]), torch.ones(1), epoch=2))
    again = make()
    again.load_state_dict(state)  # the extra round (after the state) is dropped
    got += train(again, model, 2)
    assert got == expected
    assert [r.indices.tolist() for r in SelectionStore.open("s.h5").rounds] == expected
    SelectionStore.open("s.h5").path.unlink()
    other = SubsetLoader(user_dataset(mnist), strategy="random", fraction=0.2, epochs=4,
                         num_workers=0, save_selections="s.h5")
    from subsetsel.store import SelectionFileError

    with pytest.raises(SelectionFileError, match="deleted"):
        other.load_state_dict(state)
