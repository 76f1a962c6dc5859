"""SelectionStore: round trips, atomic writes, validation, replay mapping, concurrent readers,
incomplete files, stale temp files, resuming the right file."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
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
    remove_stale_temps,
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
    """A finished (complete) file: rounds at epochs 0, 3, 7 of 10."""
    store = SelectionStore.create(tmp_path / "sel.h5", make_meta())
    for r in three_rounds():
        store.append(r)
    store.finish()
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
        assert f.attrs["format_version"] == 2
        assert f.attrs["complete"] == 1 and re.fullmatch("[0-9a-f]{16}", f.attrs["file_id"])
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


def _handmade(path: Path, version: int, **attrs) -> Path:
    """A file written with plain h5py from the README schema: rounds at epochs 0 and 2 of 4."""
    with h5py.File(path, "w") as f:
        f.attrs.update(
            format_version=version, dataset="digits", dataset_size=N, fingerprint="beef",
            num_classes=10, strategy="mine", strategy_params="{}", model="mlp", seed=0,
            epochs=4, config=json.dumps({"dataset": "digits"}), package_version="x",
            created="2024-01-01T00:00:00+00:00", **attrs,
        )  # fmt: skip
        for i, epoch in enumerate((0, 2)):
            g = f.create_group(f"rounds/{i:06d}")
            g.create_dataset("indices", data=np.arange(5, dtype=np.int64) + epoch,
                             compression="gzip")  # fmt: skip
            g.create_dataset("weights", data=np.ones(5, np.float32), compression="gzip")
            g.attrs.update(epoch=epoch, seconds=0.0)
    return path


def test_file_written_by_plain_h5py_is_accepted(tmp_path: Path) -> None:
    """The README schema is enough to write a valid file (compressed datasets are fine)."""
    path = _handmade(tmp_path / "handmade.h5", 2, file_id="0123456789abcdef", complete=1)
    store = SelectionStore.open(path)
    assert store.metadata.config == {"dataset": "digits"} and store.metadata.epochs == 4
    assert store.complete and store.metadata.file_id == "0123456789abcdef"
    assert store.selection_at(3).indices.tolist() == [2, 3, 4, 5, 6]


def test_version_1_file_is_read_as_complete(tmp_path: Path) -> None:
    """Format 1 had no `complete` and no `file_id`: read as complete, with file id ""."""
    path = _handmade(tmp_path / "v1.h5", 1)
    store = SelectionStore.open(path)
    assert store.metadata.format_version == 1 and store.metadata.file_id == ""
    assert store.complete and store.span == 4
    assert store.round_starts() == [0, 2] and store.round_starts(8) == [0, 4]
    store.check_replayable()
    assert summarize(store)["complete"] is True and summarize(store)["warnings"] == []
    assert store.identity() == {"path": str(path), "file_id": "", "rounds": 2, "last_epoch": 2}
    # its first rewrite upgrades it: current format, a file id of its own
    store.append(Selection(torch.tensor([9]), torch.tensor([1.0]), epoch=3))
    again = SelectionStore.open(path)
    assert again.metadata.format_version == FORMAT_VERSION == 2
    assert re.fullmatch("[0-9a-f]{16}", again.metadata.file_id)
    assert again.metadata.file_id == store.metadata.file_id
    assert not again.complete and [r.epoch for r in again.rounds] == [0, 2, 3]


def test_empty_store_round_trips(tmp_path: Path) -> None:
    SelectionStore.create(tmp_path / "empty.h5", make_meta())
    store = SelectionStore.open(tmp_path / "empty.h5")
    assert store.rounds == [] and store.round_starts() == [] and store.round_starts(5) == []
    assert not store.complete and store.span == 0
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
        (Selection(torch.tensor([1, 2]), torch.zeros(2), epoch=9), "all weights are zero"),
        (Selection(torch.tensor([1]), torch.tensor([1.0]), 9, batch_ids=[-1]), "negative|range"),
        (Selection(torch.tensor([1]), torch.tensor([1.0]), 9, batch_ids=[N]), "out of range"),
        (Selection(torch.tensor([1, 2]), torch.ones(2), 9, batch_ids=[3, 3]), "more than once"),
        (Selection(torch.tensor([1]), torch.tensor([1.0]), 9, batch_ids=[]), "batch_ids is empty"),
        (Selection(torch.tensor([1]), torch.tensor([1.0]), 9, batch_ids=[1, 2]), "2 batch ids"),
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
    "format 3": (lambda f: f.attrs.__setitem__("format_version", 3), "newer subsetsel"),
    "format 0": (lambda f: f.attrs.__setitem__("format_version", 0), "unknown .*format"),
    "no rounds group": (lambda f: f.__delitem__("rounds"), "rounds"),
    "no complete": (lambda f: f.attrs.__delitem__("complete"), "'complete'"),
    "complete 2": (lambda f: f.attrs.__setitem__("complete", 2), "'complete' must be 0 or 1"),
    "no file_id": (lambda f: f.attrs.__delitem__("file_id"), "'file_id'"),
    "bad file_id": (lambda f: f.attrs.__setitem__("file_id", "xyz"), "'file_id' must be 16"),
    "num_classes 0": (lambda f: f.attrs.__setitem__("num_classes", 0), "num_classes must be"),
    "num_classes > N": (lambda f: f.attrs.__setitem__("num_classes", N + 1), "num_classes must"),
    "bad select_every": (
        lambda f: f.attrs.__setitem__("strategy_params", '{"select_every": 0}'),
        "select_every",
    ),
    "zero weights": (
        _replace_dataset("rounds/000002/weights", np.zeros(3, np.float32)),
        "all weights are zero",
    ),
    "negative batch id": (
        _replace_dataset("rounds/000001/batch_ids", np.array([-1, 3], np.int64)),
        "batch id -1 out of range",
    ),
    "repeated batch id": (
        _replace_dataset("rounds/000001/batch_ids", np.array([3, 3], np.int64)),
        "batch id 3 appears more than once",
    ),
    "batch id past N": (
        _replace_dataset("rounds/000001/batch_ids", np.array([1, N], np.int64)),
        f"batch id {N} out of range",
    ),
    "more batches than indices": (
        _replace_dataset("rounds/000001/batch_ids", np.arange(31, dtype=np.int64)),
        "31 batch ids for 30 indices",
    ),
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
    _edit(stored.path, lambda f: f.attrs.__setitem__("format_version", 3))
    with pytest.raises(SelectionFileError, match=r"newer subsetsel \(format 3.*upgrade"):
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
    stored.check_compatible(fingerprint="ab12cd", dataset_size=N, num_classes=4)
    with pytest.raises(IncompatibleSelectionError, match="4 classes.*has 10$") as info:
        stored.check_compatible(fingerprint="ab12cd", dataset_size=N, num_classes=10)
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
    store.finish()
    # T=3: round@1 starts at ceil(0.3)=1, round@2 at ceil(0.6)=1 -> the later wins
    assert store.round_starts(3) == [0, 1]
    assert store.selection_at(1, 3).indices.tolist() == [2]


def test_selection_at_before_first_round(tmp_path: Path) -> None:
    store = SelectionStore.create(tmp_path / "late.h5", make_meta())
    store.append(Selection(torch.tensor([1]), torch.tensor([1.0]), epoch=4))
    store.finish()
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


# -- complete and incomplete files ---------------------------------------------------------------


def _killed_run(path: Path, rounds: int = 4, epochs: int = 20, **params) -> SelectionStore:
    """A run killed after `rounds` rounds at epochs 0, 1, 2, ... (select_every 1): no finish()."""
    meta = make_meta(epochs=epochs, strategy_params={"fraction": 0.1, **params})
    store = SelectionStore.create(path, meta)
    for epoch in range(rounds):
        store.append(Selection(torch.tensor([epoch]), torch.tensor([1.0]), epoch=epoch))
    return store


def test_file_is_incomplete_until_finish(tmp_path: Path) -> None:
    store = _killed_run(tmp_path / "k.h5")
    assert not store.complete and not SelectionStore.open(store.path).complete
    with h5py.File(store.path, "r") as f:
        assert f.attrs["complete"] == 0
    store.finish()
    assert store.complete and SelectionStore.open(store.path).complete
    with h5py.File(store.path, "r") as f:
        assert f.attrs["complete"] == 1
    assert_same_rounds(SelectionStore.open(store.path).rounds, store.rounds)
    # changing the rounds again makes it incomplete until the next finish()
    store.truncate(before_epoch=3)
    assert not store.complete and not SelectionStore.open(store.path).complete
    store.finish()
    store.append(Selection(torch.tensor([5]), torch.tensor([1.0]), epoch=5))
    assert not SelectionStore.open(store.path).complete


def test_killed_run_span_and_replay_mapping(tmp_path: Path) -> None:
    """Rounds at 0..3 of a 20-epoch run that was killed cover stored epochs 0-3 only."""
    store = SelectionStore.open(_killed_run(tmp_path / "k.h5").path)
    assert store.span == 4
    # a new run of 8 epochs: epochs 0-1 -> round 0, 2-3 -> round 1, 4-5 -> 2, 6-7 -> 3
    assert [store.round_index_at(e, 8) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert store.round_starts(8) == [0, 2, 4, 6]
    assert [s.epoch for s in store.schedule(8)] == [0, 2, 4, 6]
    sel = store.selection_at(7, 8)
    assert sel.epoch == 6 and sel.indices.tolist() == [3]
    # no total: the identity mapping over the covered epochs
    assert store.round_starts() == [0, 1, 2, 3] and store.selection_at(3).indices.tolist() == [3]
    # a new run of 20 epochs stretches the 4 covered epochs, not round 3 over epochs 3-19
    assert store.round_starts(20) == [0, 5, 10, 15]
    # once finished, the same rounds map onto all 20 stored epochs (unchanged behaviour)
    store.finish()
    assert store.span == 20 and store.round_starts(8) == [0, 1, 2]
    assert store.round_index_at(7, 8) == 3 and store.round_starts(20) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("epochs", "params", "round_epochs", "span"),
    [
        (20, {"select_every": 5}, [0, 5], 10),
        (20, {"select_every": 5}, [0, 5, 10, 15], 20),  # killed in the last round: all covered
        (12, {"select_every": 5}, [0, 5, 10], 12),  # capped at the stored run's epochs
        (20, {"select_every": 5, "warm_epochs": 3}, [0], 3),  # warm-up round: next at epoch 3
        (20, {"select_every": 5, "warm_epochs": 3}, [0, 3], 8),
        (20, {}, [0, 7], 8),  # no select_every recorded: 1
        (20, {"select_every": None, "warm_epochs": None}, [0, 7], 8),
    ],
)
def test_span_of_incomplete_files(tmp_path, epochs, params, round_epochs, span) -> None:
    meta = make_meta(epochs=epochs, strategy_params=params)
    store = SelectionStore.create(tmp_path / "s.h5", meta)
    for e in round_epochs:
        store.append(Selection(torch.tensor([e]), torch.tensor([1.0]), epoch=e))
    assert SelectionStore.open(store.path).span == span
    store.finish()
    assert SelectionStore.open(store.path).span == epochs


def test_check_replayable(tmp_path: Path) -> None:
    store = _killed_run(tmp_path / "x.h5")
    with pytest.raises(SelectionFileError) as info:
        store.check_replayable(allow_incomplete=False)
    message = str(info.value)
    assert message == (
        f"{store.path} is incomplete (rounds up to epoch 3 of 20: the run that wrote it stopped "
        "early); replay it with --allow-incomplete to use only the 4 epochs it covers"
    )
    store.check_replayable(allow_incomplete=True)
    store.finish()
    store.check_replayable()

    empty = SelectionStore.create(tmp_path / "empty.h5", make_meta())
    late = SelectionStore.create(tmp_path / "late.h5", make_meta())
    late.append(Selection(torch.tensor([1]), torch.tensor([1.0]), epoch=2))
    for s, match in ((empty, "holds no selection round"), (late, "no round starts at epoch 0")):
        s.finish()
        for allow in (False, True):
            with pytest.raises(SelectionFileError, match=match) as info:
                s.check_replayable(allow_incomplete=allow)
            assert "\n" not in str(info.value) and str(info.value).startswith(str(s.path))


def test_summarize_reports_incomplete(tmp_path: Path) -> None:
    summary = summarize(_killed_run(tmp_path / "k.h5"))
    json.dumps(summary)
    assert summary["complete"] is False and summary["span"] == 4
    assert len(summary["warnings"]) == 1
    assert summary["warnings"][0].startswith("incomplete: rounds up to epoch 3 of 20")
    assert summary["metadata"]["file_id"]


# -- stale temporary files -----------------------------------------------------------------------


def _dead_pid() -> int:
    """The pid of a child process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    try:
        os.kill(child.pid, 0)
    except ProcessLookupError:
        return child.pid
    pytest.skip("the dead child's pid was reused at once")


def test_next_write_removes_stale_temp_files(stored: SelectionStore) -> None:
    folder, name = stored.path.parent, stored.path.name
    dead = folder / f".{name}.{_dead_pid()}.abcd1234.tmp"
    fake = folder / f".{name}.999999999.abcd1234.tmp"  # beyond any pid_max (2**22)
    ours = folder / f".{name}.{os.getpid()}.00ff00ff.tmp"  # an earlier failed write of ours
    live = folder / f".{name}.{os.getppid()}.12345678.tmp"  # a live writer's: kept
    other = folder / f".{name}.more.{_dead_pid()}.abcd1234.tmp"  # file `sel.h5.more`'s: kept
    for p in (dead, fake, ours, live, other):
        p.write_bytes(b"partial")
    SelectionStore.open(stored.path)  # reading removes nothing
    assert len(_leftovers(folder)) == 5
    stored.append(Selection(torch.tensor([4]), torch.tensor([1.0]), epoch=8))
    assert _leftovers(folder) == sorted([live.name, other.name])
    assert len(SelectionStore.open(stored.path).rounds) == 4


def test_remove_stale_temps_keeps_the_file_being_written(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    writing = tmp_path / f".x.h5.{os.getpid()}.0badc0de.tmp"
    writing.write_bytes(b"")
    assert remove_stale_temps(path, writing=writing) == [] and writing.exists()
    assert remove_stale_temps(path) == [writing] and not writing.exists()


def _write_forever(path: str, ready: str) -> None:
    """Child process: start an append that never finishes (killed while writing its temp file)."""

    def stuck(group, name, r):
        Path(ready).touch()
        time.sleep(60)

    store_mod._write_round = stuck
    SelectionStore.open(path).append(Selection(torch.tensor([4]), torch.tensor([1.0]), epoch=8))


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_writer_killed_mid_write(stored: SelectionStore, tmp_path: Path) -> None:
    """kill -9 during an append: the old file stays whole, the next write removes the temp."""
    before = stored.path.read_bytes()
    ready = tmp_path / "ready"
    child = multiprocessing.get_context("fork").Process(
        target=_write_forever, args=(str(stored.path), str(ready))
    )
    child.start()
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert ready.exists() and len(_leftovers(stored.path.parent)) == 1
    assert stored.path.read_bytes() == before
    stored.truncate(before_epoch=7)
    assert _leftovers(stored.path.parent) == []
    assert [r.epoch for r in SelectionStore.open(stored.path).rounds] == [0, 3]


# -- resuming the file a checkpoint recorded -----------------------------------------------------


def test_identity_and_open_for_resume(tmp_path: Path) -> None:
    store = _killed_run(tmp_path / "r.h5", rounds=3)
    identity = json.loads(json.dumps(store.identity()))  # as a checkpoint stores it
    assert identity == {
        "path": str(store.path),
        "file_id": store.metadata.file_id,
        "rounds": 3,
        "last_epoch": 2,
    }
    assert re.fullmatch("[0-9a-f]{16}", identity["file_id"])
    again = SelectionStore.open_for_resume(store.path, identity)
    assert_same_rounds(again.rounds, store.rounds)
    # killed after an append but before the checkpoint: the extra round is kept for the caller
    store.append(Selection(torch.tensor([7]), torch.tensor([1.0]), epoch=3))
    again = SelectionStore.open_for_resume(store.path, identity)
    assert len(again.rounds) == 4
    again.truncate(before_epoch=3)
    assert [r.epoch for r in SelectionStore.open(store.path).rounds] == [0, 1, 2]


def _assert_refused(path: Path, identity: dict, *needles: str) -> None:
    with pytest.raises(SelectionFileError) as info:
        SelectionStore.open_for_resume(path, identity)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    for needle in needles:
        assert needle in message, message


def test_open_for_resume_refuses_a_deleted_file(tmp_path: Path) -> None:
    store = _killed_run(tmp_path / "r.h5", rounds=3)
    identity = store.identity()
    store.path.unlink()
    _assert_refused(store.path, identity, "was deleted since the checkpoint", "cannot resume")
    # a new file at the path (what resume used to do) is not the one the checkpoint recorded
    SelectionStore.create(store.path, store.metadata)
    _assert_refused(store.path, identity, "is not the file this run was writing")


def test_open_for_resume_refuses_another_file(tmp_path: Path) -> None:
    store = _killed_run(tmp_path / "r.h5", rounds=3)
    identity = store.identity()
    other = _killed_run(tmp_path / "other.h5", rounds=3)  # same metadata, same rounds
    os.replace(other.path, store.path)
    _assert_refused(
        store.path,
        identity,
        "is not the file this run was writing",
        f"file id {other.metadata.file_id}, expected {identity['file_id']}",
    )


def test_open_for_resume_refuses_lost_or_changed_rounds(tmp_path: Path) -> None:
    store = _killed_run(tmp_path / "r.h5", rounds=3)
    identity = store.identity()
    store.truncate(before_epoch=2)
    _assert_refused(store.path, identity, "modified", "2 rounds", "recorded 3")
    store.append(Selection(torch.tensor([1]), torch.tensor([1.0]), epoch=5))  # 3 rounds again
    _assert_refused(store.path, identity, "modified", "round 2 starts at epoch 5", "recorded 2")


def test_open_for_resume_removes_stale_temps_and_checks_its_input(tmp_path: Path) -> None:
    store = _killed_run(tmp_path / "r.h5", rounds=2)
    stale = tmp_path / f".r.h5.{_dead_pid()}.abcd1234.tmp"
    stale.write_bytes(b"partial")
    SelectionStore.open_for_resume(store.path, store.identity())
    assert not stale.exists()
    with pytest.raises(ValueError, match="rounds"):
        SelectionStore.open_for_resume(store.path, {"file_id": "", "rounds": -1})


def test_open_for_resume_of_a_version_1_file(tmp_path: Path) -> None:
    """A checkpoint of a version-1 file recorded no file id: only the rounds are checked."""
    path = _handmade(tmp_path / "v1.h5", 1)
    identity = SelectionStore.open(path).identity()
    assert len(SelectionStore.open_for_resume(path, identity).rounds) == 2
    _assert_refused(path, {**identity, "rounds": 3}, "modified")


def test_every_file_gets_its_own_id(tmp_path: Path) -> None:
    meta = make_meta()
    a = SelectionStore.create(tmp_path / "a.h5", meta)
    b = SelectionStore.create(tmp_path / "b.h5", meta)
    assert a.metadata.file_id != b.metadata.file_id and meta.file_id == ""
    a.append(Selection(torch.tensor([1]), torch.tensor([1.0]), epoch=0))
    a.finish()
    assert SelectionStore.open(a.path).metadata.file_id == a.metadata.file_id  # kept by rewrites


# -- batch ids and classes -----------------------------------------------------------------------


def test_batch_ids_against_the_partition(tmp_path: Path) -> None:
    """With batch_size 32 the partition of N=100 has 4 batches (ids 0-3) of at most 32."""
    meta = make_meta(config={"dataset": "mnist1d", "batch_size": 32})
    store = SelectionStore.create(tmp_path / "pb.h5", meta)
    store.append(Selection(torch.arange(36), torch.ones(36), 0, batch_ids=[1, 3]))
    store.append(Selection(torch.arange(4), torch.ones(4), 1, batch_ids=[3]))  # last: 4 examples
    bad = {
        "batch id 4 out of range [0, 4)": Selection(
            torch.arange(5), torch.ones(5), 2, batch_ids=[4]
        ),
        "33 indices do not fit in 1 batches of 32": Selection(
            torch.arange(33), torch.ones(33), 2, batch_ids=[0]
        ),
    }
    for match, sel in bad.items():
        with pytest.raises(ValueError, match=re.escape(match)):
            store.append(sel)
    assert len(SelectionStore.open(store.path).rounds) == 2
    _edit(store.path, _replace_dataset("rounds/000001/batch_ids", np.array([4], np.int64)))
    with pytest.raises(SelectionFileError, match=re.escape("batch id 4 out of range [0, 4)")):
        SelectionStore.open(store.path)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_classes": 0}, "num_classes must be in"),
        ({"num_classes": N + 1}, "num_classes must be in"),
        ({"config": {"batch_size": 0}}, "batch_size"),
        ({"strategy_params": {"select_every": "5"}}, "select_every"),
        ({"strategy_params": {"warm_epochs": -1}}, "warm_epochs"),
    ],
)
def test_create_refuses_metadata_open_would_refuse(tmp_path, overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        SelectionStore.create(tmp_path / "x.h5", make_meta(**overrides))
    assert not (tmp_path / "x.h5").exists()
