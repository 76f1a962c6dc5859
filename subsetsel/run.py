"""Wire a run together: data, model, schedule, selection file and trainer (CLI and Python API)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subsetsel.train import EpochCallback, TrainConfig, Trainer

if TYPE_CHECKING:
    from subsetsel.data import Dataset


def default_run_name(config: TrainConfig) -> str:
    """`<strategy>-<dataset>-f<fraction>-s<seed>-<UTC time>`, unique per second."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dataset = config.dataset.replace(":", "-").replace("/", "_")
    return f"{config.strategy}-{dataset}-f{config.fraction:g}-s{config.seed}-{stamp}"


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig stored in a run directory's config.json (for --resume)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no config.json: not a subsetsel run directory")
    try:
        return TrainConfig(**json.loads(path.read_text())["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a subsetsel train config ({err})") from None


def run(
    config: TrainConfig,
    out_dir: str | Path | None,
    *,
    resume: bool = False,
    progress: bool = False,
    callbacks: list[EpochCallback] | None = None,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Train one run; write its logs under `out_dir` and its selections to
    `config.save_selections` (if set); return the run summary.

    dataset: the data `config` names, already loaded (a search reuses it across trials)."""
    from subsetsel.store import SelectionMetadata, SelectionStore

    trainer = Trainer(
        config, dataset=dataset, out_dir=out_dir, resume=resume, progress=progress,
        callbacks=callbacks,
    )
    if config.save_selections:
        if resume and Path(config.save_selections).exists():
            store = SelectionStore.open(config.save_selections)
        else:
            metadata = SelectionMetadata(
                dataset=config.dataset,
                dataset_size=len(trainer.dataset),
                fingerprint=trainer.dataset.fingerprint(),
                num_classes=trainer.dataset.num_classes,
                strategy=config.strategy,
                strategy_params=trainer.schedule_params(),
                model=str(config.model),
                seed=config.seed,
                epochs=trainer.total_epochs,
                config=config.to_json(),
            )
            store = SelectionStore.create(config.save_selections, metadata)
        trainer.attach_store(store)
        try:
            return trainer.fit()
        except BaseException:
            if not store.rounds:  # failed before its first selection: leave no empty file
                store.path.unlink(missing_ok=True)
            raise
    return trainer.fit()
