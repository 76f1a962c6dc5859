"""Run helpers shared by the CLI and the Python API: run names, stored configs, one run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subsetsel.engine.files import RunFileError
from subsetsel.train import EpochCallback, TrainConfig, Trainer

if TYPE_CHECKING:
    from subsetsel.data.base import TrainData


def default_run_name(config: TrainConfig) -> str:
    """`<strategy>-<dataset>-f<fraction>-s<seed>-<UTC time>`, or `replay-<file>-<dataset>-s<seed>-
    <UTC time>` for a replayed run (a clash gets a -N suffix when the folder is claimed)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dataset = config.dataset.replace(":", "-").replace("/", "_")
    if config.replay is not None:
        return f"replay-{Path(config.replay).stem}-{dataset}-s{config.seed}-{stamp}"
    return f"{config.strategy}-{dataset}-f{config.fraction:g}-s{config.seed}-{stamp}"


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig stored in a run directory's config.json (for --resume)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no config.json: not a subsetsel run directory")
    try:
        return TrainConfig(**json.loads(path.read_text())["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RunFileError(f"{path} is not a subsetsel train config ({err})") from None


def run(
    config: TrainConfig,
    out_dir: str | Path | None,
    *,
    resume: bool = False,
    claimed: bool = False,
    progress: bool = False,
    callbacks: list[EpochCallback] | None = None,
    dataset: TrainData | None = None,
) -> dict[str, Any]:
    """Train one run; write its logs under `out_dir` (claimed for it unless resuming) and its
    selections to `config.save_selections` (if set); return the run summary.

    claimed: the caller has claimed `out_dir` already (`subsetsel.engine.files.claim`).
    dataset: the data `config` names, already loaded (a search reuses it across trials)."""
    trainer = Trainer(config, dataset=dataset, out_dir=out_dir, resume=resume, claimed=claimed,
                      progress=progress, callbacks=callbacks)
    return trainer.fit()
