"""Hyperparameter search over replayed selections (Optuna).

Every trial trains one configuration on the subsets stored in one selection file (replay: no
selection cost), or on the full data (`selections=None`, the reference search). The study lives in
an Optuna RDB storage (SQLite by default; any SQLAlchemy URL lets several machines join), so an
interrupted search resumes where it stopped and finished trials are never re-run.

Pieces (pure where possible, wired by `run_search` and the `subsetsel search` command):
- `parse_space`: `name=v1,v2` (choices), `name=LO:HI` / `name=log:LO:HI` (ranges) -> `Param`s.
- `Objective`: one trial = one `subsetsel.run.run` in `<out>/trials/<number>`; value = final test
  accuracy; per-epoch accuracy is reported for pruning.
- `work`: one worker's loop; it stops once the study holds `n_trials` counted trials (COMPLETE,
  PRUNED, or FAIL with an error). Killed workers' RUNNING trials are failed and re-queued with the
  same parameters (heartbeat staleness for any host, a dead pid for this host), and the retry
  resumes the killed trial's run directory from its last checkpoint.
- `results`, `format_table`, `write_results`: the results table (printed, CSV, JSON).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subsetsel.errors import first_line
from subsetsel.train import TrainConfig

if TYPE_CHECKING:
    import optuna

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "halving", "hyperband")
DEFAULT_TRIALS = 20  # random / tpe, when --trials is not given
MAX_RETRY = 3  # a killed trial is re-queued at most this many times
# searchable TrainConfig fields -> value type
PARAM_TYPES: dict[str, type] = {
    "lr": float,
    "weight_decay": float,
    "momentum": float,
    "batch_size": int,
    "epochs": int,
    "optimizer": str,
    "schedule": str,
    "model": str,
}
# TrainConfig fields that do not define a trial's training (left out of the study signature)
_LOCAL_FIELDS = ("replay", "device", "data_root", "save_selections")


class SearchSpaceError(ValueError):
    """A --param is malformed, unknown or out of range (one line)."""


class SearchError(Exception):
    """The search cannot run: storage, study, reference or worker problems (one line)."""


# ---- the search space ------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig field: listed `choices`, or a range [low, high] (log-scaled if
    `log`). Integer fields get integer ranges."""

    name: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def suggest(self, trial: optuna.trial.Trial) -> Any:
        """This trial's value (drawn by the study's sampler)."""
        if not self.is_range:
            return trial.suggest_categorical(self.name, list(self.choices))
        if PARAM_TYPES[self.name] is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def __str__(self) -> str:
        if self.is_range:
            return f"{self.name}={'log:' if self.log else ''}{self.low:g}:{self.high:g}"
        return f"{self.name}=" + ",".join(_fmt(v) for v in self.choices)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_param(text: str) -> Param:
    """Parse `name=v1,v2,...`, `name=LO:HI` or `name=log:LO:HI` (see docs/search.md)."""
    name, sep, spec = text.partition("=")
    name = name.strip().replace("-", "_")
    spec = spec.strip()
    if not sep or not name or not spec:
        raise SearchSpaceError(
            f"--param {text!r}: expected NAME=VALUES, e.g. lr=log:1e-3:1e-1 or optimizer=sgd,adam"
        )
    if name not in PARAM_TYPES:
        raise SearchSpaceError(
            f"--param {text!r}: unknown parameter {name!r}; valid: {', '.join(sorted(PARAM_TYPES))}"
        )
    typ = PARAM_TYPES[name]
    if ":" in spec:
        return _parse_range(text, name, typ, spec)
    items = [item.strip() for item in spec.split(",")]
    if any(not item for item in items):
        raise SearchSpaceError(f"--param {text!r}: empty value in the list")
    values = tuple(_check_value(text, name, _convert(text, typ, item)) for item in items)
    if len(set(values)) != len(values):
        raise SearchSpaceError(f"--param {text!r}: a value is listed twice")
    return Param(name, choices=values)


def _parse_range(text: str, name: str, typ: type, spec: str) -> Param:
    parts = spec.split(":")
    log = parts[0].strip().lower() == "log"
    if log:
        parts = parts[1:]
    if typ is str:
        raise SearchSpaceError(f"--param {text!r}: {name} takes a list of names, not a range")
    if len(parts) != 2:
        raise SearchSpaceError(f"--param {text!r}: a range is LO:HI or log:LO:HI")
    low, high = (_check_value(text, name, _convert(text, typ, p.strip())) for p in parts)
    if not low < high:
        raise SearchSpaceError(f"--param {text!r}: range needs LO < HI, got {low} and {high}")
    if log and low <= 0:
        raise SearchSpaceError(f"--param {text!r}: a log range needs LO > 0, got {low}")
    return Param(name, low=low, high=high, log=log)


def _convert(text: str, typ: type, item: str) -> Any:
    if typ is str:
        return item
    try:
        value = typ(item)
    except ValueError:
        kind = "an integer" if typ is int else "a number"
        raise SearchSpaceError(f"--param {text!r}: {item!r} is not {kind}") from None
    if typ is float and not math.isfinite(value):
        raise SearchSpaceError(f"--param {text!r}: {item!r} is not a finite number")
    return value


def _check_value(text: str, name: str, value: Any) -> Any:
    """Range-check one value the way TrainConfig / the registries would."""
    problem = None
    if name == "lr" and value <= 0:
        problem = f"lr must be > 0, got {value:g}"
    elif name == "weight_decay" and value < 0:
        problem = f"weight_decay must be >= 0, got {value:g}"
    elif name == "momentum" and not 0 <= value < 1:
        problem = f"momentum must be in [0, 1), got {value:g}"
    elif name in ("batch_size", "epochs") and value < 1:
        problem = f"{name} must be >= 1, got {value}"
    elif name in ("optimizer", "schedule", "model"):
        valid = _names(name)
        if value not in valid:
            problem = f"unknown {name} {value!r}; valid: {', '.join(valid)}"
    if problem:
        raise SearchSpaceError(f"--param {text!r}: {problem}")
    return value


def _names(kind: str) -> list[str]:
    from subsetsel.optim import OPTIMIZERS, SCHEDULES

    if kind == "optimizer":
        return list(OPTIMIZERS)
    if kind == "schedule":
        return list(SCHEDULES)
    from subsetsel.models import model_names

    return model_names()


def parse_space(texts: Sequence[str]) -> tuple[Param, ...]:
    """All --param options; refuses an empty space and a parameter given twice."""
    if not texts:
        raise SearchSpaceError(
            "empty search space: give at least one --param, e.g. --param lr=log:1e-3:1e-1"
        )
    params = tuple(parse_param(t) for t in texts)
    names = [p.name for p in params]
    for name in names:
        if names.count(name) > 1:
            raise SearchSpaceError(f"--param {name} is given more than once")
    if all(not p.is_range and len(p.choices) == 1 for p in params):
        raise SearchSpaceError("empty search space: every --param has a single value")
    return params


def grid_size(space: Sequence[Param]) -> int:
    """Number of configurations of an all-choices space (ValueError if it holds a range)."""
    size = 1
    for p in space:
        if p.is_range:
            raise SearchSpaceError(
                f"--sampler grid needs listed values, but --param {p} is a range "
                f"(list values instead, e.g. {p.name}=a,b,c)"
            )
        size *= len(p.choices)
    return size


# ---- settings, storage and study -------------------------------------------------------------


@dataclass
class SearchSettings:
    """Everything a worker needs (picklable: workers are spawned processes)."""

    space: tuple[Param, ...]
    base: TrainConfig  # training options of every trial before the searched fields are set
    out_dir: Path
    storage: str  # SQLAlchemy URL
    study_name: str
    sampler: str = "tpe"
    n_trials: int = DEFAULT_TRIALS
    seed: int = 0
    pruner: str = "none"
    workers: int = 1
    heartbeat: int = 15  # seconds between heartbeats; a trial is stale after 4 missed ones
    selection_id: dict[str, Any] = field(default_factory=dict)  # identity of the replayed file
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise SearchSpaceError(
                f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}"
            )
        if self.pruner not in PRUNERS:
            raise SearchSpaceError(f"unknown pruner {self.pruner!r}; valid: {', '.join(PRUNERS)}")
        if self.n_trials < 1:
            raise SearchSpaceError(f"--trials must be >= 1, got {self.n_trials}")
        if self.workers < 1:
            raise SearchSpaceError(f"--workers must be >= 1, got {self.workers}")
        if self.heartbeat < 1:
            raise SearchSpaceError(f"--heartbeat must be >= 1 second, got {self.heartbeat}")
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
                grace_period=4 * heartbeat, heartbeat_stale_trial_callback=_retry_stale,
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
    the grid is the same in every process (its order is shuffled by --seed alone)."""
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
                epochs += list(p.choices) if not p.is_range else [int(p.high)]
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs))
    return optuna.pruners.NopPruner()


# ---- trial bookkeeping -----------------------------------------------------------------------


def _host() -> str:
    """This machine (hostname + boot id), so pids are only compared within one boot."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    return f"{socket.gethostname()}/{boot}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial uses up the budget: COMPLETE, PRUNED, or failed by an error in training
    (not killed, interrupted or surplus: those are retried or ignored)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def _retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
    """Queue a WAITING copy of a killed/interrupted trial: same params, user attrs (so the same
    run directory) and intermediate values; system attrs `failed_trial` / `retry_history` as
    Optuna's RetryHeartbeatStaleTrialCallback writes them (its static helpers read them).
    Unlike that callback it drops the dead worker's host/pid. False after MAX_RETRY retries."""
    import optuna

    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        return False
    system_attrs = {**trial.system_attrs, "retry_history": history}
    system_attrs.setdefault("failed_trial", trial.number)
    # the dead worker's pid must not make the retry look dead while it starts in a new worker
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("host", "pid")}
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=trial.params,
            distributions=trial.distributions, user_attrs=user_attrs,
            system_attrs=system_attrs, intermediate_values=trial.intermediate_values,
        )
    )
    return True


def _retry_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat-stale trial callback of the storage."""
    _retry(study, trial)


def reap_dead_trials(study: optuna.Study) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker died: on this machine at once (its pid is
    gone), elsewhere once the heartbeat is stale (Optuna's `fail_stale_trials`). Returns the
    numbers of the trials failed here by pid."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host, me = _host(), os.getpid()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or pid == me or _pid_alive(pid):
            continue
        try:
            changed = study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if changed:
            _retry(study, study._storage.get_trial(t._trial_id))
            failed.append(t.number)
    return failed


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Re-queue trials that failed without an error (Ctrl-C, a worker stopped) and were not
    retried yet. Run once by the process that starts a search, before its workers."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    queued = []
    for t in trials:
        if t.state != TrialState.FAIL or t.number in retried:
            continue
        if "error" in t.user_attrs or t.user_attrs.get("surplus"):
            continue
        if _retry(study, t):
            queued.append(t.number)
    return queued


class _Surplus(Exception):
    """The budget was used up by other workers between our check and this trial's creation."""


# ---- the objective ---------------------------------------------------------------------------


class Objective:
    """One trial: train `settings.trial_config(params)` in `<out>/trials/<number>`; return the
    final test accuracy. A retried trial reuses (and resumes) the directory of the trial it
    retries. Reports each epoch's test accuracy to the pruner; raises TrialPruned to stop."""

    def __init__(self, settings: SearchSettings, log: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.log = log or (lambda _msg: None)

    def __call__(self, trial: optuna.trial.Trial) -> float:
        import optuna

        try:
            return self._run(trial)
        except (optuna.TrialPruned, _Surplus):
            raise
        except Exception as err:  # counted as done: a failing config is not retried forever
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", f"{type(err).__name__}: {first_line(err)}")
            self.log(f"trial {trial.number} failed: {type(err).__name__}: {first_line(err)}")
            raise

    def _run(self, trial: optuna.trial.Trial) -> float:
        import optuna

        from subsetsel.run import run

        trial.set_user_attr("host", _host())
        trial.set_user_attr("pid", os.getpid())
        params = {p.name: p.suggest(trial) for p in self.settings.space}
        if self._surplus(trial):
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"trial {trial.number}: the study already has its trials")
        run_dir = Path(
            trial.user_attrs.get("run_dir")
            or self.settings.out_dir / "trials" / str(trial.number)
        )
        trial.set_user_attr("run_dir", str(run_dir))
        resume = (run_dir / "checkpoint.pt").exists()
        if not resume and (run_dir / "log.jsonl").exists():
            (run_dir / "log.jsonl").unlink()  # killed before its first checkpoint: start over
        config = self.settings.trial_config(params)
        last: dict[str, Any] = {}

        def report(record: dict[str, Any]) -> None:
            last.update(record)
            trial.report(record["test_acc"], record["epoch"])
            if trial.should_prune():
                _record(trial, record["test_acc"], None, record["elapsed_seconds"],
                        record["epoch"] + 1)
                raise optuna.TrialPruned(f"epoch {record['epoch']}: acc {record['test_acc']:.4f}")

        start = time.perf_counter()
        try:
            summary = run(config, run_dir, resume=resume, callbacks=[report])
        except optuna.TrialPruned:
            self.log(f"trial {trial.number} pruned at epoch {last['epoch']} "
                     f"(acc {last['test_acc']:.4f}) {_params_text(params)}")
            raise
        acc = float(summary["final_acc"])
        _record(trial, acc, summary["best_acc"], summary["elapsed_seconds"], summary["epochs"])
        self.log(f"trial {trial.number}: acc {acc:.4f}, {summary['elapsed_seconds']:.1f} s "
                 f"training ({time.perf_counter() - start:.1f} s wall) {_params_text(params)}")
        return acc

    def _surplus(self, trial: optuna.trial.Trial) -> bool:
        """True if `n_trials` counted, running or queued trials come before this one."""
        from optuna.trial import TrialState

        ahead = 0
        for t in trial.study.get_trials(deepcopy=False):
            if t.number >= trial.number:
                continue
            if is_counted(t) or t.state in (TrialState.RUNNING, TrialState.WAITING):
                ahead += 1
        return ahead >= self.settings.n_trials


def _record(trial: Any, acc: float, best: float | None, seconds: float, epochs: int) -> None:
    trial.set_user_attr("final_acc", acc)
    trial.set_user_attr("best_acc", best)
    trial.set_user_attr("elapsed_seconds", seconds)
    trial.set_user_attr("epochs_run", epochs)


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


# ---- workers ---------------------------------------------------------------------------------


@dataclass
class StudyCounts:
    counted: int = 0  # COMPLETE, PRUNED or FAIL with an error
    running: int = 0
    waiting: int = 0


def study_counts(study: optuna.Study) -> StudyCounts:
    from optuna.trial import TrialState

    counts = StudyCounts()
    for t in study.get_trials(deepcopy=False):
        if is_counted(t):
            counts.counted += 1
        elif t.state == TrialState.RUNNING:
            counts.running += 1
        elif t.state == TrialState.WAITING:
            counts.waiting += 1
    return counts


def work(
    settings: SearchSettings, worker: int = 0, poll: float = 1.0, study: optuna.Study | None = None
) -> int:
    """Run trials until the study holds `settings.n_trials` counted trials; returns how many
    trials this worker ran. Safe to run in many processes and machines at once."""
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    log = (lambda _m: None) if settings.quiet else _stderr
    study = study or open_study(settings)
    study.pruner = make_pruner(settings)
    objective = Objective(settings, log)
    ran = 0
    while True:
        with contextlib.suppress(sqlalchemy.exc.OperationalError):  # busy DB: next round
            reap_dead_trials(study)
        counts = study_counts(study)
        if counts.counted >= settings.n_trials:
            return ran
        if counts.counted + counts.running >= settings.n_trials and not counts.waiting:
            time.sleep(poll)  # the last trials run elsewhere; wait for them (or their death)
            continue
        total = len(study.get_trials(deepcopy=False))
        study.sampler = make_sampler(settings, salt=total * 1009 + worker)
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        except optuna.exceptions.UpdateFinishedTrialError:
            log("a trial of this worker was failed by another process (stale heartbeat)")
        ran += 1


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _worker_main(settings: SearchSettings, worker: int) -> None:
    """Entry point of a spawned worker process."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))
    try:
        work(settings, worker)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker; the parent reports it
        sys.exit(130)


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
    marker.write_text(study_name + "\n")


def run_search(settings: SearchSettings) -> optuna.Study:
    """Create or join the study, re-queue interrupted trials, run `settings.workers` worker
    processes (in this process when 1) until the budget is used, and return the study."""
    import multiprocessing

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    claim_out_dir(settings.out_dir, settings.study_name)
    study = open_study(settings)
    reaped = reap_dead_trials(study)
    queued = requeue_interrupted(study)
    if (reaped or queued) and not settings.quiet:
        _stderr(f"resuming: re-queued trials {sorted(reaped + queued)} (killed or interrupted)")
    if settings.workers == 1:
        work(settings, 0, study=study)
        return study
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=_worker_main, args=(settings, i), name=f"search-worker-{i}")
        for i in range(settings.workers)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
        raise
    bad = [f"worker {i} exit code {p.exitcode}" for i, p in enumerate(procs) if p.exitcode]
    if bad:
        raise SearchError(f"search workers failed ({', '.join(bad)}); run again to resume")
    return study


# ---- results ---------------------------------------------------------------------------------


@dataclass
class Reference:
    """A full-data run used as the speed and accuracy reference."""

    run_dir: str
    elapsed_seconds: float
    final_acc: float | None

    @classmethod
    def load(cls, run_dir: str | Path) -> Reference:
        path = Path(run_dir) / "summary.json"
        if not path.exists():
            raise SearchError(f"--reference {run_dir}: no summary.json (not a finished run)")
        try:
            summary = json.loads(path.read_text())
            seconds = float(summary["elapsed_seconds"])
        except (ValueError, KeyError, TypeError) as err:
            raise SearchError(f"--reference {path}: unreadable summary ({err})") from None
        if not seconds > 0:
            raise SearchError(f"--reference {path}: elapsed_seconds is {seconds}, not > 0")
        return cls(str(run_dir), seconds, summary.get("final_acc"))


def results(
    study: optuna.Study, space: Sequence[Param], reference: Reference | None = None
) -> list[dict[str, Any]]:
    """One row per counted trial, best accuracy first: trial, state, the searched parameters,
    acc (final test accuracy), best_acc, train_seconds (select + train; eval excluded),
    speedup (reference seconds / train_seconds, or None), epochs, run_dir, error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not is_counted(t):
            continue
        seconds = t.user_attrs.get("elapsed_seconds")
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        row.update({p.name: t.params.get(p.name) for p in space})
        row.update(
            acc=t.user_attrs.get("final_acc", t.value),
            best_acc=t.user_attrs.get("best_acc"),
            train_seconds=seconds,
            speedup=(
                reference.elapsed_seconds / seconds if reference and seconds else None
            ),
            epochs=t.user_attrs.get("epochs_run"),
            run_dir=t.user_attrs.get("run_dir"),
            error=t.user_attrs.get("error"),
        )
        rows.append(row)
    rows.sort(key=lambda r: (r["acc"] is None, -(r["acc"] or 0.0), r["trial"]))
    return rows


def speedup_note(reference: Reference | None) -> str:
    if reference is None:
        return "speedup: no --reference given"
    return (
        f"speedup = reference training seconds ({reference.elapsed_seconds:.1f} s, "
        f"{reference.run_dir}) / trial training seconds (select + train time, eval excluded; "
        "the one-time cost of making the selection file is not in the trial's time)"
    )


def format_table(rows: Sequence[dict[str, Any]], space: Sequence[Param]) -> str:
    """Fixed-width text table of `results` rows."""
    columns = ["trial", "state", *(p.name for p in space), "acc", "best_acc", "train_s", "speedup"]
    cells = []
    for r in rows:
        values = {**r, "train_s": r["train_seconds"]}
        cells.append([_cell(c, values.get(c)) for c in columns])
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("acc", "best_acc"):
        return f"{value:.4f}"
    if column == "train_s":
        return f"{value:.1f}"
    if column == "speedup":
        return f"{value:.2f}x"
    return _fmt(value)


def write_results(
    out_dir: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]
) -> tuple[Path, Path]:
    """`<out>/results.csv` (rows) and `<out>/results.json` (meta + rows), written atomically."""
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    columns = list(rows[0]) if rows else ["trial", "state", "acc"]
    with _atomic(csv_path) as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    with _atomic(json_path) as f:
        json.dump({**meta, "trials": list(rows)}, f, indent=2)
    return csv_path, json_path


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Any]:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        yield f
    os.replace(tmp, path)


def retrain_best(
    settings: SearchSettings, params: dict[str, Any], out_dir: Path
) -> dict[str, Any]:
    """Train `params` on the full data in `out_dir` (resumed if interrupted, reused if done)."""
    from subsetsel.run import run

    config = dataclasses.replace(settings.trial_config(params), replay=None, strategy="full")
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("config") == config.to_json():
            return summary
        raise SearchError(f"{out_dir} holds another run; remove it to retrain the best config")
    return run(config, out_dir, resume=(out_dir / "checkpoint.pt").exists())


__all__ = [
    "PARAM_TYPES",
    "PRUNERS",
    "SAMPLERS",
    "Objective",
    "Param",
    "Reference",
    "SearchError",
    "SearchSettings",
    "SearchSpaceError",
    "format_table",
    "grid_size",
    "hide_password",
    "open_storage",
    "open_study",
    "parse_param",
    "parse_space",
    "reap_dead_trials",
    "requeue_interrupted",
    "results",
    "retrain_best",
    "run_search",
    "study_counts",
    "work",
    "write_results",
]
