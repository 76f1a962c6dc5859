"""Search settings, the RDB storage, the study and its sampler and pruner."""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subsetsel.atomic import atomic_write_text
from subsetsel.errors import first_line
from subsetsel.search.bookkeeping import retry_stale
from subsetsel.search.space import Param, SearchSpaceError, grid_size
from subsetsel.train import TrainConfig

if TYPE_CHECKING:
    import optuna

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "halving", "hyperband")
DEFAULT_TRIALS = 20  # random / tpe, when --trials is not given
# TrainConfig fields that do not change what a trial learns (left out of the study signature;
# eval_every only changes which epochs are evaluated)
_LOCAL_FIELDS = ("replay", "device", "data_root", "save_selections", "eval_every")


class SearchError(Exception):
    """The search cannot run: storage, study, reference or worker problems (one line)."""


MAX_WORKERS = 1024  # worker processes on one machine
MAX_HEARTBEAT = 3600  # seconds; a trial is stale after 4 missed beats


@dataclass
class SearchSettings:
    """Everything a worker needs (picklable: workers are spawned processes)."""

    space: tuple[Param, ...]
    base: TrainConfig  # training options of every trial before the searched fields are set
    out_dir: Path
    storage: str  # SQLAlchemy URL
    study_name: str
    sampler: str = "tpe"
    n_trials: int = DEFAULT_TRIALS  # COMPLETE + PRUNED trials to reach
    seed: int = 0
    pruner: str = "none"
    workers: int = 1
    heartbeat: int = 15  # seconds between heartbeats; a trial is stale after 4 missed ones
    selection_id: dict[str, Any] = field(default_factory=dict)  # identity of the replayed file
    quiet: bool = False
    threads: int = 1  # torch threads in every process of the search; 0: torch's default
    session: str = ""  # id of this run of the search (set by run_search / work when empty)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise SearchSpaceError(
                f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}"
            )
        if self.pruner not in PRUNERS:
            raise SearchSpaceError(f"unknown pruner {self.pruner!r}; valid: {', '.join(PRUNERS)}")
        if not self.space:
            raise SearchSpaceError("empty search space")
        if not 1 <= self.n_trials < 2**63:
            raise SearchSpaceError(f"--trials must be >= 1 and fit in 64 bits, got {self.n_trials}")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise SearchSpaceError(f"--workers must be >= 1 and at most {MAX_WORKERS}, got "
                                   f"{self.workers}")
        if not 1 <= self.heartbeat <= MAX_HEARTBEAT:
            raise SearchSpaceError(f"--heartbeat must be >= 1 second and at most {MAX_HEARTBEAT}, "
                                   f"got {self.heartbeat}")
        if self.threads < 0:
            raise SearchSpaceError(f"--threads must be >= 0, got {self.threads}")
        if self.sampler == "grid":
            size = grid_size(self.space)
            if self.n_trials > size:
                raise SearchSpaceError(
                    f"--trials {self.n_trials} is more than the grid's {size} configurations"
                )

    @property
    def full_data(self) -> bool:
        return self.base.replay is None

    def trial_config(self, params: dict[str, Any]) -> TrainConfig:
        """The TrainConfig of one trial: the base options with the searched fields set."""
        config = dataclasses.replace(self.base, **params)
        config.strategy_params = dict(config.strategy_params)
        config.policy_params = dict(config.policy_params)
        return config

    def signature(self) -> dict[str, Any]:
        """What must match for a process to join an existing study (stored as a study attr)."""
        base = {k: v for k, v in self.base.to_json().items() if k not in _LOCAL_FIELDS}
        return {
            "space": [str(p) for p in self.space],
            "sampler": self.sampler,
            "seed": self.seed,
            "pruner": self.pruner,
            "data": "full" if self.full_data else self.selection_id,
            "base": base,
        }


def open_storage(url: str, heartbeat: int = 15) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats (stale after 4 missed beats) and retry of stale trials.

    SQLite gets a 60 s lock timeout so parallel workers wait instead of failing.
    Raises SearchError (one line, password hidden) if the URL cannot be opened.
    """
    import optuna
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    shown = hide_password(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                grace_period=4 * heartbeat, heartbeat_stale_trial_callback=retry_stale,
            )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, OSError) as err:
        raise SearchError(f"cannot open storage {shown}: {first_line(err)}") from None


def hide_password(url: str) -> str:
    """The URL with any password masked (for messages and results)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given
        return url


def open_study(settings: SearchSettings, storage: Any = None) -> optuna.Study:
    """Create the study or join the existing one; refuse one made with other settings."""
    import optuna

    storage = storage or open_storage(settings.storage, settings.heartbeat)
    study = optuna.create_study(
        study_name=settings.study_name, storage=storage, direction="maximize",
        load_if_exists=True,
    )
    mine = json.loads(json.dumps(settings.signature()))  # normalise tuples etc.
    stored = study.user_attrs.get("subsetsel_search")
    if stored is not None and isinstance(stored.get("base"), dict):  # made by an older version
        stored = {**stored, "base": {k: v for k, v in stored["base"].items()
                                     if k not in _LOCAL_FIELDS}}
    if stored is None:
        study.set_user_attr("subsetsel_search", mine)
    elif stored != mine:
        differ = [k for k in sorted(set(mine) | set(stored)) if mine.get(k) != stored.get(k)]
        raise SearchError(
            f"study {settings.study_name!r} in {hide_password(settings.storage)} was made with "
            f"other settings (differs in: {', '.join(differ)}); use another --study-name or --out"
        )
    return study


def make_sampler(settings: SearchSettings, salt: int = 0) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded from --seed. Random and TPE mix `salt` (trials so far and the
    worker index) into the seed, so a resumed or parallel search does not redraw earlier points;
    the grid is the same in every process."""
    import optuna

    if settings.sampler == "grid":
        space = {p.name: list(p.choices) for p in settings.space}
        return optuna.samplers.GridSampler(space, seed=settings.seed)
    seed = (settings.seed * 1_000_003 + salt) % 2**31
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=min(10, max(1, settings.n_trials // 3)),
            constant_liar=True,
        )


def make_pruner(settings: SearchSettings) -> optuna.pruners.BasePruner:
    """none, median (after 5 trials and 1 epoch), halving (successive halving) or hyperband."""
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if settings.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if settings.pruner == "hyperband":
        epochs = [settings.base.epochs]
        for p in settings.space:
            if p.name == "epochs":
                epochs += list(p.choices) if not p.is_range else [int(p.high or 1)]
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs))
    return optuna.pruners.NopPruner()


def claim_out_dir(out_dir: Path, study_name: str) -> None:
    """Trial folders are named by trial number, so one output folder serves one study: record
    the study's name there and refuse a folder that holds another study's trials."""
    marker = out_dir / "STUDY"
    if marker.exists():
        owner = marker.read_text().strip()
        if owner != study_name:
            raise SearchError(
                f"{out_dir} holds the trials of study {owner!r}; use another --out for "
                f"{study_name!r}"
            )
        return
    atomic_write_text(marker, study_name + "\n")
