"""HDF5 selection files: schema, validation, atomic writes and replay of stored rounds.

A selection file holds the weighted subsets (`Selection`s) one run chose, one per round, plus the
provenance needed to replay them safely (dataset fingerprint, size, strategy, config).
The schema is documented for plain-h5py users in `selections/README.md`.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import secrets
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from subsetsel import __version__
from subsetsel.errors import first_line
from subsetsel.selection.base import Selection

FORMAT_VERSION = 1
DEFAULT_DIR = "selections"
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
ROUNDS = "rounds"


class SelectionFileError(Exception):
    """A selection file is missing, unreadable, corrupt or breaks the schema (one-line message)."""


class SelectionExistsError(SelectionFileError, FileExistsError):
    """`SelectionStore.create` refused to overwrite an existing file."""


class IncompatibleSelectionError(Exception):
    """A selection file was made for other data than the dataset it is used with."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class SelectionMetadata:
    """Provenance of a selection file (stored as HDF5 file attributes)."""

    dataset: str
    dataset_size: int
    fingerprint: str
    num_classes: int
    strategy: str
    strategy_params: dict[str, Any]
    model: str
    seed: int
    epochs: int  # epochs of the run that made the file
    config: dict[str, Any]  # the full run config (JSON-able)
    package_version: str = __version__
    created: str = field(default_factory=_utc_now)
    format_version: int = FORMAT_VERSION


# attr name -> kind: "str", "int" or "json" (a JSON object stored as a string)
_ATTRS: dict[str, str] = {
    "format_version": "int",
    "dataset": "str",
    "dataset_size": "int",
    "fingerprint": "str",
    "num_classes": "int",
    "strategy": "str",
    "strategy_params": "json",
    "model": "str",
    "seed": "int",
    "epochs": "int",
    "config": "json",
    "package_version": "str",
    "created": "str",
}


def resolve_path(path: str | Path) -> Path:
    """Where a selection file lives: a bare name goes under DEFAULT_DIR, ".h5" is added if needed.

    `x` -> `selections/x.h5`, `runs/x` -> `runs/x.h5`, `x.hdf5` -> `selections/x.hdf5`.
    Names whose suffix is not an HDF5 one (`gm_0.1`) get ".h5" appended (`gm_0.1.h5`).
    Pass a str to keep a leading "./" (`./x` -> `x.h5`): `Path("./x")` is the same as `Path("x")`.
    """
    text = os.fspath(path)
    p = Path(text).expanduser()
    has_dir = os.sep in text or (os.altsep is not None and os.altsep in text)
    if not has_dir and not p.is_absolute():
        p = Path(DEFAULT_DIR) / p
    if p.suffix.lower() not in HDF5_SUFFIXES:
        p = p.with_name(p.name + ".h5")
    return p


def find_existing(path: str | Path) -> Path:
    """The file to read for a user's FILE: `resolve_path(FILE)`, or FILE as given when only that
    exists (so `x.h5` in the current folder is found too)."""
    resolved = resolve_path(path)
    if not resolved.exists() and Path(path).exists():
        return Path(path)
    return resolved


class SelectionStore:
    """The rounds of one selection file, held in memory; every change rewrites the file atomically.

    Build one with `create` (new file) or `open` (existing file, read and validated, then closed).
    """

    def __init__(self, path: Path, metadata: SelectionMetadata, rounds: list[Selection]) -> None:
        self.path = Path(path)
        self.metadata = metadata
        self.rounds = rounds

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | Path, metadata: SelectionMetadata, *, overwrite: bool = False
    ) -> SelectionStore:
        """Write a new file with no rounds; refuse to replace an existing one unless `overwrite`."""
        path = Path(path)
        problem = _metadata_problem(metadata)
        if problem:
            raise ValueError(f"invalid selection metadata: {problem}")
        if not overwrite and (path.exists() or path.is_symlink()):
            raise SelectionExistsError(
                f"{path}: selection file already exists (choose another name or overwrite it)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        store = cls(path, metadata, [])
        store._write(store.rounds, exclusive=not overwrite)
        return store

    @classmethod
    def open(cls, path: str | Path) -> SelectionStore:
        """Read and fully validate a file, loading every round; raises SelectionFileError."""
        path = Path(path)
        if not path.exists():
            raise SelectionFileError(f"{path}: no such selection file")
        if path.is_dir():
            raise SelectionFileError(f"{path}: is a directory, not a selection file")
        try:
            with h5py.File(path, "r", locking=False) as f:
                metadata = _read_metadata(path, f)
                rounds = _read_rounds(path, f, metadata.dataset_size)
        except SelectionFileError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
            raise SelectionFileError(
                f"{path}: not a readable HDF5 selection file ({first_line(err)})"
            ) from err
        return cls(path, metadata, rounds)

    # -- changes ------------------------------------------------------------------------------

    def append(self, selection: Selection) -> None:
        """Add a round after the last one and rewrite the file atomically.

        Raises ValueError if the round's epoch is not after the last round's, or its indices are
        out of [0, dataset_size) or repeated, or its weights are negative or not finite.
        """
        problem = _round_problem(
            selection.indices.numpy(),
            selection.weights.numpy(),
            None if selection.batch_ids is None else selection.batch_ids.numpy(),
            selection.epoch,
            selection.seconds,
            self.metadata.dataset_size,
        )
        if problem is None and self.rounds and selection.epoch <= self.rounds[-1].epoch:
            problem = (
                f"epoch {selection.epoch} is not after the last stored round's epoch "
                f"{self.rounds[-1].epoch}"
            )
        if problem:
            raise ValueError(f"cannot append to {self.path}: {problem}")
        rounds = [*self.rounds, _copy(selection, selection.epoch)]  # later in-place edits stay out
        self._write(rounds)
        self.rounds = rounds

    def truncate(self, before_epoch: int) -> None:
        """Drop every round with epoch >= before_epoch (resuming a run) and rewrite atomically."""
        rounds = [r for r in self.rounds if r.epoch < before_epoch]
        if len(rounds) != len(self.rounds):
            self._write(rounds)
            self.rounds = rounds

    # -- use ----------------------------------------------------------------------------------

    def check_compatible(
        self, *, fingerprint: str, dataset_size: int, dataset: str | None = None
    ) -> None:
        """Raise IncompatibleSelectionError unless the file was made for this data.

        Size and fingerprint must match; the dataset name only labels the message (a renamed path
        to the same data has the same fingerprint and is fine).
        """
        meta = self.metadata
        ours = f" ({dataset})" if dataset else ""
        if dataset_size != meta.dataset_size:
            raise IncompatibleSelectionError(
                f"{self.path}: made for a dataset of {meta.dataset_size} examples "
                f"({meta.dataset}), but this one{ours} has {dataset_size}"
            )
        if fingerprint != meta.fingerprint:
            raise IncompatibleSelectionError(
                f"{self.path}: made for dataset fingerprint {meta.fingerprint} "
                f"({meta.dataset}), but this dataset{ours} has fingerprint {fingerprint}"
            )

    def selection_at(self, epoch: int, total_epochs: int | None = None) -> Selection:
        """The round in force at `epoch` of a (new) run of `total_epochs` epochs.

        With total_epochs None or equal to metadata.epochs, that is the last round whose epoch is
        <= `epoch`. Otherwise rounds are mapped by relative training progress: epoch e of the new
        run corresponds to stored epoch floor(e * metadata.epochs / total_epochs), and the round in
        force there is returned. The result's `.epoch` is in the new run's epochs: the first
        epoch of the new run at which this round is in force (a value of `round_starts`), so it
        equals `epoch` exactly when a new round starts there.
        Raises ValueError if no round is in force yet (the first round starts later).
        """
        total = self._total(total_epochs)
        chosen = self.rounds[self.round_index_at(epoch, total)]
        return _copy(chosen, self._start(chosen.epoch, total))

    def round_index_at(self, epoch: int, total_epochs: int | None = None) -> int:
        """Index into `rounds` of the round in force at `epoch` (same mapping as `selection_at`)."""
        total = self._total(total_epochs)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        stored = epoch * self.metadata.epochs // total
        index = bisect.bisect_right([r.epoch for r in self.rounds], stored) - 1
        if index < 0:
            first = "it has no rounds"
            if self.rounds:
                first = f"its first round starts at epoch {self.rounds[0].epoch}"
            raise ValueError(f"{self.path}: no round in force at epoch {epoch}; {first}")
        return index

    def round_starts(self, total_epochs: int | None = None) -> list[int]:
        """Epochs of the new run (< total_epochs) at which the round in force changes.

        Same mapping as `selection_at`; total_epochs None means metadata.epochs. Rounds that the
        mapping skips (a much shorter new run) do not appear.
        """
        total = self._total(total_epochs)
        starts: list[int] = []
        for r in self.rounds:
            s = self._start(r.epoch, total)
            if s >= total:
                break
            if starts and starts[-1] == s:
                starts.pop()  # a later stored round takes over at the same new epoch
            starts.append(s)
        return starts

    def schedule(self, total_epochs: int | None = None) -> list[Selection]:
        """The rounds in force in a new run, each with `.epoch` = where it starts there."""
        return [self.selection_at(s, total_epochs) for s in self.round_starts(total_epochs)]

    def _total(self, total_epochs: int | None) -> int:
        total = self.metadata.epochs if total_epochs is None else int(total_epochs)
        if total < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total}")
        return total

    def _start(self, stored_epoch: int, total: int) -> int:
        """First new-run epoch e with floor(e * E / total) >= stored_epoch, i.e. ceil(s*total/E)."""
        e_stored = self.metadata.epochs
        return -(-stored_epoch * total // e_stored)

    # -- writing ------------------------------------------------------------------------------

    def _write(self, rounds: list[Selection], *, exclusive: bool = False) -> None:
        """Write metadata + rounds to a temp file beside `path`, fsync it, then move it in place.

        exclusive: fail (SelectionExistsError) if `path` appeared meanwhile instead of replacing.
        On any failure the existing file is untouched and the temp file is removed.
        """
        path = self.path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            with h5py.File(tmp, "w-", locking=False) as f:
                _write_metadata(f, self.metadata)
                group = f.create_group(ROUNDS)
                for i, r in enumerate(rounds):
                    _write_round(group, f"{i:06d}", r)
            _fsync(tmp)
            if exclusive:
                _move_exclusive(tmp, path)
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(err, OSError) and not isinstance(err, SelectionFileError):
                raise SelectionFileError(f"{path}: could not write ({first_line(err)})") from err
            raise


def _copy(r: Selection, epoch: int) -> Selection:
    """A Selection with its own tensors, so callers' in-place edits never reach the store."""
    batch_ids = None if r.batch_ids is None else r.batch_ids.clone()
    return replace(
        r, indices=r.indices.clone(), weights=r.weights.clone(), epoch=epoch, batch_ids=batch_ids
    )


def _write_metadata(f: h5py.File, meta: SelectionMetadata) -> None:
    for name, kind in _ATTRS.items():
        value = FORMAT_VERSION if name == "format_version" else getattr(meta, name)
        if kind == "json":
            f.attrs[name] = json.dumps(value, sort_keys=True)
        elif kind == "int":
            f.attrs[name] = np.int64(value)
        else:
            f.attrs[name] = str(value)


def _write_round(group: h5py.Group, name: str, r: Selection) -> None:
    # Uncompressed on purpose: gzip(1)+shuffle halves the size of a 50k-index round but makes
    # writing ~3x and reading ~2x slower, and every append rewrites all rounds (see README).
    g = group.create_group(name)
    g.create_dataset("indices", data=r.indices.numpy().astype(np.int64))
    g.create_dataset("weights", data=r.weights.numpy().astype(np.float32))
    if r.batch_ids is not None:
        g.create_dataset("batch_ids", data=r.batch_ids.numpy().astype(np.int64))
    g.attrs["epoch"] = np.int64(r.epoch)
    g.attrs["seconds"] = np.float64(r.seconds)


def _move_exclusive(tmp: Path, path: Path) -> None:
    """Move tmp to path without ever replacing an existing file (hard link, else check+rename)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise SelectionExistsError(f"{path}: selection file already exists") from None
    except OSError:  # no hard links on this file system
        if path.exists():
            raise SelectionExistsError(f"{path}: selection file already exists") from None
        os.replace(tmp, path)
    else:
        tmp.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable where the platform allows syncing a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading and validation ------------------------------------------------------------------


def _read_metadata(path: Path, f: h5py.File) -> SelectionMetadata:
    attrs = f.attrs
    if "format_version" not in attrs:
        raise SelectionFileError(f"{path}: not a subsetsel selection file (no format_version)")
    version = _attr(path, attrs, "format_version", "int")
    if version > FORMAT_VERSION:
        raise SelectionFileError(
            f"{path}: written by a newer subsetsel (format {version}, this one reads "
            f"{FORMAT_VERSION}); upgrade subsetsel"
        )
    if version != FORMAT_VERSION:
        raise SelectionFileError(f"{path}: unknown selection file format version {version}")
    values = {name: _attr(path, attrs, name, kind) for name, kind in _ATTRS.items()}
    meta = SelectionMetadata(**values)
    problem = _metadata_problem(meta)
    if problem:
        raise SelectionFileError(f"{path}: {problem}")
    return meta


def _attr(path: Path, attrs: h5py.AttributeManager, name: str, kind: str) -> Any:
    if name not in attrs:
        raise SelectionFileError(f"{path}: missing file attribute {name!r}")
    value = attrs[name]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if kind == "int":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise SelectionFileError(
                f"{path}: file attribute {name!r} must be an integer, got {_describe(value)}"
            )
        return int(value)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise SelectionFileError(f"{path}: file attribute {name!r} is not UTF-8") from None
    if not isinstance(value, str):
        raise SelectionFileError(
            f"{path}: file attribute {name!r} must be a string, got {_describe(value)}"
        )
    if kind == "json":
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise SelectionFileError(
                f"{path}: file attribute {name!r} is not valid JSON ({err})"
            ) from None
        if not isinstance(value, dict):
            raise SelectionFileError(f"{path}: file attribute {name!r} must be a JSON object")
    return value


def _describe(value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    return f"{type(value).__name__}" + (f" ({dtype})" if dtype is not None else "")


def _metadata_problem(meta: SelectionMetadata) -> str | None:
    if meta.dataset_size < 1:
        return f"dataset_size must be >= 1, got {meta.dataset_size}"
    if meta.epochs < 1:
        return f"epochs must be >= 1, got {meta.epochs}"
    if meta.num_classes < 0:
        return f"num_classes must be >= 0, got {meta.num_classes}"
    for name in ("strategy_params", "config"):
        value = getattr(meta, name)
        if not isinstance(value, dict):
            return f"{name} must be a dict, got {type(value).__name__}"
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            return f"{name} is not JSON-serialisable ({err})"
    return None


def _read_rounds(path: Path, f: h5py.File, dataset_size: int) -> list[Selection]:
    if ROUNDS not in f or not isinstance(f[ROUNDS], h5py.Group):
        raise SelectionFileError(f"{path}: missing group '{ROUNDS}/'")
    group = f[ROUNDS]
    names = sorted(group.keys())
    expected = [f"{i:06d}" for i in range(len(names))]
    if names != expected:  # same length, so something is missing and something is extra
        missing = min(set(expected) - set(names))
        extra = min(set(names) - set(expected))
        raise SelectionFileError(
            f"{path}: round '{ROUNDS}/{missing}' is missing, found '{ROUNDS}/{extra}' instead "
            "(rounds are numbered 000000, 000001, ... without gaps)"
        )
    rounds: list[Selection] = []
    for name in names:
        where = f"{path}: round '{ROUNDS}/{name}'"
        g = group[name]
        if not isinstance(g, h5py.Group):
            raise SelectionFileError(f"{where} is not a group")
        arrays = {}
        for ds_name, kind in (("indices", "i"), ("weights", "f"), ("batch_ids", "i")):
            if ds_name not in g:
                if ds_name == "batch_ids":
                    arrays[ds_name] = None
                    continue
                raise SelectionFileError(f"{where}: missing dataset {ds_name!r}")
            arrays[ds_name] = _read_array(where, g[ds_name], ds_name, kind)
        epoch = _round_attr(where, g.attrs, "epoch", int)
        seconds = _round_attr(where, g.attrs, "seconds", float)
        problem = _round_problem(
            arrays["indices"], arrays["weights"], arrays["batch_ids"], epoch, seconds, dataset_size
        )
        if problem is None and rounds and epoch <= rounds[-1].epoch:
            problem = f"epoch {epoch} is not after the previous round's epoch {rounds[-1].epoch}"
        if problem:
            raise SelectionFileError(f"{where}: {problem}")
        batch_ids = arrays["batch_ids"]
        rounds.append(
            Selection(
                torch.from_numpy(arrays["indices"]),
                torch.from_numpy(arrays["weights"]),
                epoch=epoch,
                seconds=seconds,
                batch_ids=None if batch_ids is None else torch.from_numpy(batch_ids),
            )
        )
    return rounds


def _read_array(where: str, ds: Any, name: str, kind: str) -> np.ndarray:
    """Read a 1-D int64 (kind "i") or float32 (kind "f") dataset, checking its type and shape."""
    if not isinstance(ds, h5py.Dataset):
        raise SelectionFileError(f"{where}: {name!r} is not a dataset")
    want = np.dtype(np.int64) if kind == "i" else np.dtype(np.float32)
    dt = ds.dtype
    if dt.kind != want.kind or dt.itemsize != want.itemsize:
        raise SelectionFileError(f"{where}: {name!r} has dtype {dt}, expected {want}")
    if ds.ndim != 1:
        raise SelectionFileError(f"{where}: {name!r} has shape {ds.shape}, expected 1-D")
    return np.ascontiguousarray(ds[()], dtype=want)


def _round_attr(where: str, attrs: Any, name: str, typ: type) -> Any:
    if name not in attrs:
        raise SelectionFileError(f"{where}: missing attribute {name!r}")
    value = attrs[name]
    ok = (np.integer, int) if typ is int else (np.integer, np.floating, int, float)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, ok):
        raise SelectionFileError(f"{where}: attribute {name!r} must be {typ.__name__}")
    return typ(value)


def _round_problem(
    indices: np.ndarray,
    weights: np.ndarray,
    batch_ids: np.ndarray | None,
    epoch: int,
    seconds: float,
    dataset_size: int,
) -> str | None:
    """What is wrong with one round, or None. Shared by `append` and `open`."""
    if epoch < 0:
        return f"epoch must be >= 0, got {epoch}"
    if not math.isfinite(seconds) or seconds < 0:
        return f"seconds must be finite and >= 0, got {seconds}"
    k = indices.shape[0]
    if k == 0:
        return "empty selection (no indices)"
    if weights.shape[0] != k:
        return f"{k} indices but {weights.shape[0]} weights"
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= dataset_size:
        bad = lo if lo < 0 else hi
        return f"index {bad} out of range [0, {dataset_size})"
    ordered = np.sort(indices)
    dup = ordered[1:][ordered[1:] == ordered[:-1]]
    if dup.size:
        return f"index {int(dup[0])} appears more than once"
    if not np.isfinite(weights).all():
        return "weights contain NaN or infinity"
    if (weights < 0).any():
        return f"negative weight {float(weights.min())}"
    if batch_ids is not None and batch_ids.size and int(batch_ids.min()) < 0:
        return f"negative batch id {int(batch_ids.min())}"
    return None


# -- summaries ---------------------------------------------------------------------------------


def summarize(store: SelectionStore, labels: torch.Tensor | None = None) -> dict[str, Any]:
    """A JSON-able digest of a store: metadata and per-round statistics.

    Per round: index, epoch, size, fraction of N, seconds, weight min/mean/max/sum, number of
    batch ids (PB), and versus the previous round: `jaccard_prev` = |A∩B|/|A∪B| and
    `overlap_prev` = |A∩B|/|B|, the share of the previous round (B) kept in this round (A).
    With `labels` (N,) also `classes` (distinct labels) and `class_counts` (examples per class).
    """
    meta = store.metadata
    n = meta.dataset_size
    label_arr = None
    num_classes = meta.num_classes
    if labels is not None:
        label_arr = torch.as_tensor(labels).detach().cpu().reshape(-1).numpy().astype(np.int64)
        if label_arr.shape[0] != n:
            raise ValueError(f"{label_arr.shape[0]} labels for a dataset of {n} examples")
        num_classes = max(num_classes, int(label_arr.max()) + 1 if label_arr.size else 0)
    rounds: list[dict[str, Any]] = []
    prev: np.ndarray | None = None
    for i, r in enumerate(store.rounds):
        idx = r.indices.numpy()
        w = r.weights.numpy().astype(np.float64)
        row: dict[str, Any] = {
            "round": i,
            "epoch": r.epoch,
            "size": int(idx.size),
            "fraction": idx.size / n,
            "seconds": r.seconds,
            "weight_min": float(w.min()),
            "weight_mean": float(w.mean()),
            "weight_max": float(w.max()),
            "weight_sum": float(w.sum()),
            "batches": None if r.batch_ids is None else int(r.batch_ids.numel()),
            "jaccard_prev": None,
            "overlap_prev": None,
        }
        if prev is not None:
            common = np.intersect1d(idx, prev, assume_unique=True).size
            row["jaccard_prev"] = common / (idx.size + prev.size - common)
            row["overlap_prev"] = common / prev.size
        if label_arr is not None:
            counts = np.bincount(label_arr[idx], minlength=num_classes)
            row["classes"] = int((counts > 0).sum())
            row["class_counts"] = [int(c) for c in counts]
        rounds.append(row)
        prev = idx
    return {"path": str(store.path), "metadata": asdict(meta), "rounds": rounds}


__all__ = [
    "DEFAULT_DIR",
    "FORMAT_VERSION",
    "IncompatibleSelectionError",
    "SelectionExistsError",
    "SelectionFileError",
    "SelectionMetadata",
    "SelectionStore",
    "find_existing",
    "resolve_path",
    "summarize",
]
