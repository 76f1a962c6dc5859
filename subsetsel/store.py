"""HDF5 selection files: schema, validation, atomic writes and replay of stored rounds.

A selection file holds the weighted subsets (`Selection`s) one run chose, one per round, plus the
provenance needed to replay them safely (dataset fingerprint, size, strategy, config), an id of
its own and whether the run that wrote it finished its schedule.
The schema is documented for plain-h5py users in `selections/README.md`.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from subsetsel import __version__
from subsetsel.atomic import fsync_dir, fsync_file, stale_temp_files, temp_path
from subsetsel.errors import first_line
from subsetsel.selection.base import Selection

FORMAT_VERSION = 2  # version 1 (no `complete`, no `file_id`) is still read
DEFAULT_DIR = "selections"
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
ROUNDS = "rounds"
COMPLETE = "complete"  # file attribute (int 0/1) of format 2; not part of SelectionMetadata

_FILE_ID = re.compile(r"[0-9a-f]{16}")
_TEMP_TAIL = re.compile(r"(\d{1,12})\.[0-9a-f]+\.tmp")  # `<pid>.<random>.tmp` of atomic.temp_path


class SelectionFileError(Exception):
    """A selection file is missing, unreadable, corrupt or breaks the schema (one-line message)."""


class SelectionExistsError(SelectionFileError, FileExistsError):
    """`SelectionStore.create` refused to overwrite an existing file."""


class IncompatibleSelectionError(Exception):
    """A selection file was made for other data than the dataset it is used with."""


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_file_id() -> str:
    """A random file identity: 16 lowercase hex characters (64 bits)."""
    return secrets.token_hex(8)


@dataclass
class SelectionMetadata:
    """Provenance of a selection file (stored as HDF5 file attributes).

    file_id: the file's identity, 16 hex characters, made by `SelectionStore.create` (any value
    given there is replaced) and kept by every rewrite; "" for a version-1 file not yet rewritten.
    """

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
    file_id: str = ""


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
    "file_id": "str",  # format 2 on
}
_V1_ATTRS = {name: kind for name, kind in _ATTRS.items() if name != "file_id"}


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

    Build one with `create` (new file), `open` (existing file, read and validated, then closed) or
    `open_for_resume` (`open` plus a check that it is the file a checkpointed run was writing).
    A writer calls `finish()` once its schedule is done; until then the file is incomplete and
    replay maps only onto the epochs its rounds cover (`span`).
    """

    def __init__(
        self,
        path: Path,
        metadata: SelectionMetadata,
        rounds: list[Selection],
        *,
        complete: bool = False,
    ) -> None:
        self.path = Path(path)
        self.metadata = metadata
        self.rounds = rounds
        self._complete = bool(complete)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | Path, metadata: SelectionMetadata, *, overwrite: bool = False
    ) -> SelectionStore:
        """Write a new, incomplete file with no rounds and a fresh `file_id`; refuse to replace an
        existing file unless `overwrite`."""
        path = Path(path)
        problem = _metadata_problem(metadata)
        if problem:
            raise ValueError(f"invalid selection metadata: {problem}")
        if not overwrite and (path.exists() or path.is_symlink()):
            raise SelectionExistsError(
                f"{path}: selection file already exists (choose another name or overwrite it)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = replace(metadata, file_id=new_file_id(), format_version=FORMAT_VERSION)
        store = cls(path, metadata, [], complete=False)
        store._write([], complete=False, exclusive=not overwrite)
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
                metadata, complete = _read_metadata(path, f)
                rounds = _read_rounds(path, f, metadata)
        except SelectionFileError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
            raise SelectionFileError(
                f"{path}: not a readable HDF5 selection file ({first_line(err)})"
            ) from err
        return cls(path, metadata, rounds, complete=complete)

    @classmethod
    def open_for_resume(cls, path: str | Path, identity: Mapping[str, Any]) -> SelectionStore:
        """Open the file a checkpointed run was writing, after checking it still is that file.

        identity: `identity()` as recorded in the checkpoint. Raises SelectionFileError (one line)
        if the file is gone, has another `file_id` (skipped when the checkpoint recorded none, a
        version-1 file) or lost rounds the checkpoint counted. Rounds appended after the
        checkpoint (a run killed between an append and its checkpoint) are kept: the caller drops
        them with `truncate(resume_epoch)`. Stale temporary files of `path` are removed first.
        Raises ValueError if `identity` is malformed.
        """
        path = Path(path)
        want_rounds, want_id, want_last = _parse_identity(identity)
        remove_stale_temps(path)
        if not path.exists() and not path.is_symlink():
            raise SelectionFileError(
                f"{path} was deleted since the checkpoint; cannot resume: the rounds chosen "
                "before the checkpoint are lost"
            )
        store = cls.open(path)
        have_id = store.metadata.file_id
        if want_id and have_id != want_id:
            raise SelectionFileError(
                f"{path} is not the file this run was writing (file id {have_id or 'none'}, "
                f"expected {want_id}); cannot resume"
            )
        have = len(store.rounds)
        if have < want_rounds:
            raise SelectionFileError(
                f"{path} was modified since the checkpoint (it has {have} rounds, the checkpoint "
                f"recorded {want_rounds}); cannot resume"
            )
        if want_rounds and store.rounds[want_rounds - 1].epoch != want_last:
            raise SelectionFileError(
                f"{path} was modified since the checkpoint (round {want_rounds - 1} starts at "
                f"epoch {store.rounds[want_rounds - 1].epoch}, the checkpoint recorded "
                f"{want_last}); cannot resume"
            )
        return store

    # -- state --------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Whether the run that wrote the file finished its schedule (`finish()` was called).

        Version-1 files, which do not record it, count as complete."""
        return self._complete

    @property
    def span(self) -> int:
        """Epochs of the stored run that the rounds cover, counted from epoch 0.

        metadata.epochs for a complete file. For an incomplete one, the epoch at which the next
        round would have started, capped at metadata.epochs: last round's epoch + select_every
        (from strategy_params, default 1), or warm_epochs when the last round is the full-data
        warm-up round (strategy_params "warm_epochs" > its epoch). 0 with no rounds.
        """
        epochs = self.metadata.epochs
        if self._complete:
            return epochs
        if not self.rounds:
            return 0
        params = self.metadata.strategy_params
        last = self.rounds[-1].epoch
        warm = params.get("warm_epochs") or 0  # validated: None or an int >= 0
        following = warm if last < warm else last + (params.get("select_every") or 1)
        return min(epochs, following)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records to find this file again (`open_for_resume`); JSON-able.

        {"path": str, "file_id": str, "rounds": int, "last_epoch": int or None (no rounds)}."""
        return {
            "path": str(self.path),
            "file_id": self.metadata.file_id,
            "rounds": len(self.rounds),
            "last_epoch": self.rounds[-1].epoch if self.rounds else None,
        }

    def coverage(self) -> str:
        """One phrase on what an incomplete file holds, e.g. "rounds up to epoch 3 of 20"."""
        if not self.rounds:
            return f"no rounds of {self.metadata.epochs} epochs"
        return f"rounds up to epoch {self.rounds[-1].epoch} of {self.metadata.epochs}"

    # -- changes ------------------------------------------------------------------------------

    def append(self, selection: Selection) -> None:
        """Add a round after the last one and rewrite the file atomically (it is then incomplete
        until `finish()`).

        Raises ValueError if the round's epoch is not after the last round's, or its indices are
        out of [0, dataset_size) or repeated, or its weights are negative, not finite or all zero,
        or its batch ids are not a valid choice of batches of the fixed partition.
        """
        problem = _round_problem(
            selection.indices.numpy(),
            selection.weights.numpy(),
            None if selection.batch_ids is None else selection.batch_ids.numpy(),
            selection.epoch,
            selection.seconds,
            self.metadata,
        )
        if problem is None and self.rounds and selection.epoch <= self.rounds[-1].epoch:
            problem = (
                f"epoch {selection.epoch} is not after the last stored round's epoch "
                f"{self.rounds[-1].epoch}"
            )
        if problem:
            raise ValueError(f"cannot append to {self.path}: {problem}")
        # a copy, so later in-place edits stay out
        self._write([*self.rounds, _copy(selection, selection.epoch)], complete=False)

    def truncate(self, before_epoch: int) -> None:
        """Drop every round with epoch >= before_epoch (resuming a run) and rewrite atomically.

        A file that loses rounds is incomplete until `finish()`."""
        rounds = [r for r in self.rounds if r.epoch < before_epoch]
        if len(rounds) != len(self.rounds):
            self._write(rounds, complete=False)

    def finish(self) -> None:
        """Mark the schedule finished (`complete`), rewriting the file atomically if needed."""
        if not self._complete:
            self._write(self.rounds, complete=True)

    # -- use ----------------------------------------------------------------------------------

    def check_compatible(
        self,
        *,
        fingerprint: str,
        dataset_size: int,
        dataset: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        """Raise IncompatibleSelectionError unless the file was made for this data.

        Size, number of classes (when given) and fingerprint must match; the dataset name only
        labels the message (a renamed path to the same data has the same fingerprint and is fine).
        """
        meta = self.metadata
        ours = f" ({dataset})" if dataset else ""
        if dataset_size != meta.dataset_size:
            raise IncompatibleSelectionError(
                f"{self.path}: made for a dataset of {meta.dataset_size} examples "
                f"({meta.dataset}), but this one{ours} has {dataset_size}"
            )
        if num_classes is not None and num_classes != meta.num_classes:
            raise IncompatibleSelectionError(
                f"{self.path}: made for a dataset of {meta.num_classes} classes "
                f"({meta.dataset}), but this one{ours} has {num_classes}"
            )
        if fingerprint != meta.fingerprint:
            raise IncompatibleSelectionError(
                f"{self.path}: made for dataset fingerprint {meta.fingerprint} "
                f"({meta.dataset}), but this dataset{ours} has fingerprint {fingerprint}"
            )

    def check_replayable(self, allow_incomplete: bool = False) -> None:
        """Raise SelectionFileError (one line) unless the file can be replayed: it needs a round
        at epoch 0, and, unless `allow_incomplete`, a finished schedule (`complete`)."""
        if not self.rounds:
            raise SelectionFileError(f"{self.path}: holds no selection round, nothing to replay")
        if self.rounds[0].epoch != 0:
            raise SelectionFileError(
                f"{self.path}: no round starts at epoch 0 (the first starts at epoch "
                f"{self.rounds[0].epoch}), nothing to replay"
            )
        if not self._complete and not allow_incomplete:
            raise SelectionFileError(
                f"{self.path} is incomplete ({self.coverage()}: the run that wrote it stopped "
                f"early); replay it with --allow-incomplete to use only the {self.span} epochs "
                "it covers"
            )

    def selection_at(self, epoch: int, total_epochs: int | None = None) -> Selection:
        """The round in force at `epoch` of a (new) run of `total_epochs` epochs.

        Rounds are mapped by relative training progress over the stored epochs the rounds cover
        (`span`, = metadata.epochs for a complete file): epoch e of the new run corresponds to
        stored epoch floor(e * span / total_epochs), and the round in force there (the last one
        whose epoch is <= it) is returned. total_epochs None means `span` (the identity mapping).
        The result's `.epoch` is in the new run's epochs: the first epoch of the new run at which
        this round is in force (a value of `round_starts`), so it equals `epoch` exactly when a
        new round starts there.
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
        stored = epoch * self.span // total
        index = bisect.bisect_right([r.epoch for r in self.rounds], stored) - 1
        if index < 0:
            first = "it has no rounds"
            if self.rounds:
                first = f"its first round starts at epoch {self.rounds[0].epoch}"
            raise ValueError(f"{self.path}: no round in force at epoch {epoch}; {first}")
        return index

    def round_starts(self, total_epochs: int | None = None) -> list[int]:
        """Epochs of the new run (< total_epochs) at which the round in force changes.

        Same mapping as `selection_at`; total_epochs None means `span`. Rounds that the mapping
        skips (a much shorter new run) do not appear.
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
        # span is 0 only without rounds; then any total >= 1 maps onto "no round in force"
        total = (self.span or self.metadata.epochs) if total_epochs is None else int(total_epochs)
        if total < 1:
            raise ValueError(f"total_epochs must be >= 1, got {total}")
        return total

    def _start(self, stored_epoch: int, total: int) -> int:
        """First new-run epoch e with floor(e * S / total) >= stored_epoch, i.e. ceil(s*total/S),
        S = span (>= 1 whenever there are rounds)."""
        return -(-stored_epoch * total // self.span)

    # -- writing ------------------------------------------------------------------------------

    def _write(self, rounds: list[Selection], *, complete: bool, exclusive: bool = False) -> None:
        """Write metadata + rounds to a temp file beside `path`, fsync it, move it in place, then
        adopt `rounds` and `complete` and remove stale temp files of `path`.

        A version-1 file is rewritten as the current format and gets a `file_id`.
        exclusive: fail (SelectionExistsError) if `path` appeared meanwhile instead of replacing.
        On any failure the existing file and this store are untouched and the temp file removed.
        """
        path = self.path
        meta = replace(
            self.metadata,
            format_version=FORMAT_VERSION,
            file_id=self.metadata.file_id or new_file_id(),
        )
        tmp = temp_path(path)
        try:
            with h5py.File(tmp, "w-", locking=False) as f:
                _write_metadata(f, meta, complete)
                group = f.create_group(ROUNDS)
                for i, r in enumerate(rounds):
                    _write_round(group, f"{i:06d}", r)
            fsync_file(tmp)
            if exclusive:
                _move_exclusive(tmp, path)
            else:
                os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(err, OSError) and not isinstance(err, SelectionFileError):
                raise SelectionFileError(f"{path}: could not write ({first_line(err)})") from err
            raise
        self.metadata, self.rounds, self._complete = meta, rounds, complete
        remove_stale_temps(path)


def remove_stale_temps(path: str | Path, writing: Path | None = None) -> list[Path]:
    """Remove temporary files of `path` (`.NAME.<pid>.<hex>.tmp`) left by killed writers: those
    whose pid is not a live process, or is this process's (except `writing`, the one in use).

    Temp files of live processes are kept (a concurrent writer's, or a reused pid's: harmless).
    Where liveness cannot be probed safely (not POSIX) only this process's are removed.
    Returns the removed paths; files that cannot be removed are left.
    """
    path = Path(path)
    prefix = f".{path.name}."
    removed: list[Path] = []
    for tmp in stale_temp_files(path):
        if tmp == writing or not tmp.name.startswith(prefix):
            continue
        match = _TEMP_TAIL.fullmatch(tmp.name[len(prefix) :])
        if match is None:  # another file's temp (`.NAME.more.<pid>.<hex>.tmp`) or not a temp
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or not _pid_alive(pid):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (True when it cannot be told safely)."""
    if pid <= 0:
        return False  # no writer has such a pid (and os.kill(0) would signal our group)
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):
        return False  # not a possible pid
    except OSError:  # PermissionError: alive, owned by another user
        return True
    return True


def _parse_identity(identity: Mapping[str, Any]) -> tuple[int, str, int | None]:
    """(rounds, file_id, last_epoch) of a recorded `identity()`; ValueError if malformed."""
    if not isinstance(identity, Mapping):
        raise ValueError(f"selection file identity must be a dict, got {type(identity).__name__}")
    rounds, file_id = identity.get("rounds"), identity.get("file_id", "")
    last = identity.get("last_epoch")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"selection file identity: 'rounds' must be an int >= 0, got {rounds!r}")
    if not isinstance(file_id, str):
        raise ValueError(f"selection file identity: 'file_id' must be a str, got {file_id!r}")
    if rounds and (isinstance(last, bool) or not isinstance(last, int)):
        raise ValueError(f"selection file identity: 'last_epoch' must be an int, got {last!r}")
    return rounds, file_id, last if rounds else None


def _copy(r: Selection, epoch: int) -> Selection:
    """A Selection with its own tensors, so callers' in-place edits never reach the store."""
    batch_ids = None if r.batch_ids is None else r.batch_ids.clone()
    return replace(
        r, indices=r.indices.clone(), weights=r.weights.clone(), epoch=epoch, batch_ids=batch_ids
    )


def _write_metadata(f: h5py.File, meta: SelectionMetadata, complete: bool) -> None:
    for name, kind in _ATTRS.items():
        value = getattr(meta, name)
        if kind == "json":
            f.attrs[name] = json.dumps(value, sort_keys=True)
        elif kind == "int":
            f.attrs[name] = np.int64(value)
        else:
            f.attrs[name] = str(value)
    f.attrs[COMPLETE] = np.int64(1 if complete else 0)


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


# -- reading and validation ------------------------------------------------------------------


def _read_metadata(path: Path, f: h5py.File) -> tuple[SelectionMetadata, bool]:
    """The file's metadata and `complete` flag (format 1 files: file_id "" and complete)."""
    attrs = f.attrs
    if "format_version" not in attrs:
        raise SelectionFileError(f"{path}: not a subsetsel selection file (no format_version)")
    version = _attr(path, attrs, "format_version", "int")
    if version > FORMAT_VERSION:
        raise SelectionFileError(
            f"{path}: written by a newer subsetsel (format {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade subsetsel"
        )
    if version < 1:
        raise SelectionFileError(f"{path}: unknown selection file format version {version}")
    names = _V1_ATTRS if version == 1 else _ATTRS
    values = {name: _attr(path, attrs, name, kind) for name, kind in names.items()}
    meta = SelectionMetadata(**values)
    complete = True  # format 1 did not record it: its files count as complete
    if version >= 2:
        if not _FILE_ID.fullmatch(meta.file_id):
            raise SelectionFileError(
                f"{path}: file attribute 'file_id' must be 16 lowercase hex characters, "
                f"got {meta.file_id!r}"
            )
        complete = _complete_attr(path, attrs)
    problem = _metadata_problem(meta)
    if problem:
        raise SelectionFileError(f"{path}: {problem}")
    return meta, complete


def _complete_attr(path: Path, attrs: h5py.AttributeManager) -> bool:
    if COMPLETE not in attrs:
        raise SelectionFileError(f"{path}: missing file attribute {COMPLETE!r}")
    value = attrs[COMPLETE]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    raise SelectionFileError(f"{path}: file attribute {COMPLETE!r} must be 0 or 1, got {value!r}")


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
    if not 1 <= meta.num_classes <= meta.dataset_size:
        return (
            f"num_classes must be in [1, dataset_size={meta.dataset_size}], got {meta.num_classes}"
        )
    for name in ("strategy_params", "config"):
        value = getattr(meta, name)
        if not isinstance(value, dict):
            return f"{name} must be a dict, got {type(value).__name__}"
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            return f"{name} is not JSON-serialisable ({err})"
    # the settings `span` and the batch-id checks rely on
    for where, key, least in (
        ("strategy_params", "select_every", 1),
        ("strategy_params", "warm_epochs", 0),
        ("config", "batch_size", 1),
    ):
        value = getattr(meta, where).get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            return f"{where}[{key!r}] must be an integer >= {least}, got {value!r}"
    return None


def _read_rounds(path: Path, f: h5py.File, meta: SelectionMetadata) -> list[Selection]:
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
            arrays["indices"], arrays["weights"], arrays["batch_ids"], epoch, seconds, meta
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
    meta: SelectionMetadata,
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
    n = meta.dataset_size
    problem = _ids_problem("index", indices, n)
    if problem:
        return problem
    if not np.isfinite(weights).all():
        return "weights contain NaN or infinity"
    if (weights < 0).any():
        return f"negative weight {float(weights.min())}"
    if not weights.astype(np.float64).sum() > 0:
        return "all weights are zero (the round would train on nothing)"
    if batch_ids is not None:
        return _batch_ids_problem(batch_ids, k, n, meta.config.get("batch_size"))
    return None


def _ids_problem(what: str, ids: np.ndarray, bound: int, partition: str = "") -> str | None:
    """Out-of-range ([0, bound)) or repeated ids, named `what` in the message."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= bound:
        bad = lo if lo < 0 else hi
        return f"{what} {bad} out of range [0, {bound}){partition}"
    ordered = np.sort(ids)
    dup = ordered[1:][ordered[1:] == ordered[:-1]]
    if dup.size:
        return f"{what} {int(dup[0])} appears more than once"
    return None


def _batch_ids_problem(batch_ids: np.ndarray, k: int, n: int, batch_size: int | None) -> str | None:
    """Batch ids of a PB round: ids of distinct batches of the fixed partition of n examples into
    ceil(n / batch_size) batches (batch_size from the config; n batches at most when unknown),
    whose members are the round's k indices: every batch holds 1..batch_size of them."""
    m = batch_ids.shape[0]
    if m == 0:
        return "batch_ids is empty (a per-batch round holds at least one batch)"
    bound, partition = n, ""
    if batch_size is not None:
        bound = -(-n // batch_size)
        partition = f" (the partition of {n} examples into batches of {batch_size})"
    problem = _ids_problem("batch id", batch_ids, bound, partition)
    if problem:
        return problem
    if m > k:
        return f"{m} batch ids for {k} indices (every batch holds at least one example)"
    if batch_size is not None and k > m * batch_size:
        return f"{k} indices do not fit in {m} batches of {batch_size}"
    return None


# -- summaries ---------------------------------------------------------------------------------


def summarize(store: SelectionStore, labels: torch.Tensor | None = None) -> dict[str, Any]:
    """A JSON-able digest of a store: metadata and per-round statistics.

    Per round: index, epoch, size, fraction of N, seconds, weight min/mean/max/sum, number of
    batch ids (PB), and versus the previous round: `jaccard_prev` = |A∩B|/|A∪B| and
    `overlap_prev` = |A∩B|/|B|, the share of the previous round (B) kept in this round (A).
    With `labels` (N,) also `classes` (distinct labels) and `class_counts` (examples per class).
    Top level: `complete`, `span` (stored epochs the rounds cover) and `warnings` (one-line
    strings, e.g. "incomplete: rounds up to epoch 3 of 20 (...)" for an incomplete file).
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
    warnings = []
    if not store.complete:
        warnings.append(
            f"incomplete: {store.coverage()} (the run that wrote it stopped early; "
            f"its rounds cover epochs 0-{store.span - 1})"
            if store.rounds
            else f"incomplete: {store.coverage()} (the run that wrote it stopped before "
            "its first selection)"
        )
    return {
        "path": str(store.path),
        "metadata": asdict(meta),
        "complete": store.complete,
        "span": store.span,
        "warnings": warnings,
        "rounds": rounds,
    }


__all__ = [
    "DEFAULT_DIR",
    "FORMAT_VERSION",
    "IncompatibleSelectionError",
    "SelectionExistsError",
    "SelectionFileError",
    "SelectionMetadata",
    "SelectionStore",
    "find_existing",
    "new_file_id",
    "remove_stale_temps",
    "resolve_path",
    "summarize",
]
