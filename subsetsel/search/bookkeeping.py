"""Trial bookkeeping: which trials count, which are retried, and the reaping of dead workers.

States, as the search uses them:
- COMPLETE, PRUNED: counted (they use up `--trials`).
- FAIL with an `error` user attr: training raised. Not counted; re-queued once by the next run of
  the search while the budget is not reached (`requeue_failed`), never again within the run
  that saw it fail.
- FAIL with `surplus`: never trained (the budget was full, or the configuration was a duplicate
  or already failed in this run); ignored.
- FAIL otherwise: killed or interrupted; re-queued with the same run folder (`reap_dead_trials`,
  the storage's heartbeat callback, `requeue_interrupted`), at most MAX_RETRY times in a row.

Every trial records its `worker` (host, pid, torch threads and the `session`: one run of the
search, i.e. one `run_search` call and its workers) and, once finished, its `result`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

MAX_RETRY = 3  # a killed trial is re-queued at most this many times in a row
# user attrs of a trial that describe its worker or its outcome, not its configuration (one
# dict each, so a trial costs few storage commits; the single names are those of older studies)
_RUN_ATTRS = ("worker", "host", "pid", "session", "threads")
_RESULT_FIELDS = ("final_acc", "best_acc", "elapsed_seconds", "epochs_run")
_OUTCOME_ATTRS = ("error", "result", "diverged", *_RESULT_FIELDS)


def host_id() -> str:
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


def worker_info(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The `worker` user attr: host, pid, session and torch threads of the process that ran it."""
    attrs = trial.user_attrs
    return dict(attrs.get("worker") or {k: attrs[k] for k in _RUN_ATTRS[1:] if k in attrs})


def trial_result(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The `result` user attr: final_acc, best_acc, elapsed_seconds (select + train) and
    epochs_run; empty before the trial finished."""
    attrs = trial.user_attrs
    return dict(attrs.get("result") or {k: attrs[k] for k in _RESULT_FIELDS if k in attrs})


def session_of(trial: optuna.trial.FrozenTrial) -> str | None:
    return worker_info(trial).get("session")


def config_key(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A hashable identity of a configuration (its searched values)."""
    return tuple(sorted(params.items()))


def is_counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial uses up the budget: COMPLETE or PRUNED."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def is_failed(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial whose training raised (FAIL with an `error`)."""
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def is_skipped(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that never trained: surplus, duplicate, or a repeat of a failure of its run."""
    return bool(trial.user_attrs.get("surplus"))


def retried_numbers(trials: Iterable[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of the trials that some trial retries."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial, *, fresh: bool = False) -> bool:
    """Queue a WAITING copy of `trial` with the same parameters.

    Killed / interrupted (fresh=False): the copy keeps the user attrs (so the same run folder,
    resumed from its checkpoint) and intermediate values; system attrs `failed_trial` /
    `retry_history` as Optuna's RetryHeartbeatStaleTrialCallback writes them (its static helpers
    read them); False after MAX_RETRY retries in a row. Failed by an error (fresh=True): the copy
    starts a new history and trains from scratch in its own folder.
    The dead worker's host/pid/session are dropped either way.
    """
    import optuna

    if fresh:
        history = [trial.number]
        drop = _RUN_ATTRS + _OUTCOME_ATTRS + ("run_dir",)
        intermediate: dict[int, float] = {}
    else:
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) > MAX_RETRY:
            return False
        drop = _RUN_ATTRS
        intermediate = dict(trial.intermediate_values)
    system_attrs = {**trial.system_attrs, "retry_history": history}
    if fresh:
        system_attrs["failed_trial"] = trial.number
    else:
        system_attrs.setdefault("failed_trial", trial.number)
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in drop}
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params=trial.params,
            distributions=trial.distributions, user_attrs=user_attrs,
            system_attrs=system_attrs, intermediate_values=intermediate,
        )
    )
    return True


def retry_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Heartbeat-stale trial callback of the storage."""
    retry(study, trial)


def reap_dead_trials(study: optuna.Study) -> list[int]:
    """Fail and re-queue RUNNING trials whose worker died: on this machine at once (its pid is
    gone), elsewhere once the heartbeat is stale (Optuna's `fail_stale_trials`). Returns the
    numbers of the trials failed here by pid."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host, me = host_id(), os.getpid()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = worker_info(t)
        pid = worker.get("pid")
        if worker.get("host") != host or pid is None or pid == me or _pid_alive(pid):
            continue
        try:
            changed = study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if changed:
            retry(study, study._storage.get_trial(t._trial_id))
            failed.append(t.number)
    return failed


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Re-queue trials that failed without an error (Ctrl-C, a worker stopped) and were not
    retried yet. Run once by the process that starts a search, before its workers."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    queued = []
    for t in trials:
        if t.state != TrialState.FAIL or t.number in retried:
            continue
        if is_failed(t) or is_skipped(t):
            continue
        if retry(study, t):
            queued.append(t.number)
    return queued


def requeue_failed(study: optuna.Study, n_trials: int) -> list[int]:
    """Re-queue, once, configurations whose latest attempt failed by an error (and that have no
    COMPLETE/PRUNED, running or queued trial), oldest first, as many as the budget of
    `n_trials` COMPLETE/PRUNED trials still needs. Run once by the process that starts a search
    (a new run of it), before its workers; returns the failed trials' numbers."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    busy = {config_key(t.params) for t in trials
            if t.state in (TrialState.RUNNING, TrialState.WAITING)}
    ahead = sum(1 for t in trials
                if is_counted(t) or t.state in (TrialState.RUNNING, TrialState.WAITING))
    failed = [t for t in latest_failures(trials) if config_key(t.params) not in busy]
    queued = failed[: max(0, n_trials - ahead)]
    for t in queued:
        retry(study, t, fresh=True)
    return [t.number for t in queued]


def latest_failures(trials: Iterable[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The last failed attempt of each configuration that has no COMPLETE/PRUNED trial and was
    not retried since, by trial number."""
    trials = list(trials)
    retried = retried_numbers(trials)
    done = {config_key(t.params) for t in trials if is_counted(t)}
    latest: dict[tuple[tuple[str, Any], ...], optuna.trial.FrozenTrial] = {}
    for t in trials:
        key = config_key(t.params)
        if not is_failed(t) or t.number in retried or key in done:
            continue
        if key not in latest or t.number > latest[key].number:
            latest[key] = t
    return sorted(latest.values(), key=lambda t: t.number)


@dataclass
class StudyCounts:
    """Trials of a study by what they mean for the budget."""

    counted: int = 0  # COMPLETE or PRUNED
    running: int = 0
    waiting: int = 0
    session_failed: int = 0  # failed, or skipped as a repeat of a failure, in this session


def study_counts(study: optuna.Study, session: str = "") -> StudyCounts:
    return count_trials(study.get_trials(deepcopy=False), session)


def count_trials(trials: Iterable[optuna.trial.FrozenTrial], session: str = "") -> StudyCounts:
    from optuna.trial import TrialState

    counts = StudyCounts()
    for t in trials:
        if is_counted(t):
            counts.counted += 1
        elif t.state == TrialState.RUNNING:
            counts.running += 1
        elif t.state == TrialState.WAITING:
            counts.waiting += 1
        elif session and session_of(t) == session and (
            is_failed(t) or "repeat_of" in t.user_attrs
        ):
            counts.session_failed += 1
    return counts


def session_failures(
    trials: Iterable[optuna.trial.FrozenTrial], session: str
) -> dict[tuple[tuple[str, Any], ...], int]:
    """Configuration -> number of its first trial that failed in `session`."""
    failed: dict[tuple[tuple[str, Any], ...], int] = {}
    for t in trials:
        if session and session_of(t) == session and is_failed(t):
            key = config_key(t.params)
            failed[key] = min(failed.get(key, t.number), t.number)
    return failed
