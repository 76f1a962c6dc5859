"""The objective: one trial is one `subsetsel.run.run` of the trial's configuration."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from subsetsel.errors import DivergenceError, first_line
from subsetsel.search.bookkeeping import config_key, host_id, is_counted, session_failures
from subsetsel.search.space import fmt
from subsetsel.search.study import SearchSettings

if TYPE_CHECKING:
    import optuna

    from subsetsel.data import Dataset


class Skipped(Exception):
    """The trial is not trained: surplus, a duplicate grid point, or a configuration that already
    failed in this run of the search."""


class Objective:
    """One trial: train `settings.trial_config(params)` in `<out>/trials/<number>`; return the
    final test accuracy. A trial retried after its worker was killed reuses (and resumes) the
    folder of the trial it retries. Each evaluated epoch's test accuracy is reported to the
    study's pruner (not to a NopPruner: no storage write per epoch); TrialPruned stops it.

    dataset: the data of `settings.base`, already loaded (shared by every trial of a worker;
    None: each trial loads it). session: id of this run of the search.
    """

    def __init__(
        self,
        settings: SearchSettings,
        log: Callable[[str], None] | None = None,
        *,
        dataset: Dataset | None = None,
        session: str = "",
    ) -> None:
        self.settings = settings
        self.log = log or (lambda _msg: None)
        self.dataset = dataset
        self.session = session or settings.session

    def __call__(self, trial: optuna.trial.Trial) -> float:
        import optuna

        try:
            return self._run(trial)
        except (optuna.TrialPruned, Skipped):
            raise
        except Exception as err:  # FAIL: retried by the next run of the search, not by this one
            message = f"{type(err).__name__}: {first_line(err)}"
            with contextlib.suppress(Exception):
                trial.set_user_attr("error", message)
            self.log(f"trial {trial.number} failed: {message}")
            raise

    def _run(self, trial: optuna.trial.Trial) -> float:
        import optuna
        import torch

        from subsetsel.run import run

        trial.set_user_attr("worker", {"host": host_id(), "pid": os.getpid(),
                                       "session": self.session,
                                       "threads": torch.get_num_threads()})
        params = {p.name: p.suggest(trial) for p in self.settings.space}
        self._check_skip(trial, params)
        run_dir = Path(
            trial.user_attrs.get("run_dir")
            or self.settings.out_dir / "trials" / str(trial.number)
        )
        trial.set_user_attr("run_dir", str(run_dir))
        resume = (run_dir / "checkpoint.pt").exists()
        if not resume and (run_dir / "log.jsonl").exists():
            (run_dir / "log.jsonl").unlink()  # killed before its first checkpoint: start over
        config = self.settings.trial_config(params)
        pruning = not isinstance(trial.study.pruner, optuna.pruners.NopPruner)
        last: dict[str, Any] = {}

        def report(record: dict[str, Any]) -> None:
            last.update(record)
            if not pruning or record["test_acc"] is None:
                return
            trial.report(record["test_acc"], record["epoch"])
            if trial.should_prune():
                _record(trial, record["test_acc"], None, record["elapsed_seconds"],
                        record["epoch"] + 1)
                raise optuna.TrialPruned(f"epoch {record['epoch']}: acc {record['test_acc']:.4f}")

        start = time.perf_counter()
        try:
            summary = run(config, run_dir, resume=resume, callbacks=[report],
                          dataset=self.dataset)
        except optuna.TrialPruned:
            self.log(f"trial {trial.number} pruned at epoch {last['epoch']} "
                     f"(acc {last['test_acc']:.4f}) {params_text(params)}")
            raise
        except DivergenceError as err:  # a result (this configuration diverges), not a failure
            message = first_line(err)
            trial.set_user_attr("diverged", message)
            _record(trial, None, None, last.get("elapsed_seconds", 0.0),
                    last.get("epoch", -1) + 1)
            self.log(f"trial {trial.number} diverged: {message} {params_text(params)}")
            raise optuna.TrialPruned(f"diverged: {message}") from None
        acc = float(summary["final_acc"])
        _record(trial, acc, summary["best_acc"], summary["elapsed_seconds"], summary["epochs"])
        self.log(f"trial {trial.number}: acc {acc:.4f}, {summary['elapsed_seconds']:.1f} s "
                 f"training ({time.perf_counter() - start:.1f} s wall) {params_text(params)}")
        return acc

    def _check_skip(self, trial: optuna.trial.Trial, params: dict[str, Any]) -> None:
        """Raise Skipped (a FAIL whose `surplus` attr says why) if the trial must not train."""
        reason = self._skip_reason(trial, params)
        if reason is None:
            return
        trial.set_user_attr("surplus", reason[0])
        if reason[1] is not None:
            trial.set_user_attr("repeat_of", reason[1])
        raise Skipped(f"trial {trial.number}: {reason[0]}")

    def _skip_reason(
        self, trial: optuna.trial.Trial, params: dict[str, Any]
    ) -> tuple[str, int | None] | None:
        from optuna.trial import TrialState

        trials = [t for t in trial.study.get_trials(deepcopy=False) if t.number != trial.number]
        key = config_key(params)
        failed = session_failures(trials, self.session).get(key)
        if failed is not None:
            return f"this configuration failed in this run (trial {failed})", failed
        if self.settings.sampler == "grid":
            for t in trials:
                if config_key(t.params) != key:
                    continue
                if is_counted(t) or (
                    t.number < trial.number
                    and t.state in (TrialState.RUNNING, TrialState.WAITING)
                ):
                    return f"duplicate of trial {t.number}", None
        ahead = sum(
            1 for t in trials
            if t.number < trial.number
            and (is_counted(t) or t.state in (TrialState.RUNNING, TrialState.WAITING))
        )
        if ahead >= self.settings.n_trials:
            return "the study already has its trials", None
        return None


def _record(
    trial: Any, acc: float | None, best: float | None, seconds: float, epochs: int
) -> None:
    trial.set_user_attr("result", {"final_acc": acc, "best_acc": best,
                                   "elapsed_seconds": seconds, "epochs_run": epochs})


def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={fmt(v)}" for k, v in params.items())
