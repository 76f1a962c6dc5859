"""A run folder: claimed atomically, strict-JSON logs, atomic checkpoints and summaries.

Layout: config.json (what the run is), log.jsonl (one JSON object per period), checkpoint.pt
(after every period), summary.json (at the end). Only one run ever writes a folder: it is
claimed by creating config.json exclusively.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from subsetsel.atomic import atomic_open, atomic_write_text
from subsetsel.errors import first_line


class RunDirError(ValueError):
    """A run folder cannot be used for this run (another run holds it): one line."""


class RunFileError(RuntimeError):
    """A file of a run folder (config, checkpoint) is unreadable or corrupt: one line, exit 1."""


PLACEHOLDER = "{}\n"  # config.json of a claimed folder that claim found in place
PLACEHOLDER_MADE = "{}\n\n"  # ... and of one that claim created (release may remove it)


def claim(out_dir: Path, *, unique: bool = False) -> Path:
    """Claim `out_dir` for a new run by creating its config.json exclusively (atomic, so two
    runs started at once never share a folder). unique: on conflict try `out_dir-1`,
    `out_dir-2`, ... instead of refusing. Returns the claimed folder."""
    candidate, suffix = out_dir, 0
    while True:
        made = not candidate.exists()
        candidate.mkdir(parents=True, exist_ok=True)
        try:
            with open(candidate / "config.json", "x") as f:
                f.write(PLACEHOLDER_MADE if made else PLACEHOLDER)
            if (candidate / "log.jsonl").exists():  # an older run without config.json
                (candidate / "config.json").unlink()
                raise FileExistsError
            return candidate
        except FileExistsError:
            if not unique:
                raise RunDirError(
                    f"{out_dir} already holds a run; use --resume {out_dir} to continue it or "
                    "another --out"
                ) from None
            suffix += 1
            candidate = out_dir.with_name(f"{out_dir.name}-{suffix}")


def release(folder: Path) -> None:
    """Undo `claim` for a run that stopped before it wrote anything: remove the placeholder
    config.json, and the folder if `claim` created it and it is empty again (a folder the user
    made stays). A folder holding a run (a real config) is left alone."""
    placeholder = folder / "config.json"
    with contextlib.suppress(OSError):
        text = placeholder.read_text()
        if text not in (PLACEHOLDER, PLACEHOLDER_MADE) or (folder / "log.jsonl").exists():
            return
        placeholder.unlink()
        if text == PLACEHOLDER_MADE:
            folder.rmdir()  # only when empty


def strict(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text (non-finite floats as null)."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


class RunFiles:
    """The files of one run folder."""

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)

    @property
    def log_path(self) -> Path:
        return self.dir / "log.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    def write_config(self, info: dict[str, Any]) -> None:
        atomic_write_text(self.dir / "config.json", dumps(info, indent=2))

    def read_config(self) -> dict[str, Any] | None:
        path = self.dir / "config.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunFileError(f"{path} is not valid JSON ({err})") from None

    def append_log(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a") as log:
            log.write(dumps(record) + "\n")
            log.flush()
            os.fsync(log.fileno())

    def rewrite_log(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.log_path, "".join(dumps(r) + "\n" for r in records))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        with atomic_open(self.checkpoint_path, "wb", durable=True) as f:
            torch.save(state, f)

    def load_checkpoint(self, device: torch.device) -> dict[str, Any] | None:
        from subsetsel.store import remove_stale_temps

        for name in ("config.json", "log.jsonl", "checkpoint.pt", "summary.json"):
            remove_stale_temps(self.dir / name)  # left by a writer killed mid-write
        if not self.checkpoint_path.exists():
            return None
        try:
            return torch.load(self.checkpoint_path, map_location=device, weights_only=False)
        except Exception as err:  # noqa: BLE001 - truncated or foreign: torch raises many kinds
            raise RunFileError(
                f"{self.checkpoint_path} does not load ({first_line(err)}); it is truncated or "
                "not a subsetsel checkpoint"
            ) from None

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.dir / "summary.json", dumps(summary, indent=2))


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-period records of a run folder's log.jsonl."""
    with open(Path(run_dir) / "log.jsonl") as log:
        return [json.loads(line) for line in log if line.strip()]
