"""`subsetsel search`: space parsing, bad input, grid/TPE searches over a replayed selection file,
resume after a SIGKILLed worker, heartbeat-stale retry, parallel workers, pruning, retraining."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import h5py
import optuna
import pytest
import sqlalchemy
from click.testing import CliRunner
from optuna.trial import TrialState

from subsetsel.cli import main
from subsetsel.search import (
    Objective,
    Param,
    SearchSettings,
    SearchSpaceError,
    format_table,
    grid_size,
    is_counted,
    open_storage,
    open_study,
    parse_param,
    parse_space,
    requeue_interrupted,
    results,
    work,
)
from subsetsel.store import SelectionStore
from subsetsel.train import TrainConfig, read_log

DATA = ["--train-size", "300", "--test-size", "100"]
GRID = ["--sampler", "grid", "--param", "lr=0.02,0.1", "--param", "optimizer=sgd,adam"]


def _invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_one_line_error(result, code):
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def selection_file(tmp_path_factory):
    """A randompb 10 % selection file of MNIST-1D (300 train), 2 epochs, one round per epoch."""
    folder = tmp_path_factory.mktemp("sel")
    path = folder / "pb.h5"
    result = _invoke(
        ["train", *DATA, "--model", "mlp", "--epochs", "2", "--strategy", "randompb",
         "--fraction", "0.1", "--select-every", "1", "--quiet", "--out", folder / "run",
         "--save-selections", path]
    )
    assert result.exit_code == 0, result.output
    return path


def _study(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


# ---- the search space ------------------------------------------------------------------------


def test_parse_param_forms():
    assert parse_param("lr=log:1e-3:1e-1") == Param("lr", low=1e-3, high=1e-1, log=True)
    assert parse_param("momentum=0.8:0.99") == Param("momentum", low=0.8, high=0.99)
    assert parse_param("optimizer=sgd, adam,rmsprop").choices == ("sgd", "adam", "rmsprop")
    assert parse_param("weight-decay=0,5e-4") == Param("weight_decay", choices=(0.0, 5e-4))
    assert parse_param("batch_size=64,128").choices == (64, 128)
    assert parse_param("epochs=log:2:16") == Param("epochs", low=2, high=16, log=True)
    assert str(parse_param("lr=log:0.001:0.1")) == "lr=log:0.001:0.1"
    assert str(parse_param("weight_decay=0,5e-4")) == "weight_decay=0,0.0005"
    space = parse_space(["lr=0.01,0.1", "model=mlp,cnn1d", "batch_size=64"])
    assert grid_size(space) == 4


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lr", "expected NAME=VALUES"),
        ("lr=", "expected NAME=VALUES"),
        ("lrr=0.1", "unknown parameter 'lrr'"),
        ("optimizer=sgd,lion", "unknown optimizer 'lion'"),
        ("model=mlp,transformer", "unknown model 'transformer'"),
        ("schedule=cosine,never", "unknown schedule 'never'"),
        ("lr=0", "lr must be > 0"),
        ("lr=0.1,-0.01", "lr must be > 0"),
        ("lr=log:0:0.1", "lr must be > 0"),
        ("weight_decay=log:0:1e-3", "a log range needs LO > 0"),
        ("lr=0.1:0.01", "range needs LO < HI"),
        ("lr=1:2:3", "a range is LO:HI"),
        ("batch_size=12.5", "is not an integer"),
        ("batch_size=0,64", "batch_size must be >= 1"),
        ("lr=abc", "is not a number"),
        ("lr=nan", "not a finite number"),
        ("optimizer=sgd:adam", "takes a list of names"),
        ("lr=0.1,0.1", "listed twice"),
        ("lr=0.1,,0.2", "empty value"),
        ("momentum=1.5", "momentum must be in [0, 1)"),
    ],
)
def test_bad_param_is_a_one_line_usage_error(spec, message, selection_file, in_tmp):
    with pytest.raises(SearchSpaceError, match=message.replace("[", r"\[").replace(")", r"\)")):
        parse_param(spec)
    line = _assert_one_line_error(
        _invoke(["search", "--selections", selection_file, "--param", spec]), 2
    )
    assert message in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--param", "lr=0.1"], "every --param has a single value"),
        (["--param", "lr=0.1,0.2", "--param", "lr=0.3,0.4"], "given more than once"),
        (["--sampler", "grid", "--param", "lr=log:1e-3:1e-1"], "--sampler grid needs listed"),
        (["--sampler", "grid", "--param", "lr=0.1,0.2", "--trials", "3"], "more than the grid"),
        (["--param", "lr=0.1,0.2", "--trials", "0"], "--trials must be >= 1"),
        (["--param", "lr=0.1,0.2", "--workers", "0"], "--workers must be >= 1"),
    ],
)
def test_bad_space_or_options_are_usage_errors(args, message, selection_file, in_tmp):
    line = _assert_one_line_error(_invoke(["search", "--selections", selection_file, *args]), 2)
    assert message in line
    assert not (in_tmp / "search").exists()


def test_selections_xor_full_data(selection_file, in_tmp):
    line = _assert_one_line_error(_invoke(["search", "--param", "lr=0.1,0.2"]), 2)
    assert "exactly one of --selections" in line
    both = ["search", "--selections", selection_file, "--full-data", "--param", "lr=0.1,0.2"]
    _assert_one_line_error(_invoke(both), 2)
    retrain = ["search", "--full-data", "--retrain-best", "--param", "lr=0.1,0.2"]
    assert "--retrain-best needs" in _assert_one_line_error(_invoke(retrain), 2)


# ---- bad files and storages --------------------------------------------------------------------


def test_missing_and_corrupt_selection_files(in_tmp):
    line = _assert_one_line_error(
        _invoke(["search", "--selections", "nope.h5", "--param", "lr=0.1,0.2"]), 1
    )
    assert "no such selection file" in line
    (in_tmp / "junk.h5").write_bytes(b"not hdf5 at all" * 10)
    line = _assert_one_line_error(
        _invoke(["search", "--selections", "junk.h5", "--param", "lr=0.1,0.2"]), 1
    )
    assert "not a readable HDF5 selection file" in line


def test_selection_file_of_other_data_is_refused(selection_file, in_tmp):
    other_size = ["search", "--selections", selection_file, "--train-size", "400",
                  "--param", "lr=0.1,0.2"]
    line = _assert_one_line_error(_invoke(other_size), 1)
    assert "made for a dataset of 300 examples" in line
    other_data = ["search", "--selections", selection_file, "--dataset", "digits",
                  "--train-size", "300", "--param", "lr=0.1,0.2"]
    line = _assert_one_line_error(_invoke(other_data), 1)
    assert "fingerprint" in line and "digits" in line
    other_seed = ["search", "--selections", selection_file, "--data-seed", "3", "--param",
                  "lr=0.1,0.2"]
    assert "fingerprint" in _assert_one_line_error(_invoke(other_seed), 1)
    assert not (in_tmp / "search").exists()


def test_truncated_selection_file_is_refused(selection_file, in_tmp):
    data = selection_file.read_bytes()
    (in_tmp / "cut.h5").write_bytes(data[: len(data) // 2])
    line = _assert_one_line_error(
        _invoke(["search", "--selections", "cut.h5", "--param", "lr=0.1,0.2"]), 1
    )
    assert "cut.h5" in line


@pytest.mark.parametrize(
    "url, message",
    [
        ("sqlite:////no/such/dir/x.db", "unable to open database file"),
        ("nosuchdialect://x", "cannot open storage nosuchdialect://x"),
        ("not a url", "cannot open storage"),
        ("postgresql://user:secret@127.0.0.1:1/db", "cannot open storage"),
    ],
)
def test_storage_that_cannot_be_opened(url, message, selection_file, in_tmp):
    line = _assert_one_line_error(
        _invoke(["search", "--selections", selection_file, "--storage", url, "--param",
                 "lr=0.1,0.2", "--quiet"]), 1
    )
    assert message in line
    assert "secret" not in line  # passwords are masked


def test_reference_without_summary_is_refused(selection_file, in_tmp):
    (in_tmp / "ref").mkdir()
    line = _assert_one_line_error(
        _invoke(["search", "--selections", selection_file, "--reference", "ref", "--param",
                 "lr=0.1,0.2"]), 1
    )
    assert "no summary.json" in line


# ---- searches ----------------------------------------------------------------------------------


def test_grid_search_replays_runs_each_config_once_and_resumes(selection_file, in_tmp):
    ref = _invoke(["train", *DATA, "--model", "mlp", "--epochs", "2", "--strategy", "full",
                   "--quiet", "--out", "ref"])
    assert ref.exit_code == 0, ref.output
    args = ["search", "--selections", selection_file, *GRID, "--out", "out", "--reference", "ref",
            "--quiet"]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    out = in_tmp / "out"
    assert "speedup = reference training seconds" in result.output
    rows = _rows(out)
    assert len(rows) == 4
    assert sorted((r["lr"], r["optimizer"]) for r in rows) == sorted(
        (lr, opt) for lr in ("0.02", "0.1") for opt in ("sgd", "adam")
    )
    accs = [float(r["acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)  # best first
    ref_seconds = json.loads((in_tmp / "ref" / "summary.json").read_text())["elapsed_seconds"]
    stored_sizes = [len(r) for r in SelectionStore.open(selection_file).rounds]
    for r in rows:
        assert r["state"] == "COMPLETE"
        assert float(r["speedup"]) == pytest.approx(ref_seconds / float(r["train_seconds"]))
        log = read_log(r["run_dir"])
        assert [e["epoch"] for e in log] == [0, 1]
        assert all("replay_file" in e and e["select_seconds"] < 0.05 for e in log)
        assert [e["subset_size"] for e in log] == stored_sizes < [300, 300]  # the replayed subsets
        assert float(r["acc"]) == log[-1]["test_acc"]
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0", "1", "2", "3"]
    config = json.loads((out / "trials" / "0" / "config.json").read_text())["config"]
    assert config["model"] == "mlp" and config["epochs"] == 2  # inherited from the file's run
    summary = json.loads((out / "results.json").read_text())
    assert summary["best_trial"] == int(rows[0]["trial"]) and len(summary["trials"]) == 4
    # running the same command again trains nothing
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/log.jsonl")}
    again = _invoke(args)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/log.jsonl")} == mtimes
    assert len(_study(out, "pb-grid").trials) == 4
    # joining the study with other settings is refused
    other = [a if a != "optimizer=sgd,adam" else "optimizer=sgd,rmsprop" for a in args]
    line = _assert_one_line_error(_invoke(other), 1)
    assert "other settings (differs in: space)" in line


def test_tpe_search_is_seeded_and_respects_ranges(selection_file, in_tmp):
    def search(out):
        result = _invoke(["search", "--selections", selection_file, "--sampler", "tpe",
                          "--param", "lr=log:1e-3:0.3", "--param", "batch_size=64,128",
                          "--trials", "3", "--epochs", "1", "--out", out, "--quiet"])
        assert result.exit_code == 0, result.output
        return sorted(_study(in_tmp / out, "pb-tpe").trials, key=lambda t: t.number)

    first, second = search("a"), search("b")
    assert [t.state for t in first] == [TrialState.COMPLETE] * 3
    assert [t.params for t in first] == [t.params for t in second]
    assert [t.value for t in first] == [t.value for t in second]
    assert all(1e-3 <= t.params["lr"] <= 0.3 and t.params["batch_size"] in (64, 128)
               for t in first)
    assert len({t.params["lr"] for t in first}) == 3


def test_retrain_best_on_full_data(selection_file, in_tmp):
    args = ["search", "--selections", selection_file, "--sampler", "grid", "--param",
            "lr=0.02,0.2", "--out", "out", "--retrain-best", "--quiet"]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    out = in_tmp / "out"
    meta = json.loads((out / "results.json").read_text())
    best = meta["trials"][0]
    assert meta["retrain_best"]["params"] == {"lr": best["lr"]}
    log = read_log(out / "best-full")
    assert [e["subset_size"] for e in log] == [300, 300]  # full data
    assert meta["retrain_best"]["final_acc"] == log[-1]["test_acc"]
    assert "retrained on full data" in result.output
    mtime = (out / "best-full" / "log.jsonl").stat().st_mtime_ns
    assert _invoke(args).exit_code == 0
    assert (out / "best-full" / "log.jsonl").stat().st_mtime_ns == mtime  # not retrained


def test_full_data_search(in_tmp):
    result = _invoke(["search", "--full-data", *DATA, "--model", "mlp", "--epochs", "1",
                      "--param", "lr=0.02,0.1", "--sampler", "grid", "--quiet"])
    assert result.exit_code == 0, result.output
    out = in_tmp / "search" / "full-mnist1d-grid"
    rows = _rows(out)
    assert len(rows) == 2
    assert all(e["subset_size"] == 300 and "replay_file" not in e
               for r in rows for e in read_log(r["run_dir"]))


def _settings(tmp: Path, selection_file: Path, **kw) -> SearchSettings:
    base = TrainConfig(train_size=300, test_size=100, model="mlp", epochs=2,
                       replay=str(selection_file))
    values = dict(space=parse_space(["lr=log:0.01:0.2"]), base=base, out_dir=tmp / "out",
                  storage=f"sqlite:///{tmp / 'study.db'}", study_name="s", sampler="random",
                  n_trials=2, quiet=True)
    values.update(kw)
    return SearchSettings(**values)


def test_pruned_trial_records_its_last_epoch(selection_file, tmp_path):
    settings = _settings(tmp_path, selection_file, space=parse_space(["lr=0.05,0.1"]))
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=1.01))
    study.optimize(Objective(settings), n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.PRUNED
    result = trial.user_attrs["result"]
    assert result["epochs_run"] == 1 and list(trial.intermediate_values) == [0]
    log = read_log(trial.user_attrs["run_dir"])
    assert len(log) == 1 and trial.value == log[0]["test_acc"] == result["final_acc"]


def test_a_failing_trial_is_reported_not_retried(selection_file, tmp_path, monkeypatch):
    import subsetsel.run

    real_run = subsetsel.run.run

    def flaky(config, *args, **kwargs):
        if config.lr == 0.1:
            raise RuntimeError("diverged\nsecond line")
        return real_run(config, *args, **kwargs)

    monkeypatch.setattr(subsetsel.run, "run", flaky)
    settings = _settings(tmp_path, selection_file, sampler="grid",
                         space=parse_space(["lr=0.02,0.1"]))
    assert work(settings) == 2
    study = _study(tmp_path, "s")
    rows = results(study, settings.space)
    assert [(r["lr"], r["state"]) for r in rows] == [(0.02, "COMPLETE"), (0.1, "FAIL")]
    assert rows[1]["error"] == "RuntimeError: diverged" and rows[1]["acc"] is None
    assert requeue_interrupted(study) == []
    assert "FAIL" in format_table(rows, settings.space)


def test_heartbeat_stale_trial_of_another_machine_is_retried(selection_file, tmp_path):
    """A worker elsewhere died: its RUNNING trial's heartbeat goes stale; the next worker fails
    it (Optuna's fail_stale_trials) and our storage callback re-queues the same parameters."""
    settings = _settings(tmp_path, selection_file, heartbeat=1)
    storage = open_storage(settings.storage, heartbeat=1)
    study = open_study(settings, storage)
    dist = optuna.distributions.FloatDistribution(0.01, 0.2, log=True)
    trial_id = storage.create_new_trial(study._study_id)
    storage.set_trial_param(trial_id, "lr", dist.to_internal_repr(0.05), dist)
    storage.set_trial_user_attr(trial_id, "host", "elsewhere/0")
    storage.set_trial_user_attr(trial_id, "pid", 1)
    storage.record_heartbeat(trial_id)
    engine = sqlalchemy.create_engine(settings.storage)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(
            "UPDATE trial_heartbeats SET heartbeat = datetime('now', '-60 seconds')"
        ))
    work(settings)
    trials = sorted(_study(tmp_path, "s").trials, key=lambda t: t.number)
    assert trials[0].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == {"lr": 0.05}
    with pytest.warns(optuna.exceptions.ExperimentalWarning):  # Optuna's own reader agrees
        original = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
        assert original(retries[0]) == 0
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2


def test_interrupted_trials_are_requeued_once(selection_file, tmp_path):
    """Ctrl-C fails the running trial without an error: the next start queues it again (once);
    trials that failed with an error in training (see requeue_failed), or were surplus, are not
    re-queued as interrupted. Failed trials do not count."""
    settings = _settings(tmp_path, selection_file)
    storage = open_storage(settings.storage)
    study = open_study(settings, storage)
    dist = optuna.distributions.FloatDistribution(0.01, 0.2, log=True)
    for number, attrs in enumerate([{}, {"error": "RuntimeError: boom"}, {"surplus": True}]):
        trial_id = storage.create_new_trial(study._study_id)
        storage.set_trial_param(trial_id, "lr", dist.to_internal_repr(0.02 * (number + 1)), dist)
        storage.set_trial_user_attr(trial_id, "run_dir", f"trials/{number}")
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    assert requeue_interrupted(study) == [0]
    assert requeue_interrupted(study) == []
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == {"lr": 0.02}
    assert waiting[0].user_attrs == {"run_dir": "trials/0"}
    assert waiting[0].system_attrs["retry_history"] == [0]
    assert [is_counted(t) for t in study.trials] == [False, False, False, False]


def _open_store_many_times(path: str) -> int:
    for _ in range(20):
        SelectionStore.open(path)
    return 1


def test_concurrent_readers_of_one_selection_file(selection_file):
    pool = multiprocessing.get_context("fork").Pool(4)
    with h5py.File(selection_file, "r", locking=False), pool:  # one reader keeps it open
        assert sum(pool.map(_open_store_many_times, [str(selection_file)] * 8)) == 8


def _work_forked(settings: SearchSettings, worker: int) -> None:
    import torch

    torch.set_num_threads(1)
    work(settings, worker, poll=0.1)


def test_two_worker_processes_share_one_study(selection_file, tmp_path):
    """Two processes (forked: no import cost) run `work` on one SQLite study: exactly the
    grid's trials, each configuration once, both workers busy."""
    settings = _settings(tmp_path, selection_file, sampler="grid", n_trials=4, workers=2,
                         space=parse_space(["lr=0.02,0.1", "optimizer=sgd,adam"]))
    open_study(settings)
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_work_forked, args=(settings, i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    trials = _study(tmp_path, "s").trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4
    assert len({t.user_attrs["worker"]["pid"] for t in complete}) == 2
    assert all(t.state == TrialState.COMPLETE or t.user_attrs.get("surplus") for t in trials)


@pytest.mark.slow
def test_cli_parallel_workers(selection_file, in_tmp):
    """--workers 2 spawns two fresh processes (each pays the torch import), each with the
    search's --threads."""
    result = _invoke(["search", "--selections", selection_file, *GRID, "--workers", "2",
                      "--out", "out", "--quiet"])
    assert result.exit_code == 0, result.output
    trials = _study(in_tmp / "out", "pb-grid").trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4
    assert len({t.user_attrs["worker"]["pid"] for t in complete}) == 2  # both workers trained
    assert {t.user_attrs["worker"]["threads"] for t in complete} == {1}  # --threads (default 1)
    assert len(_rows(in_tmp / "out")) == 4


def _cli_forked(args: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    main(args)


KILL_GRID = ["--sampler", "grid", "--param", "lr=0.02,0.05,0.1"]


def test_sigkilled_search_resumes_without_rerunning_finished_trials(selection_file, in_tmp):
    """SIGKILL the search process in the middle of its second trial, run the same command
    again: the killed trial is retried in its own folder from its checkpoint, the finished one
    is not re-run, and the study ends with each grid point COMPLETE exactly once."""
    args = [str(a) for a in ["search", "--selections", selection_file, *KILL_GRID, "--out",
                             "out", "--epochs", "3", "--slow-input", "0.3", "--quiet"]]
    out = in_tmp / "out"
    proc = multiprocessing.get_context("fork").Process(target=_cli_forked, args=(args,))
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not (out / "trials" / "1" / "checkpoint.pt").exists():  # trial 1 is mid-run
            assert proc.is_alive(), f"the search ended early (exit code {proc.exitcode})"
            assert time.monotonic() < deadline, "the search did not reach trial 1"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == -signal.SIGKILL
    killed = _study(out, "pb-grid").trials
    assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.RUNNING]
    done_log = (out / "trials" / "0" / "log.jsonl").stat().st_mtime_ns
    resumed = _invoke(args)
    assert resumed.exit_code == 0, resumed.output
    trials = sorted(_study(out, "pb-grid").trials, key=lambda t: t.number)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 3  # each config once
    assert trials[1].state == TrialState.FAIL
    retry = next(t for t in complete if t.system_attrs.get("failed_trial") == 1)
    assert retry.params == trials[1].params
    assert retry.user_attrs["run_dir"] == str(out / "trials" / "1")
    assert len(list((out / "trials").iterdir())) == 3  # one run folder per configuration
    assert (out / "trials" / "0" / "log.jsonl").stat().st_mtime_ns == done_log  # not re-run
    log = read_log(out / "trials" / "1")
    assert [e["epoch"] for e in log] == [0, 1, 2]  # resumed from its checkpoint
    assert retry.value == log[-1]["test_acc"]
    assert len(_rows(out)) == 3


def test_selection_file_of_other_seeds_is_searched_on_its_own_data(in_tmp):
    """The data seed and training seed of the run that made the file are inherited."""
    made = _invoke(["train", *DATA, "--model", "mlp", "--epochs", "1", "--strategy", "random",
                    "--fraction", "0.5", "--seed", "1", "--data-seed", "3", "--quiet",
                    "--out", "run", "--save-selections", "s13"])
    assert made.exit_code == 0, made.output
    result = _invoke(["search", "--selections", "s13", "--sampler", "grid", "--param",
                      "lr=0.01,0.1", "--trials", "1", "--out", "out", "--quiet"])
    assert result.exit_code == 0, result.output
    config = json.loads(next((in_tmp / "out" / "trials").glob("*/config.json")).read_text())
    assert config["config"]["data_seed"] == 3 and config["config"]["seed"] == 1


def test_one_output_folder_serves_one_study(selection_file, in_tmp):
    args = ["search", "--selections", selection_file, "--sampler", "grid", "--param",
            "lr=0.01,0.1", "--trials", "1", "--out", "out", "--quiet"]
    assert _invoke([*args, "--study-name", "a"]).exit_code == 0
    line = _assert_one_line_error(_invoke([*args, "--study-name", "b"]), 1)
    assert "study 'a'" in line and "another --out" in line


# ---- checks before any trial, failed trials, exit status -----------------------------------------


def _no_trials_ran(folder: Path) -> bool:
    return not (folder / "trials").exists() or not any((folder / "trials").iterdir())


def _copy_store(selection_file: Path, path: Path, epochs: list[int]) -> Path:
    """A selection file with the fixture's metadata and one round at each of `epochs`."""
    from subsetsel.selection.base import Selection

    source = SelectionStore.open(selection_file)
    store = SelectionStore.create(path, source.metadata)
    for epoch in epochs:
        store.append(Selection(source.rounds[0].indices, source.rounds[0].weights, epoch=epoch))
    return path


def test_unavailable_device_fails_before_any_trial(selection_file, in_tmp):
    line = _assert_one_line_error(
        _invoke(["search", "--selections", selection_file, "--param", "lr=0.01,0.1",
                 "--device", "cuda:99", "--out", "out", "--quiet"]), 2
    )
    assert "cuda:99" in line
    assert _no_trials_ran(in_tmp / "out")


@pytest.mark.parametrize("epochs, message", [([], "holds no selection round"),
                                             ([1], "no round starts at epoch 0")])
def test_selection_file_without_a_first_round_fails_before_any_trial(
    epochs, message, selection_file, in_tmp
):
    path = _copy_store(selection_file, in_tmp / "odd.h5", epochs)
    line = _assert_one_line_error(
        _invoke(["search", "--selections", path, "--param", "lr=0.01,0.1", "--out", "out",
                 "--quiet"]), 1
    )
    assert message in line and "odd.h5" in line
    assert _no_trials_ran(in_tmp / "out")


def test_every_trial_failing_exits_1_and_the_fixed_rerun_retries_them(
    selection_file, in_tmp, monkeypatch
):
    """All trials fail (here: training raises): exit 1 with the first failure in one line, the
    FAIL rows written; the same command once the cause is gone trains every configuration (failed
    trials do not count toward --trials and are retried by the next run)."""
    import subsetsel.run

    real_run = subsetsel.run.run

    def broken(config, *args, **kwargs):
        raise RuntimeError(f"no accelerator for lr {config.lr}\nsecond line")

    args = ["search", "--selections", selection_file, "--sampler", "grid", "--param",
            "lr=0.02,0.1", "--out", "out", "--quiet"]
    monkeypatch.setattr(subsetsel.run, "run", broken)
    line = _assert_one_line_error(_invoke(args), 1)
    assert "every trial failed (2)" in line and "RuntimeError: no accelerator for lr" in line
    assert "second line" not in line
    assert [r["state"] for r in _rows(in_tmp / "out")] == ["FAIL", "FAIL"]
    monkeypatch.setattr(subsetsel.run, "run", real_run)
    again = _invoke(args)
    assert again.exit_code == 0, again.output
    rows = _rows(in_tmp / "out")
    assert sorted((r["lr"], r["state"]) for r in rows) == [("0.02", "COMPLETE"),
                                                           ("0.1", "COMPLETE")]
    trials = _study(in_tmp / "out", "pb-grid").trials
    assert sorted(t.system_attrs.get("failed_trial") for t in trials
                  if t.state == TrialState.COMPLETE) == [0, 1]  # the retries of 0 and 1
    for r in rows:  # retried from scratch in their own folders
        assert [e["epoch"] for e in read_log(r["run_dir"])] == [0, 1]


def test_a_failing_configuration_is_tried_once_per_run(selection_file, tmp_path, monkeypatch):
    """lr=0.1 always fails. Within one run (session) a random sampler that draws it again does
    not train it again; each new run of the search tries it exactly once more."""
    import dataclasses

    import subsetsel.run
    from subsetsel.search import run_search

    real_run = subsetsel.run.run

    def flaky(config, *args, **kwargs):
        if config.lr == 0.1:
            raise RuntimeError("diverged")
        return real_run(config, *args, **kwargs)

    monkeypatch.setattr(subsetsel.run, "run", flaky)
    settings = _settings(tmp_path, selection_file, sampler="random", n_trials=3,
                         space=parse_space(["lr=0.02,0.1"]))
    settings.base.epochs = 1
    for run_number, n_trials in ((1, 3), (2, 5)):  # raising --trials extends the search
        study = run_search(dataclasses.replace(settings, n_trials=n_trials))
        trials = study.trials
        attempts = [t for t in trials if "error" in t.user_attrs]
        assert [t.params for t in attempts] == [{"lr": 0.1}] * run_number
        assert len({t.user_attrs["worker"]["session"] for t in attempts}) == run_number
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == n_trials and all(t.params["lr"] == 0.02 for t in complete)
        repeats = [t for t in trials if "repeat_of" in t.user_attrs]
        assert all(t.user_attrs["repeat_of"] == attempts[-1].number for t in repeats
                   if t.user_attrs["worker"] == attempts[-1].user_attrs["worker"])
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_all_failing_random_search_stops(selection_file, tmp_path, monkeypatch):
    """Every configuration of a continuous space fails: one run stops after --trials failures."""
    import subsetsel.run
    from subsetsel.search import run_search

    def broken(config, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(subsetsel.run, "run", broken)
    settings = _settings(tmp_path, selection_file, sampler="tpe", n_trials=3)
    study = run_search(settings)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3


def test_a_diverging_configuration_counts_as_pruned(selection_file, tmp_path, monkeypatch):
    import subsetsel.run
    from subsetsel.errors import DivergenceError

    real_run = subsetsel.run.run

    def diverging(config, *args, **kwargs):
        if config.lr == 0.1:
            raise DivergenceError("epoch 0 step 3: loss is nan")
        return real_run(config, *args, **kwargs)

    monkeypatch.setattr(subsetsel.run, "run", diverging)
    settings = _settings(tmp_path, selection_file, sampler="grid",
                         space=parse_space(["lr=0.02,0.1"]))
    assert work(settings) == 2
    study = _study(tmp_path, "s")
    rows = results(study, settings.space)
    assert [(r["lr"], r["state"]) for r in rows] == [(0.02, "COMPLETE"), (0.1, "PRUNED")]
    assert rows[1]["error"] == "epoch 0 step 3: loss is nan"
    assert all(is_counted(t) for t in study.trials)


def test_reference_must_be_a_full_data_run(selection_file, in_tmp):
    made = _invoke(["train", *DATA, "--model", "mlp", "--epochs", "1", "--replay",
                    selection_file, "--quiet", "--out", "replayed"])
    assert made.exit_code == 0, made.output
    other = _invoke(["train", "--train-size", "200", "--test-size", "100", "--model", "mlp",
                     "--epochs", "1", "--strategy", "full", "--quiet", "--out", "small"])
    assert other.exit_code == 0, other.output
    base = ["search", "--selections", selection_file, "--param", "lr=0.1,0.2", "--out", "out"]
    line = _assert_one_line_error(_invoke([*base, "--reference", "replayed"]), 1)
    assert "is not a full-data run (it replays" in line
    line = _assert_one_line_error(_invoke([*base, "--reference", "small"]), 1)
    assert "trained on 200 examples, this search on 300" in line
    assert _no_trials_ran(in_tmp / "out")


# ---- threads, the default space, the data loaded once ------------------------------------------


def test_a_search_trial_reproduces_train_with_the_same_options(in_tmp):
    """`search` uses --threads (default 1, like `train`), whatever torch's thread count was:
    the trial of lr=0.05 equals `train --replay` with lr=0.05 bit for bit."""
    import torch

    opts = ["--train-size", "600", "--test-size", "200", "--model", "cnn1d", "--epochs", "2",
            "--batch-size", "128", "--seed", "0"]
    made = _invoke(["train", *opts, "--strategy", "randompb", "--fraction", "0.2",
                    "--select-every", "1", "--quiet", "--out", "sel-run",
                    "--save-selections", "sel"])
    assert made.exit_code == 0, made.output
    trained = _invoke(["train", *opts, "--lr", "0.05", "--replay", "sel", "--quiet",
                       "--out", "train"])
    assert trained.exit_code == 0, trained.output
    torch.set_num_threads(2)  # what a fresh process gets on a multi-core machine
    try:
        searched = _invoke(["search", "--selections", "sel", *opts, "--sampler", "grid",
                            "--param", "lr=0.05,0.1", "--out", "out", "--quiet"])
    finally:
        torch.set_num_threads(1)
    assert searched.exit_code == 0, searched.output
    row = next(r for r in _rows(in_tmp / "out") if r["lr"] == "0.05")
    ours, theirs = read_log(row["run_dir"]), read_log(in_tmp / "train")
    assert float(row["acc"]) == theirs[-1]["test_acc"]
    assert [e["train_loss"] for e in ours] == [e["train_loss"] for e in theirs]
    assert ours[-1]["test_loss"] == theirs[-1]["test_loss"]
    trials = _study(in_tmp / "out", "sel-grid").trials
    assert all(t.user_attrs["worker"]["threads"] == 1 for t in trials)


def test_worker_processes_use_the_search_threads(selection_file, tmp_path):
    import torch

    from subsetsel.search.workers import _worker_main

    settings = _settings(tmp_path, selection_file, threads=1, n_trials=1)
    open_study(settings)
    torch.set_num_threads(2)
    try:
        _worker_main(settings, 0)  # what each spawned worker runs
    finally:
        torch.set_num_threads(1)
    assert [t.user_attrs["worker"]["threads"] for t in _study(tmp_path, "s").trials] == [1]


def test_default_space():
    from subsetsel.search import default_space

    tpe = default_space(0.05, "tpe")
    assert [str(p) for p in tpe] == ["lr=log:0.005:0.5", "weight_decay=0,5e-05,0.0005"]
    grid = default_space(0.05, "grid")
    assert [str(p) for p in grid] == ["lr=0.005,0.015,0.05,0.15,0.5", "weight_decay=0,0.0005"]
    assert grid_size(grid) == 10
    with pytest.raises(SearchSpaceError):
        default_space(float("nan"), "tpe")


def test_search_without_param_uses_the_default_space(selection_file, in_tmp):
    help_text = _invoke(["search", "--help"]).output
    assert "Default (none given)" in help_text and "--threads" in help_text
    result = _invoke(["search", "--selections", selection_file, "--sampler", "grid", "--lr",
                      "0.1", "--trials", "2", "--epochs", "1", "--out", "out", "--quiet"])
    assert result.exit_code == 0, result.output
    meta = json.loads((in_tmp / "out" / "results.json").read_text())
    assert meta["space"] == ["lr=0.01,0.03,0.1,0.3,1", "weight_decay=0,0.0005"]
    assert len(meta["trials"]) == 2
    assert all(t["lr"] in (0.01, 0.03, 0.1, 0.3, 1.0) for t in meta["trials"])


def test_the_data_are_loaded_once_per_search_process(selection_file, in_tmp, monkeypatch):
    import subsetsel.data

    real_load = subsetsel.data.load_dataset
    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(subsetsel.data, "load_dataset", counting)
    result = _invoke(["search", "--selections", selection_file, *GRID, "--out", "out",
                      "--quiet", "--retrain-best"])
    assert result.exit_code == 0, result.output
    assert len(_rows(in_tmp / "out")) == 4
    assert len(calls) == 1  # checks, 4 trials and the retraining share one load


def test_evaluation_only_after_the_last_epoch_without_a_pruner(selection_file, in_tmp):
    result = _invoke(["search", "--selections", selection_file, "--sampler", "grid", "--param",
                      "lr=0.02,0.1", "--trials", "1", "--out", "out", "--quiet"])
    assert result.exit_code == 0, result.output
    log = read_log(_rows(in_tmp / "out")[0]["run_dir"])
    assert [e["test_acc"] is None for e in log] == [True, False]
    line = _assert_one_line_error(_invoke(["search", "--selections", selection_file, "--param",
                                           "lr=0.02,0.1", "--pruner", "median",
                                           "--eval-every", "0"]), 2)
    assert "--eval-every >= 1" in line


def test_a_grid_point_left_untrained_is_queued(selection_file, tmp_path, monkeypatch):
    """A grid point whose only trial was skipped (here: forced surplus) is one Optuna's grid
    sampler counts as visited; the worker queues it explicitly instead of re-running a point."""
    from subsetsel.search.trials import Objective as TrialObjective

    real = TrialObjective._skip_reason
    calls = []

    def skip_first(self, trial, params):
        calls.append(params)
        return ("forced", None) if len(calls) == 1 else real(self, trial, params)

    monkeypatch.setattr(TrialObjective, "_skip_reason", skip_first)
    settings = _settings(tmp_path, selection_file, sampler="grid",
                         space=parse_space(["lr=0.02,0.1"]))
    work(settings)
    trials = sorted(_study(tmp_path, "s").trials, key=lambda t: t.number)
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE,
                                         TrialState.COMPLETE]
    assert trials[0].user_attrs["surplus"] == "forced"
    assert trials[2].params == trials[0].params and "fixed_params" in trials[2].system_attrs
    assert {t.params["lr"] for t in trials[1:]} == {0.02, 0.1}


def test_eval_every_and_device_are_not_part_of_the_study(selection_file, tmp_path):
    """They do not change what a trial learns: a study made with other values (or by a version
    that stored eval_every) is joined."""
    import dataclasses

    settings = _settings(tmp_path, selection_file)
    study = open_study(settings)
    stored = study.user_attrs["subsetsel_search"]
    assert "eval_every" not in stored["base"] and "device" not in stored["base"]
    older = {**stored, "base": {**stored["base"], "eval_every": 1}}
    study.set_user_attr("subsetsel_search", older)
    base = dataclasses.replace(settings.base, eval_every=0, device="cpu")
    open_study(dataclasses.replace(settings, base=base))  # not refused
