"""Both kinds of training data (in-memory tensors and any torch Dataset through a DataLoader):
the same interface, the same Grad-Match selection, every feature through the CLI on both, folder
datasets, and bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from subsetsel.cli import main
from subsetsel.data import DataError, TensorData, TorchData, load_dataset
from subsetsel.data.sampler import epoch_order
from subsetsel.engine.precision import Precision
from subsetsel.engine.schedule import StrategySchedule
from subsetsel.models import build_model
from subsetsel.selection.base import Selection, create_strategy
from subsetsel.store import SelectionStore
from subsetsel.train import read_log

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from make_image_folder import make_image_folder  # noqa: E402

SMALL = ["--train-size", "300", "--test-size", "100", "--epochs", "2", "--batch-size", "32",
         "--quiet", "--workers", "0"]


@pytest.fixture(scope="module")
def kinds():
    """The same MNIST-1D data as tensors and through a DataLoader."""
    tensor = load_dataset("mnist1d", train_size=300, test_size=100, loader="tensor")
    loader = load_dataset("mnist1d", train_size=300, test_size=100, loader="dataloader",
                          workers=0)
    return tensor, loader


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs") / "digits"
    make_image_folder(root, size=16, limit=240)
    return root


def invoke(args: list[str]):
    return CliRunner().invoke(main, args)


# ---- one interface -----------------------------------------------------------------------------
def test_both_kinds_give_the_same_labels_views_and_fingerprint(kinds):
    tensor, loader = kinds
    assert isinstance(tensor, TensorData) and isinstance(loader, TorchData)
    assert len(tensor) == len(loader) == 300 and tensor.input_shape == loader.input_shape
    assert torch.equal(tensor.labels(), loader.labels())
    assert tensor.fingerprint() == loader.fingerprint()
    rows = torch.tensor([5, 0, 299, 17])
    (_, xa, ya), = tensor.eval_batches(rows)
    (_, xb, yb), = loader.eval_batches(rows)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xs = torch.cat([x for x, _ in tensor.test_batches(64)])
    assert torch.equal(xs, torch.cat([x for x, _ in loader.test_batches(64)]))


@pytest.mark.parametrize("name", ["gradmatch", "gradmatchpb"])
def test_tensor_and_dataloader_paths_choose_the_same_gradmatch_selection(kinds, name):
    chosen = []
    for data in kinds:
        torch.manual_seed(0)
        model = build_model("cnn1d", data.input_shape, data.num_classes)
        schedule = StrategySchedule(create_strategy(name, fraction=0.2, seed=0), 1, model, data,
                                    32, 0, torch.device("cpu"), Precision())
        chosen.append(schedule.selection_for(0))
    a, b = chosen
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-4, atol=0)


def test_dataloader_batches_do_not_depend_on_the_number_of_workers(folder):
    data = [load_dataset(f"folder:{folder}", workers=w) for w in (0, 2)]
    sel = Selection.full(len(data[0]))
    order = epoch_order(sel, seed=3, epoch=1)
    batches = [[b.x for b in d.reader(order.indices, order.weights, order.aug_seed).batches(50)]
               for d in data]
    for x0, x2 in zip(*batches, strict=True):
        assert torch.equal(x0, x2)
    again = data[0].reader(order.indices, order.weights, order.aug_seed).batches(50)
    assert torch.equal(next(iter(again)).x, batches[0][0])  # seeded: the same epoch again
    for d in data:
        d.close()


def test_seeded_transforms_leave_the_global_generators_and_accelerators_alone(folder,
                                                                                monkeypatch):
    """Per-item seeding touches only the CPU generator (torch.manual_seed would also queue a
    seeding of every accelerator generator, with a stack trace: ~1 ms per item) and restores it
    in the main process."""
    import random

    def refuse(seed):
        raise AssertionError("torch.manual_seed called per item")

    data = load_dataset(f"folder:{folder}", workers=0)
    order = epoch_order(Selection.full(len(data)), seed=3, epoch=1)
    expected = [b.x for b in data.reader(order.indices, order.weights, order.aug_seed).batches(50)]
    monkeypatch.setattr(torch, "manual_seed", refuse)
    again = [b.x for b in data.reader(order.indices, order.weights, order.aug_seed).batches(50)]
    assert all(torch.equal(a, b) for a, b in zip(expected, again, strict=True))
    view = data._view("train")
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = view.transform_item(view.item(0)[0], seed=11)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert torch.equal(view.transform_item(view.item(0)[0], seed=11), first)


# ---- every feature on both kinds ---------------------------------------------------------------
FEATURES = {
    "gradmatch": ["--strategy", "gradmatch", "--select-every", "1"],
    "gradmatchpb": ["--strategy", "gradmatchpb", "--fraction", "0.3"],
    "random": ["--strategy", "random", "--fraction", "0.5"],
    "randompb": ["--strategy", "randompb", "--fraction", "0.5"],
    "full": ["--strategy", "full"],
    "warm": ["--strategy", "gradmatch", "--warm-start", "0.5", "--epochs", "4"],
    "sb": ["--strategy", "full", "--policy", "sb", "--warmup-epochs", "0"],
    "stale-sb": ["--strategy", "full", "--policy", "stale-sb"],
    "sb-keep": ["--strategy", "full", "--policy", "sb-keep", "--keep-start", "0"],
    "is": ["--strategy", "full", "--policy", "is", "--tau-th", "0"],
    "echo-before": ["--strategy", "random", "--echo", "2", "--echo-mode", "example-before-aug"],
    "echo-after": ["--strategy", "random", "--echo", "2", "--echo-mode", "example-after-aug"],
    "echo-batch": ["--strategy", "random", "--echo", "1.5", "--echo-mode", "batch"],
}


@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_every_training_feature_runs_on_both_kinds(in_tmp, loader, feature):
    result = invoke(["train", *SMALL, "--loader", loader, *FEATURES[feature], "--out", "r"])
    assert result.exit_code == 0, result.output
    log = read_log(in_tmp / "r")
    assert log and all(r["steps"] > 0 for r in log)
    assert log[-1]["test_acc"] is not None


@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_replay_search_report_inspect_and_onepass_on_both_kinds(in_tmp, loader):
    base = ["--loader", loader]
    assert invoke(["train", *SMALL, *base, "--save-selections", "s", "--out", "sel"]
                  ).exit_code == 0
    replay = invoke(["train", *SMALL, *base, "--replay", "s", "--lr", "0.1", "--out", "rep"])
    assert replay.exit_code == 0, replay.output
    full = invoke(["train", *SMALL, *base, "--strategy", "full", "--out", "full"])
    assert full.exit_code == 0, full.output
    report = invoke(["report", "full", "rep", "--json"])
    assert report.exit_code == 0, report.output
    assert len(json.loads(report.output)["methods"]) == 2
    inspect = invoke(["inspect", "s", "--class-balance", "--json"])
    assert inspect.exit_code == 0, inspect.output
    assert sum(json.loads(inspect.output)["rounds"][0]["class_counts"]) == 30
    search = invoke(["search", "--selections", "s", "--param", "lr=0.05,0.1", "--sampler",
                     "grid", "--quiet", "--out", "study", *base])
    assert search.exit_code == 0, search.output
    one = invoke(["onepass", "--train-size", "300", "--test-size", "100", "--workers", "0",
                  "--quiet", "--replay-steps", "1", "--storage", "0.1", "--out", "op", *base])
    assert one.exit_code == 0, one.output
    assert read_log(in_tmp / "op")[-1]["total_fresh"] == 300


# ---- folder datasets ---------------------------------------------------------------------------
def test_folder_dataset_trains_selects_and_replays(in_tmp, folder):
    args = ["--dataset", f"folder:{folder}", "--epochs", "2", "--batch-size", "16", "--quiet",
            "--workers", "0"]
    made = invoke(["train", *args, "--strategy", "gradmatch", "--fraction", "0.3",
                   "--select-every", "1", "--save-selections", "fs", "--out", "a"])
    assert made.exit_code == 0, made.output
    store = SelectionStore.open(in_tmp / "selections" / "fs.h5")
    assert store.complete and len(store.rounds) == 2
    replay = invoke(["train", *args, "--replay", "fs", "--lr", "0.1", "--out", "b"])
    assert replay.exit_code == 0, replay.output
    log = read_log(in_tmp / "b")
    assert [r["subset_size"] for r in log] == [len(r) for r in store.rounds]
    data = load_dataset(f"folder:{folder}", workers=0)
    assert data.input_shape == (3, 16, 16) and data.num_classes == 10
    labels_only = load_dataset(f"folder:{folder}", workers=0, labels_only=True)
    assert labels_only.fingerprint() == data.fingerprint() == store.metadata.fingerprint


def test_folder_image_size_and_test_folder(tmp_path):
    make_image_folder(tmp_path / "d", size=12, limit=60)
    (tmp_path / "d" / "val").rename(tmp_path / "d" / "test")
    data = load_dataset(f"folder:{tmp_path / 'd'}", workers=0, image_size=10)
    assert data.input_shape == (3, 10, 10) and data.test_size() == 12


# ---- bad input ---------------------------------------------------------------------------------
class Items(torch.utils.data.Dataset):
    def __init__(self, items: list, grow: bool = False) -> None:
        self.items, self.grow = items, grow

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        if self.grow:
            self.items.append(self.items[0])
        return self.items[i]


def test_items_that_are_not_pairs_and_bad_labels_are_one_line_errors():
    x = torch.zeros(3)
    with pytest.raises(DataError, match="example 1 is a Tensor, not an .input, label. pair"):
        TorchData(Items([(x, 0), x, (x, 1)]), num_workers=0)
    with pytest.raises(DataError, match="label -1 of example 2"):
        TorchData(Items([(x, 0), (x, 1), (x, -1)]), num_workers=0)
    with pytest.raises(DataError, match="label 7 of example 0 is outside"):
        TorchData(Items([(x, 7), (x, 1), (x, 0)]), num_classes=2, num_workers=0)
    with pytest.raises(DataError, match="not plausible"):
        TorchData(Items([(x, 900), (x, 1)]), num_workers=0)
    with pytest.raises(ValueError, match="workers"):
        TorchData(Items([(x, 0)]), num_workers=-1)


def test_a_dataset_that_changes_length_is_refused():
    items = [(torch.full((4,), float(i)), i % 2) for i in range(8)]
    data = TorchData(Items(items, grow=True), num_workers=0)
    with pytest.raises(DataError, match="changed size"):
        data.check_length()


def test_loader_on_a_growing_dataset_stops_with_one_line():
    from subsetsel import SubsetLoader

    items = [(torch.full((4,), float(i)), i % 2) for i in range(8)]
    loader = SubsetLoader(Items(items, grow=True), strategy="random", fraction=0.5,
                          batch_size=4, num_workers=0)
    with pytest.raises(DataError, match="changed size"):
        list(loader)


class Crashing(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int):
        if i == 11:
            raise OSError("disk gone")
        return torch.zeros(4), i % 2


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failing_item_names_its_index_even_in_a_worker(workers):
    data = TorchData(Crashing(), labels=[i % 2 for i in range(16)], num_workers=workers)
    with pytest.raises(DataError, match="example 11 could not be read: OSError: disk gone"):
        list(data.eval_batches(chunk=4))
    data.close()


def test_folder_errors_are_one_line(in_tmp, folder, tmp_path):
    cases = []
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "no train/"))
    make_image_folder(tmp_path / "noclass", size=8, limit=30)
    (tmp_path / "noclass" / "train" / "extra").mkdir()
    cases.append((tmp_path / "noclass", "extra"))
    make_image_folder(tmp_path / "broken", size=8, limit=30)
    first = sorted((tmp_path / "broken" / "train").rglob("*.png"))[0]
    first.write_bytes(b"not a png")
    cases.append((tmp_path / "broken", "could not be read"))
    for root, needle in cases:
        result = invoke(["train", "--dataset", f"folder:{root}", "--epochs", "1", "--quiet",
                         "--workers", "0", "--strategy", "full", "--image-size", "8"])
        assert result.exit_code == 1, (root, result.output)
        assert "Traceback" not in result.output and needle in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    bad = invoke(["train", "--workers", "-1", "--quiet"])
    assert bad.exit_code == 2 and "--workers" in bad.output
    tensor_folder = invoke(["train", "--dataset", f"folder:{folder}", "--loader", "tensor"])
    assert tensor_folder.exit_code == 2 and "DataLoader" in tensor_folder.output


def test_replay_against_another_dataset_is_refused(in_tmp, folder, tmp_path):
    assert invoke(["train", *SMALL, "--save-selections", "m"]).exit_code == 0
    other = invoke(["train", "--dataset", f"folder:{folder}", "--replay", "m", "--quiet",
                    "--workers", "0"])
    assert other.exit_code == 1 and "made for a dataset of 300 examples" in other.output


def test_npz_non_finite_and_implausible_labels_are_refused(in_tmp):
    x = np.zeros((20, 5), np.float32)
    x[3, 2] = np.nan
    x[7, 0] = np.inf
    y = np.arange(20) % 2
    np.savez("nan.npz", x=x, y=y, x_test=np.zeros((4, 5), np.float32), y_test=y[:4])
    result = invoke(["train", "--dataset", "npz:nan.npz", "--quiet"])
    assert result.exit_code == 1 and "2 non-finite values" in result.output
    assert "first in example 3" in result.output
    y_big = y.copy()
    y_big[5] = 10**9
    np.savez("big.npz", x=np.zeros((20, 5), np.float32), y=y_big,
             x_test=np.zeros((4, 5), np.float32), y_test=y[:4])
    result = invoke(["train", "--dataset", "npz:big.npz", "--quiet"])
    assert result.exit_code == 1 and "more classes than" in result.output
    assert "Traceback" not in result.output


def test_image_size_applies_to_folders_only(in_tmp):
    result = invoke(["train", "--image-size", "32", "--quiet"])
    assert result.exit_code == 2 and "folder: datasets only" in result.output
