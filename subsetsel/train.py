"""A training run from its config: data, model, schedule, policy and files wired to the engine.

`TrainConfig` is everything that defines a run (stored in run folders and selection files);
`Trainer(config).fit()` trains it. Pass your own `model` (any nn.Module whose last nn.Linear
outputs the logits), `dataset` (`TensorData` or `TorchData`), `schedule` or `policy` to replace
what the config names. The loop itself is `subsetsel.engine.loop.Engine`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subsetsel.data.base import TrainData
from subsetsel.engine import dist
from subsetsel.engine.dist import Dist
from subsetsel.engine.files import RunDirError, RunFiles, claim, read_log
from subsetsel.engine.loop import ByProgress, Engine, PerPeriod
from subsetsel.engine.precision import Precision
from subsetsel.engine.progress import ProgressBar
from subsetsel.engine.schedule import (
    ReplaySchedule,
    Schedule,
    StrategySchedule,
    SubsetFeed,
    create_store,
    open_replay,
)
from subsetsel.errors import NonFiniteError
from subsetsel.online.base import POLICIES, Policy, create_policy
from subsetsel.optim import OPTIMIZERS, SCHEDULES, build_optimizer, build_schedule
from subsetsel.selection.base import STRATEGIES, Selection, create_strategy, fixed_settings
from subsetsel.store import SelectionStore

EpochCallback = Callable[[dict[str, Any]], None]
LOADERS = ("auto", "tensor", "dataloader")


@dataclass
class TrainConfig:
    """Everything that defines a run (stored as JSON in run folders and selection files)."""

    dataset: str = "mnist1d"
    data_root: str = "data"
    train_size: int | None = None
    test_size: int | None = None
    data_seed: int = 0  # generation/subsampling of the data; fixed across training seeds
    loader: str = "auto"  # tensor | dataloader | auto (see subsetsel.data.load_dataset)
    workers: int | None = None  # DataLoader worker processes (None: default_workers())
    image_size: int | None = None  # folder: datasets
    model: str | None = None  # None: the dataset's default model
    strategy: str = "gradmatch"
    fraction: float = 0.1
    select_every: int = 5
    warm_start: float = 0.0
    strategy_params: dict[str, Any] = field(default_factory=dict)
    policy: str = "plain"
    policy_params: dict[str, Any] = field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    lr_per_step: bool = False  # set the rate before every step by progress in epochs (ByProgress)
    seed: int = 0
    device: str = "auto"
    amp: bool = False  # bf16 autocast for training, evaluation and selection forwards
    channels_last: bool = False  # NHWC layout for convolutional models
    sync_bn: bool = False  # under torch.distributed: SyncBatchNorm instead of BatchNorm
    eval_every: int = 1  # epochs between test evaluations; 0: only after the last epoch
    slow_input: float = 0.0  # simulated upstream cost, seconds per batch of fresh examples
    replay: str | None = None  # path of a selection file to replay instead of selecting
    allow_incomplete: bool = False  # replay a file whose run stopped early (covered epochs only)
    save_selections: str | None = None  # path of the selection file this run writes

    def validate(self) -> None:
        """Raise ValueError (one line) for out-of-range or non-finite numbers, unknown names,
        strategy options out of range, or a schedule setting the strategy decides itself
        (`Strategy.fixed`, e.g. infobatch selects every epoch) set to another value; such
        settings left at their defaults are set to the strategy's values."""
        check_finite_options(self)
        STRATEGIES.check(self.strategy)
        if self.replay is None:
            defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
            fixed = fixed_settings(self.strategy, {"select_every": self.select_every,
                                                   "fraction": self.fraction,
                                                   "warm_start": self.warm_start}, defaults)
            for key, value in fixed.items():
                setattr(self, key, value)
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        for name in ("batch_size", "epochs", "select_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warm_start < 1.0:
            raise ValueError(f"--warm-start must be in [0, 1), got {self.warm_start}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        for name in ("eval_every", "slow_input", "weight_decay", "momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if not -(2**63) <= self.seed < 2**63 or not -(2**63) <= self.data_seed < 2**63:
            raise ValueError("--seed and --data-seed must fit in 64 bits")
        if self.loader not in LOADERS:
            raise ValueError(f"unknown --loader {self.loader!r}; valid: {', '.join(LOADERS)}")
        STRATEGIES.check(self.strategy)
        OPTIMIZERS.check(self.optimizer)
        SCHEDULES.check(self.schedule)
        POLICIES.check(self.policy)
        if self.replay is None:  # the strategy's own options (ranges), before any data loads
            create_strategy(self.strategy, fraction=self.fraction, seed=self.seed,
                            **self.strategy_params)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def check_finite_options(config: Any) -> None:
    """NonFiniteError (one line naming the option) for a NaN or infinite float field of a
    config dataclass, including its strategy_params / policy_params; ValueError for an int
    field beyond 64 bits."""
    values = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)]
    for group in ("strategy_params", "policy_params"):
        values += list(getattr(config, group, {}).items())
    for name, value in values:
        if isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"--{_flag(name)} must be a finite number, got {value}")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ValueError(f"--{_flag(name)} must fit in 64 bits, got {value}")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def plan_epochs(epochs: int, fraction: float, warm_start: float) -> tuple[int, int]:
    """(full-data warm-up epochs, total epochs) for a compute budget of fraction * epochs epochs.

    Without warm start: (0, epochs). With kappa > 0: ceil(kappa * epochs * fraction) full-data
    epochs, then epochs - round(kappa * epochs) subset epochs, so full-data-equivalent compute
    stays ~fraction * epochs.
    """
    if warm_start <= 0:
        return 0, epochs
    warm = math.ceil(warm_start * epochs * fraction)
    return warm, warm + max(1, epochs - round(warm_start * epochs))


def load_data(config: TrainConfig, device: torch.device | str = "cpu") -> TrainData:
    """The dataset `config` names, on `device`."""
    from subsetsel.data import load_dataset

    return load_dataset(
        config.dataset, root=config.data_root, seed=config.data_seed,
        train_size=config.train_size, test_size=config.test_size, device=device,
        loader=config.loader, workers=config.workers, image_size=config.image_size,
    )


@dataclass
class Parts:
    """What every run is made of: the config (model name filled in), device, data, model
    (wrapped in DistributedDataParallel under torch.distributed), precision settings,
    optimizer and the process group."""

    config: TrainConfig
    device: torch.device
    data: TrainData
    model: nn.Module
    precision: Precision
    optimizer: torch.optim.Optimizer
    dist: Dist


def build_parts(config: TrainConfig, *, model: nn.Module | None = None,
                dataset: TrainData | None = None) -> Parts:
    """Validate `config` and build its data, model (seeded by config.seed) and optimizer;
    under torchrun, join the process group and wrap the model in DistributedDataParallel."""
    config.validate()
    group = dist.init(resolve_device(config.device))
    device = group.device
    torch.manual_seed(config.seed)
    data = (dataset if dataset is not None else load_data(config, device)).to(device)
    if model is None:
        from subsetsel.models import build_model, default_model

        config.model = config.model or default_model(config.dataset, data.input_shape)
        torch.manual_seed(config.seed)
        model = build_model(config.model, data.input_shape, data.num_classes)
    precision = Precision(device, config.amp, config.channels_last)
    model = precision.model(model.to(device))
    if group.active:
        from torch.nn.parallel import DistributedDataParallel

        if config.sync_bn:
            if device.type != "cuda":
                raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(
        config.optimizer, model.parameters(), lr=config.lr, momentum=config.momentum,
        nesterov=config.nesterov, weight_decay=config.weight_decay,
    )
    return Parts(config, device, data, model, precision, optimizer, group)


class Trainer:
    """Trains on a schedule of weighted subsets (see the module docstring).

    out_dir (optional) receives config.json, log.jsonl (one JSON object per epoch),
    checkpoint.pt (after every epoch) and summary.json; the folder is claimed atomically, and
    `resume=True` continues the run it holds from its checkpoint with the same schedule;
    `claimed=True`: the caller claimed the folder already.
    store: a selection file to append new rounds to (default: `config.save_selections`).
    callbacks receive every epoch's log record.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: nn.Module | None = None,
        dataset: TrainData | None = None,
        schedule: Schedule | None = None,
        policy: Policy | None = None,
        store: SelectionStore | None = None,
        out_dir: str | Path | None = None,
        resume: bool = False,
        claimed: bool = False,
        callbacks: list[EpochCallback] | None = None,
        progress: bool = False,
    ) -> None:
        parts = build_parts(config, model=model, dataset=dataset)
        self.config = config
        self.device, self.dataset = parts.device, parts.data
        self.model = getattr(parts.model, "module", parts.model)  # the network itself
        self.precision, self.optimizer, self.dist = parts.precision, parts.optimizer, parts.dist
        self.warm_epochs, self.total_epochs = plan_epochs(config.epochs, config.fraction,
                                                          config.warm_start)
        if schedule is None and config.replay:
            schedule = self._replay_schedule(config.replay)
        if schedule is None:
            strategy = create_strategy(config.strategy, fraction=config.fraction,
                                       seed=config.seed, **config.strategy_params)
            schedule = StrategySchedule(
                strategy, config.select_every, self.model, self.dataset, config.batch_size,
                config.seed, self.device, self.precision, self.warm_epochs, self.dist,
                epochs=self.total_epochs,
            )
        self.schedule = schedule
        self.policy = policy if policy is not None else create_policy(config.policy,
                                                                      **config.policy_params)
        self.feed = SubsetFeed(schedule, self.dataset, epochs=self.total_epochs, seed=config.seed,
                               read_delay=config.slow_input / config.batch_size, dist=self.dist)
        self.files = RunFiles(out_dir) if out_dir is not None else None
        main = self.dist.main  # only rank 0 writes files
        hooks: list[Any] = []
        if self.files is not None and main:
            hooks += [self._log, self._checkpoint]
        hooks += [_record_hook(cb) for cb in callbacks or []]
        self.engine = Engine(
            model=parts.model, data=self.dataset, optimizer=self.optimizer,
            lr=self._lr_control(),
            feed=self.feed, policy=self.policy, seed=config.seed,
            batch_size=config.batch_size, device=self.device, precision=self.precision,
            eval_every=config.eval_every, callbacks=hooks, dist=self.dist,
        )
        self._created_store = False
        self._resume = resume
        if resume:
            self._load_checkpoint()
        elif self.files is not None and not claimed and main:
            claim(self.files.dir)
        if store is not None and main:  # other ranks never touch the selection file
            store.truncate(before_epoch=self.engine.period)
            self.feed.store = store
        elif config.save_selections and self.feed.store is None and main:
            self.feed.store = self._create_store(Path(config.save_selections))
        if progress and main:
            self.engine.callbacks.append(ProgressBar(self.total_epochs, done=self.engine.period))

    # ---- pieces ------------------------------------------------------------------------------
    @property
    def store(self) -> SelectionStore | None:
        return self.feed.store

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.engine.history

    @property
    def selection(self) -> Selection | None:
        """The subset in force (the last epoch's, after training)."""
        return self.feed.selection

    def _lr_control(self) -> ByProgress | PerPeriod:
        """Per epoch (default), or per step by progress in epochs (`lr_per_step`; follows
        epochs of changing length, see `ByProgress`)."""
        if self.config.lr_per_step:
            return ByProgress(self.optimizer, SCHEDULES.get(self.config.schedule)(
                self.total_epochs))
        return PerPeriod(build_schedule(self.config.schedule, self.optimizer,
                                        self.total_epochs))

    def _replay_schedule(self, path: str) -> ReplaySchedule:
        """The file's rounds over this run's epochs (the file holds any warm-up)."""
        self.warm_epochs, self.total_epochs = 0, self.config.epochs
        return open_replay(path, self.dataset, dataset=self.config.dataset,
                           total_epochs=self.total_epochs,
                           allow_incomplete=self.config.allow_incomplete)

    def _create_store(self, path: Path) -> SelectionStore:
        store = create_store(
            path, data=self.dataset, dataset=self.config.dataset, schedule=self.schedule,
            strategy=self.config.strategy, model=str(self.config.model), seed=self.config.seed,
            epochs=self.total_epochs, config=self.config.to_json(),
        )
        self._created_store = True
        return store

    # ---- running -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train all remaining epochs; return the run summary."""
        if self.files is not None and not self._resume and self.dist.main:
            self.files.write_config(self._config_info())
        try:
            self.engine.fit()
        except BaseException:
            store = self.feed.store
            if self._created_store and store is not None and not store.rounds:
                store.path.unlink(missing_ok=True)  # failed before its first round: no file
            raise
        finally:
            self.dataset.close()
        summary = {**self.engine.summary(), "config": self.config.to_json(),
                   "world_size": self.dist.world}
        if self.files is not None and self.dist.main:
            self.files.write_summary(summary)
        return summary

    def _config_info(self) -> dict[str, Any]:
        store = self.feed.store
        return {
            "config": self.config.to_json(),
            "warm_epochs": self.warm_epochs,
            "total_epochs": self.total_epochs,
            "dataset_size": len(self.dataset),
            "fingerprint": self.dataset.fingerprint(),
            "device": str(self.device),
            "world_size": self.dist.world,
            "policy_params": self.policy.params(),
            "selection_file": None if store is None else store.identity(),
        }

    def _log(self, engine: Engine, record: dict[str, Any]) -> None:
        assert self.files is not None
        self.files.append_log(record)

    def _checkpoint(self, engine: Engine, record: dict[str, Any]) -> None:
        assert self.files is not None
        self.files.save_checkpoint({"engine": engine.state_dict(),
                                    "config": self.config.to_json()})

    def _load_checkpoint(self) -> None:
        """Continue from the run folder's checkpoint; without one, start over (dropping the log
        lines of an epoch that crashed before its checkpoint). The selection file must be the
        one the run was writing; rounds chosen after the checkpoint are dropped."""
        if self.files is None:
            return
        stored = self.files.read_config()
        if stored is None or "config" not in stored:
            raise RunDirError(f"{self.files.dir} has no run config: not a run to resume")
        if stored["config"] != _json_roundtrip(self.config.to_json()):
            raise RunDirError(f"{self.files.dir} holds a run with another config; "
                              "not resuming it")
        state = self.files.load_checkpoint(self.device)
        main = self.dist.main
        path = (Path(self.config.save_selections) if self.config.save_selections and main
                else None)
        if state is None:
            if main:
                self.files.log_path.unlink(missing_ok=True)
            self._resume = False  # nothing to continue: a fresh start in the claimed folder
            identity = stored.get("selection_file")
            if path is not None and path.exists() and identity:
                store = SelectionStore.open_for_resume(path, {**identity, "rounds": 0})
                path.unlink()  # the file this run made before its first checkpoint
                del store
            return
        self.engine.load_state_dict(state["engine"])
        identity = state["engine"]["feed"].get("store")
        if path is not None:
            if identity is None:
                raise RunDirError(f"{self.files.dir}: its checkpoint records no selection file")
            store = SelectionStore.open_for_resume(path, identity)
            store.truncate(before_epoch=self.engine.period)
            self.feed.store = store
        if main:
            self.files.rewrite_log(self.engine.history)


def _record_hook(callback: EpochCallback) -> Callable[[Engine, dict[str, Any]], None]:
    return lambda _engine, record: callback(record)


def _json_roundtrip(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


__all__ = [
    "EpochCallback",
    "Parts",
    "TrainConfig",
    "Trainer",
    "build_parts",
    "check_finite_options",
    "load_data",
    "plan_epochs",
    "read_log",
    "resolve_device",
]
