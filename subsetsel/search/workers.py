"""Workers: the trial loop of one process (`work`) and a whole search (`run_search`)."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

from subsetsel.search.bookkeeping import (
    StudyCounts,
    config_key,
    count_trials,
    is_counted,
    reap_dead_trials,
    requeue_failed,
    requeue_interrupted,
    session_failures,
)
from subsetsel.search.checks import load_base_dataset, preflight
from subsetsel.search.space import grid_points
from subsetsel.search.study import (
    SearchError,
    SearchSettings,
    claim_out_dir,
    make_pruner,
    make_sampler,
    open_study,
)
from subsetsel.search.trials import Objective

if TYPE_CHECKING:
    import optuna

    from subsetsel.data import Dataset


def new_session() -> str:
    """A fresh id for one run of the search."""
    return uuid.uuid4().hex[:12]


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with `threads` torch threads (0: leave torch's setting), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(before)


def work(
    settings: SearchSettings,
    worker: int = 0,
    poll: float = 1.0,
    study: optuna.Study | None = None,
    dataset: Dataset | None = None,
) -> int:
    """Run trials until the study holds `settings.n_trials` COMPLETE/PRUNED trials, or until
    nothing is left for this run of the search; returns how many trials this worker ran.

    Nothing is left when `n_trials` trials failed in this run (`settings.session`), or, for the
    grid, when every grid point is done, running, queued or failed in this run. A configuration
    that failed in this run is not trained again in it. Safe to run in many processes and
    machines at once. dataset: the data of `settings.base` (loaded here when None)."""
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    log = (lambda _m: None) if settings.quiet else _stderr
    session = settings.session or new_session()
    study = study or open_study(settings)
    study.pruner = make_pruner(settings)
    if dataset is None:
        dataset = load_base_dataset(settings.base)
    objective = Objective(settings, log, dataset=dataset, session=session)
    ran = 0
    while True:
        with contextlib.suppress(sqlalchemy.exc.OperationalError):  # busy DB: next round
            reap_dead_trials(study)
        trials = study.get_trials(deepcopy=False)
        counts = count_trials(trials, session)
        if counts.counted >= settings.n_trials:
            return ran
        if not counts.waiting and (
            counts.counted + counts.running >= settings.n_trials
            or not _anything_left(study, trials, settings, session, counts)
        ):
            if not counts.running:
                return ran
            time.sleep(poll)  # the last trials run elsewhere; wait for them (or their death)
            continue
        study.sampler = make_sampler(settings, salt=len(trials) * 1009 + worker)
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        except optuna.exceptions.UpdateFinishedTrialError:
            log("a trial of this worker was failed by another process (stale heartbeat)")
        ran += 1


def _anything_left(
    study: optuna.Study, trials: list[optuna.trial.FrozenTrial], settings: SearchSettings,
    session: str, counts: StudyCounts,
) -> bool:
    """Whether this run of the search has a configuration left to try: fewer than `n_trials`
    failures in it, and for the grid a point not done, running, queued or failed in it (queued
    here when Optuna's grid sampler would not pick it: its only trials were skipped)."""
    from optuna.trial import TrialState

    if counts.session_failed >= settings.n_trials:
        return False
    if settings.sampler != "grid":
        return True
    failed = session_failures(trials, session)
    taken = {config_key(t.params) for t in trials
             if is_counted(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)}
    left = [p for p in grid_points(settings.space)
            if config_key(p) not in taken and config_key(p) not in failed]
    if not left:
        return False
    visited = {config_key(t.params) for t in trials
               if t.state.is_finished() or t.state == TrialState.RUNNING}
    if all(config_key(p) in visited for p in left):  # the sampler would re-run a visited point
        study.enqueue_trial(left[0])
    return True


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _worker_main(settings: SearchSettings, worker: int) -> None:
    """Entry point of a spawned worker process: `settings.threads` torch threads, its own copy
    of the data, then `work`."""
    import torch

    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        work(settings, worker)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker; the parent reports it
        sys.exit(130)


def run_search(settings: SearchSettings, dataset: Dataset | None = None) -> optuna.Study:
    """Check the settings (`preflight`, unless `dataset` is given: the data it checked), create
    or join the study, re-queue killed, interrupted and failed trials (a failed configuration is
    tried once more per run), run `settings.workers` worker processes (in this process when 1,
    with this process's data) until the budget is used or nothing is left, and return the study.
    Every process of the search uses `settings.threads` torch threads."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    settings = dataclasses.replace(settings, session=settings.session or new_session())
    with torch_threads(settings.threads):
        if dataset is None:
            dataset = preflight(settings)
        settings.out_dir.mkdir(parents=True, exist_ok=True)
        claim_out_dir(settings.out_dir, settings.study_name)
        study = open_study(settings)
        reaped = reap_dead_trials(study)
        queued = requeue_interrupted(study)
        failed = requeue_failed(study, settings.n_trials)
        if not settings.quiet:
            if reaped or queued:
                _stderr(f"resuming: re-queued trials {sorted(reaped + queued)} "
                        "(killed or interrupted)")
            if failed:
                _stderr(f"retrying failed trials {failed} once in this run")
        if settings.workers == 1:
            work(settings, 0, study=study, dataset=dataset)
            return study
        _spawn_workers(settings)
    return study


def _spawn_workers(settings: SearchSettings) -> None:
    import multiprocessing

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
