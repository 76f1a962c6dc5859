"""SelectionStore: round trips, atomic writes, validation, replay mapping, concurrent readers."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import subsetsel.store as store_mod
from subsetsel.selection.base import Selection
from subsetsel.store import (
    DEFAULT_DIR,
    FORMAT_VERSION,
    IncompatibleSelectionError,
    SelectionFileError,
    SelectionMetadata,
    SelectionStore,
    resolve_path,
    summarize,
)

N = 100


def make_meta(**overrides) -> SelectionMetadata:
    values = dict(
        dataset="mnist1d",
        dataset_size=N,
        fingerprint="ab12cd",
        num_classes=4,
        strategy="gradmatchpb",
        strategy_params={"fraction": 0.1, "lam": 0.5},
        model="mlp",
        seed=3,
        epochs=10,
        config={"dataset": "mnist1d", "seed": 3, "epochs": 10, "train_size": None},
    )
    values.update(overrides)
    return SelectionMetadata(**values)


def three_rounds() -> list[Selection]:
    g = torch.Generator().manual_seed(0)
    return [
        Selection(torch.randperm(N, generator=g)[:20], torch.rand(20, generator=g), 0, 0.5),
        Selection(torch.arange(10, 40), torch.ones(30), 3, 1.25, batch_ids=torch.tensor([1, 3])),
        Selection(torch.tensor([99, 0, 7]), torch.tensor([0.0, 2.5, 1.0]), 7, 0.0),
    ]


@pytest.fixture
def stored(tmp_path: Path) -> SelectionStore:
    store = SelectionStore.create(tmp_path / "sel.h5", make_meta())
    for r in three_rounds():
        store.append(r)
    return store


def assert_same_rounds(a: list[Selection], b: list[Selection]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.indices, y.indices) and x.indices.dtype == torch.int64
        assert torch.equal(x.weights, y.weights) and x.weights.dtype == torch.float32
        assert (x.epoch, x.seconds) == (y.epoch, y.seconds)
        assert (x.batch_ids is None) == (y.batch_ids is None)
        if x.batch_ids is not None:
            assert torch.equal(x.batch_ids, y.batch_ids)


# -- round trip ----------------------------------------------------------------------------------


def test_round_trip(stored: SelectionStore) -> None:
    again = SelectionStore.open(stored.path)
    assert again.metadata == stored.metadata
    assert again.metadata.format_version == FORMAT_VERSION
    assert_same_rounds(again.rounds, three_rounds())


def test_plain_h5py_reads_the_schema(stored: SelectionStore) -> None:
    with h5py.File(stored.path, "r") as f:
        assert f.attrs["format_version"] == 1
        assert f.attrs["dataset"] == "mnist1d" and f.attrs["dataset_size"] == N
        assert json.loads(f.attrs["strategy_params"]) == {"fraction": 0.1, "lam": 0.5}
        assert json.loads(f.attrs["config"])["seed"] == 3
        for name in ("fingerprint", "strategy", "model", "package_version", "created"):
            assert isinstance(f.attrs[name], str)
        for name in ("num_classes", "seed", "epochs"):
            assert isinstance(f.attrs[name], np.integer)
        assert sorted(f["rounds"]) == ["000000", "000001", "000002"]
        for name, r in zip(sorted(f["rounds"]), three_rounds(), strict=True):
            g = f["rounds"][name]
            assert g["indices"].dtype == np.int64 and g["weights"].dtype == np.float32
            np.testing.assert_array_equal(g["indices"][()], r.indices.numpy())
            np.testing.assert_array_equal(g["weights"][()], r.weights.numpy())
            assert g.attrs["epoch"] == r.epoch and g.attrs["seconds"] == r.seconds
            assert ("batch_ids" in g) == (r.batch_ids is not None)
        np.testing.assert_array_equal(f["rounds/000001/batch_ids"][()], [1, 3])


def test_file_written_by_plain_h5py_is_accepted(tmp_path: Path) -> None:
    """The README schema is enough to write a valid file (compressed datasets are fine)."""
    path = tmp_path / "handmade.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(
            format_version=1, dataset="digits", dataset_size=N, fingerprint="beef",
            num_classes=10, strategy="mine", strategy_params="{}", model="mlp", seed=0,
            epochs=4, config=json.dumps({"dataset": "digits"}), package_version="x",
            created="2024-01-01T00:00:00+00:00",
        )  # fmt: skip
        for i, epoch in enumerate((0, 2)):
            g = f.create_group(f"rounds/{i:06d}")
            g.create_dataset("indices", data=np.arange(5, dtype=np.int64) + epoch,
                             compression="gzip")  # fmt: skip
            g.create_dataset("weights", data=np.ones(5, np.float32), compression="gzip")
            g.attrs.update(epoch=epoch, seconds=0.0)
    store = SelectionStore.open(path)
    assert store.metadata.config == {"dataset": "digits"} and store.metadata.epochs == 4
    assert store.selection_at(3).indices.tolist() == [2, 3, 4, 5, 6]


def test_empty_store_round_trips(tmp_path: Path) -> None:
    SelectionStore.create(tmp_path / "empty.h5", make_meta())
    store = SelectionStore.open(tmp_path / "empty.h5")
    assert store.rounds == [] and store.round_starts() == []
    with pytest.raises(ValueError, match="no rounds"):
        store.selection_at(0)


def test_create_makes_the_folder(tmp_path: Path) -> None:
    store = SelectionStore.create(tmp_path / "a" / "b" / "x.h5", make_meta())
    assert store.path.exists()


def test_store_keeps_its_own_copies(stored: SelectionStore) -> None:
    sel = Selection(torch.tensor([1, 2]), torch.tensor([1.0, 1.0]), epoch=9)
    stored.append(sel)
    sel.weights.mul_(-1)
    stored.selection_at(9).weights.mul_(-1)
    assert stored.rounds[-1].weights.tolist() == [1.0, 1.0]


def test_truncate(stored: SelectionStore) -> None:
    stored.truncate(before_epoch=3)
    assert [r.epoch for r in stored.rounds] == [0]
    assert [r.epoch for r in SelectionStore.open(stored.path).rounds] == [0]
    stored.append(Selection(torch.tensor([5]), torch.tensor([1.0]), epoch=2))
    assert [r.epoch for r in SelectionStore.open(stored.path).rounds] == [0, 2]


@pytest.mark.parametrize(
    ("selection", "match"),
    [
        (Selection(torch.tensor([1]), torch.tensor([1.0]), epoch=7), "not after"),
        (Selection(torch.tensor([N]), torch.tensor([1.0]), epoch=9), "out of range"),
        (Selection(torch.tensor([-1]), torch.tensor([1.0]), epoch=9), "out of range"),
        (Selection(torch.tensor([1, 1]), torch.tensor([1.0, 1.0]), epoch=9), "more than once"),
        (Selection(torch.tensor([1]), torch.tensor([-1.0]), epoch=9), "negative weight"),
        (Selection(torch.tensor([1]), torch.tensor([float("nan")]), epoch=9), "NaN"),
        (Selection(torch.tensor([1]), torch.tensor([float("inf")]), epoch=9), "NaN"),
        (Selection(torch.zeros(0), torch.zeros(0), epoch=9), "empty"),
    ],
)
def test_append_rejects_bad_rounds(stored: SelectionStore, selection: Selection, match: str):
    before = stored.path.read_bytes()
    with pytest.raises(ValueError, match=match):
        stored.append(selection)
    assert len(stored.rounds) == 3 and stored.path.read_bytes() == before


# -- atomic writes and clobbering ----------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_failed_write_leaves_old_file_intact(stored: SelectionStore, monkeypatch) -> None:
    before = stored.path.read_bytes()
    real = store_mod._write_round
    calls = []

    def failing(group, name, r):
        calls.append(name)
        if len(calls) == 3:  # two rounds already written to the temp file
            raise RuntimeError("disk on fire")
        real(group, name, r)

    monkeypatch.setattr(store_mod, "_write_round", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        stored.append(Selection(torch.tensor([4]), torch.tensor([1.0]), epoch=8))
    assert stored.path.read_bytes() == before
    assert len(stored.rounds) == 3
    assert_same_rounds(SelectionStore.open(stored.path).rounds, three_rounds())
    assert _leftovers(stored.path.parent) == []


def test_failed_replace_leaves_old_file_intact(stored: SelectionStore, monkeypatch) -> None:
    before = stored.path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(store_mod.os, "replace", failing_replace)
    with pytest.raises(SelectionFileError, match="could not write") as info:
        stored.truncate(before_epoch=1)
    assert "\n" not in str(info.value) and str(stored.path) in str(info.value)
    assert stored.path.read_bytes() == before and len(stored.rounds) == 3
    assert _leftovers(stored.path.parent) == []


def test_create_never_clobbers(stored: SelectionStore) -> None:
    before = stored.path.read_bytes()
    with pytest.raises(SelectionFileError, match="already exists") as info:
        SelectionStore.create(stored.path, make_meta(seed=9))
    assert isinstance(info.value, FileExistsError)
    assert "\n" not in str(info.value)
    assert stored.path.read_bytes() == before
    assert _leftovers(stored.path.parent) == []
    SelectionStore.create(stored.path, make_meta(seed=9), overwrite=True)
    again = SelectionStore.open(stored.path)
    assert again.metadata.seed == 9 and again.rounds == []


def test_create_rejects_bad_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        SelectionStore.create(tmp_path / "x.h5", make_meta(config={"a": object()}))
    with pytest.raises(ValueError, match="dataset_size"):
        SelectionStore.create(tmp_path / "x.h5", make_meta(dataset_size=0))
    assert not (tmp_path / "x.h5").exists()


# -- corrupt files -------------------------------------------------------------------------------


def _edit(path: Path, fn) -> None:
    with h5py.File(path, "r+") as f:
        fn(f)


def _replace_dataset(name: str, data: np.ndarray) -> Callable[[h5py.File], None]:
    def fn(f):
        del f[name]
        f[name] = data

    return fn


CORRUPTIONS = {
    "missing attr": (lambda f: f.attrs.__delitem__("fingerprint"), "fingerprint"),
    "attr wrong type": (lambda f: f.attrs.__setitem__("seed", "three"), "integer"),
    "bad json": (lambda f: f.attrs.__setitem__("config", "{not json"), "JSON"),
    "no format": (lambda f: f.attrs.__delitem__("format_version"), "format_version"),
    "format 2": (lambda f: f.attrs.__setitem__("format_version", 2), "newer subsetsel"),
    "format 0": (lambda f: f.attrs.__setitem__("format_version", 0), "unknown .*format"),
    "no rounds group": (lambda f: f.__delitem__("rounds"), "rounds"),
    "missing indices": (lambda f: f.__delitem__("rounds/000001/indices"), "'indices'"),
    "missing weights": (lambda f: f.__delitem__("rounds/000002/weights"), "'weights'"),
    "missing epoch": (lambda f: f["rounds/000000"].attrs.__delitem__("epoch"), "'epoch'"),
    "gap in rounds": (lambda f: f.move("rounds/000001", "rounds/000005"), "000001' is missing"),
    "wrong dtype": (
        _replace_dataset("rounds/000000/weights", np.ones(20, np.float64)),
        "dtype float64",
    ),
    "float indices": (
        _replace_dataset("rounds/000002/indices", np.array([1.0, 2.0, 3.0])),
        "dtype float64",
    ),
    "length mismatch": (
        _replace_dataset("rounds/000002/weights", np.ones(4, np.float32)),
        "3 indices but 4 weights",
    ),
    "out of range": (
        _replace_dataset("rounds/000002/indices", np.array([1, N, 3], np.int64)),
        "out of range",
    ),
    "negative weight": (
        _replace_dataset("rounds/000002/weights", np.array([1, -1, 1], np.float32)),
        "negative weight",
    ),
    "nan weight": (
        _replace_dataset("rounds/000002/weights", np.array([1, np.nan, 1], np.float32)),
        "NaN",
    ),
    "duplicate index": (
        _replace_dataset("rounds/000002/indices", np.array([5, 6, 5], np.int64)),
        "more than once",
    ),
    "epochs not increasing": (
        lambda f: f["rounds/000002"].attrs.__setitem__("epoch", 3),
        "not after",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_files_raise_one_line(stored: SelectionStore, case: str) -> None:
    edit, match = CORRUPTIONS[case]
    _edit(stored.path, edit)
    with pytest.raises(SelectionFileError, match=match) as info:
        SelectionStore.open(stored.path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(stored.path))


def test_newer_format_message(stored: SelectionStore) -> None:
    _edit(stored.path, lambda f: f.attrs.__setitem__("format_version", 2))
    with pytest.raises(SelectionFileError, match=r"newer subsetsel \(format 2.*upgrade"):
        SelectionStore.open(stored.path)


@pytest.mark.parametrize("content", ["text", "truncated", "empty", "half header"])
def test_unreadable_files(stored: SelectionStore, tmp_path: Path, content: str) -> None:
    data = stored.path.read_bytes()
    bad = tmp_path / "bad.h5"
    bad.write_bytes(
        {
            "text": b"this is not an HDF5 file\n" * 10,
            "truncated": data[: len(data) // 2],
            "empty": b"",
            "half header": data[:100],
        }[content]
    )
    with pytest.raises(SelectionFileError) as info:
        SelectionStore.open(bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SelectionFileError, match="no such selection file"):
        SelectionStore.open(tmp_path / "nope.h5")
    with pytest.raises(SelectionFileError, match="directory"):
        SelectionStore.open(tmp_path)


# -- compatibility and replay --------------------------------------------------------------------


def test_check_compatible(stored: SelectionStore) -> None:
    stored.check_compatible(fingerprint="ab12cd", dataset_size=N, dataset="other-name")
    with pytest.raises(IncompatibleSelectionError) as info:
        stored.check_compatible(fingerprint="ffff00", dataset_size=N)
    assert "ab12cd" in str(info.value) and "ffff00" in str(info.value)
    with pytest.raises(IncompatibleSelectionError) as info:
        stored.check_compatible(fingerprint="ab12cd", dataset_size=N + 1)
    assert str(N) in str(info.value) and str(N + 1) in str(info.value)
    assert "\n" not in str(info.value)


def test_selection_at_same_epochs(stored: SelectionStore) -> None:
    expected = {0: 0, 1: 0, 2: 0, 3: 3, 6: 3, 7: 7, 9: 7, 15: 7}
    by_start = {r.epoch: r for r in three_rounds()}
    for total in (None, 10):
        for epoch, start in expected.items():
            sel = stored.selection_at(epoch, total)
            assert sel.epoch == start
            assert torch.equal(sel.indices, by_start[start].indices)
        assert stored.round_starts(total) == [0, 3, 7]


def test_selection_at_longer_run(stored: SelectionStore) -> None:
    # stored E=10, rounds at 0, 3, 7; new run T=20 -> starts at 0, 6, 14
    assert stored.round_starts(20) == [0, 6, 14]
    assert stored.selection_at(5, 20).epoch == 0
    sel = stored.selection_at(6, 20)
    assert sel.epoch == 6 and torch.equal(sel.indices, stored.rounds[1].indices)
    assert stored.selection_at(13, 20).epoch == 6
    assert stored.selection_at(19, 20).epoch == 14
    assert [s.epoch for s in stored.schedule(20)] == [0, 6, 14]


def test_selection_at_shorter_run(stored: SelectionStore) -> None:
    # T=5: new epoch e <-> stored floor(2e): 0->0, 1->2, 2->4 (round@3), 3->6, 4->8 (round@7)
    assert stored.round_starts(5) == [0, 2, 4]
    assert stored.selection_at(1, 5).epoch == 0
    assert torch.equal(stored.selection_at(3, 5).indices, stored.rounds[1].indices)
    assert torch.equal(stored.selection_at(4, 5).indices, stored.rounds[2].indices)
    # T=2: stored epochs 0 and 5 -> rounds @0 and @3; round @7 is never in force
    assert stored.round_starts(2) == [0, 1]
    assert torch.equal(stored.selection_at(1, 2).indices, stored.rounds[1].indices)


def test_rounds_collapsing_onto_one_epoch(tmp_path: Path) -> None:
    store = SelectionStore.create(tmp_path / "c.h5", make_meta())
    for epoch in (0, 1, 2):
        store.append(Selection(torch.tensor([epoch]), torch.tensor([1.0]), epoch=epoch))
    # T=3: round@1 starts at ceil(0.3)=1, round@2 at ceil(0.6)=1 -> the later wins
    assert store.round_starts(3) == [0, 1]
    assert store.selection_at(1, 3).indices.tolist() == [2]


def test_selection_at_before_first_round(tmp_path: Path) -> None:
    store = SelectionStore.create(tmp_path / "late.h5", make_meta())
    store.append(Selection(torch.tensor([1]), torch.tensor([1.0]), epoch=4))
    with pytest.raises(ValueError, match="first round starts at epoch 4"):
        store.selection_at(2)
    assert store.round_starts() == [4] and store.round_starts(20) == [8]


# -- concurrent readers --------------------------------------------------------------------------


def _open_many(path: str) -> int:
    for _ in range(20):
        store = SelectionStore.open(path)
        assert len(store.rounds) == 3
    return 20


def test_concurrent_readers_processes(stored: SelectionStore) -> None:
    ctx = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
    with ctx.Pool(4) as pool:
        assert sum(pool.map(_open_many, [str(stored.path)] * 8)) == 160


def test_concurrent_readers_threads(stored: SelectionStore) -> None:
    with ThreadPoolExecutor(4) as ex:
        assert sum(ex.map(_open_many, [str(stored.path)] * 8)) == 160


def _open_until(path: str, deadline: float) -> int:
    opened = 0
    while time.monotonic() < deadline:
        assert len(SelectionStore.open(path).rounds) in (3, 4)
        opened += 1
    return opened


def test_readers_never_see_a_partial_write(stored: SelectionStore) -> None:
    ctx = multiprocessing.get_context("fork")
    deadline = time.monotonic() + 1.5
    with ctx.Pool(3) as pool:
        readers = pool.starmap_async(_open_until, [(str(stored.path), deadline)] * 3)
        writes = 0
        while time.monotonic() < deadline:
            stored.append(Selection(torch.arange(N), torch.ones(N), epoch=8))
            stored.truncate(before_epoch=8)
            writes += 2
        assert min(readers.get(timeout=30)) > 0 and writes > 0


def test_reader_while_file_is_held_open(stored: SelectionStore) -> None:
    with h5py.File(stored.path, "r", locking=False):
        assert len(SelectionStore.open(stored.path).rounds) == 3
        stored.append(Selection(torch.tensor([1]), torch.tensor([1.0]), epoch=9))
    assert len(SelectionStore.open(stored.path).rounds) == 4


# -- paths and summaries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("x", f"{DEFAULT_DIR}/x.h5"),
        ("x.h5", f"{DEFAULT_DIR}/x.h5"),
        ("x.hdf5", f"{DEFAULT_DIR}/x.hdf5"),
        ("gm_0.1", f"{DEFAULT_DIR}/gm_0.1.h5"),
        ("runs/x", "runs/x.h5"),
        ("./x.h5", "x.h5"),
        ("/abs/x", "/abs/x.h5"),
    ],
)
def test_resolve_path(given: str, expected: str) -> None:
    assert resolve_path(given) == Path(expected)
    if not given.startswith("./"):  # Path("./x") == Path("x"): only a str keeps the "./"
        assert resolve_path(Path(given)) == Path(expected)


def test_summarize(stored: SelectionStore) -> None:
    labels = torch.arange(N) % 4
    summary = summarize(stored, labels)
    json.dumps(summary)  # JSON-able
    assert summary["metadata"]["dataset_size"] == N
    rows = summary["rounds"]
    assert [r["epoch"] for r in rows] == [0, 3, 7]
    assert [r["size"] for r in rows] == [20, 30, 3]
    assert rows[0]["jaccard_prev"] is None and rows[1]["batches"] == 2
    assert rows[2]["weight_min"] == 0.0 and rows[2]["weight_max"] == 2.5
    assert rows[2]["weight_sum"] == pytest.approx(3.5)
    # round 2 = {99, 0, 7} vs round 1 = 10..39: no overlap
    assert rows[2]["jaccard_prev"] == 0.0 and rows[2]["overlap_prev"] == 0.0
    prev, cur = set(stored.rounds[0].indices.tolist()), set(range(10, 40))
    assert rows[1]["jaccard_prev"] == pytest.approx(len(prev & cur) / len(prev | cur))
    assert rows[1]["overlap_prev"] == pytest.approx(len(prev & cur) / len(prev))
    assert rows[1]["class_counts"] == [7, 7, 8, 8] and rows[1]["classes"] == 4
    assert "class_counts" not in summarize(stored)["rounds"][0]
