"""Hostile input and failures: non-finite numbers and divergence, run-folder collisions, killed
runs' selection files, resume safety, and the smaller one-line refusals."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from subsetsel.cli import main
from subsetsel.engine.files import RunDirError, claim
from subsetsel.report import strict_json
from subsetsel.store import SelectionStore

SMALL = ["--train-size", "600", "--test-size", "200", "--quiet"]


def invoke(args: list[str]):
    return CliRunner().invoke(main, args)


def one_line_error(result, code: int, needle: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert needle in result.output, result.output


# ---- non-finite numbers ------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "option"), [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--momentum", "nan"], "--momentum"),
    (["--weight-decay", "-inf"], "--weight-decay"), (["--fraction", "nan"], "--fraction"),
    (["--warm-start", "nan"], "--warm-start"), (["--slow-input", "inf"], "--slow-input"),
    (["--policy", "sb", "--beta", "nan"], "--beta"), (["--echo", "nan"], "--echo"),
    (["--lam", "inf"], "--lam"), (["--seed", "1e20"], "--seed"),
])
def test_non_finite_options_are_refused_naming_the_option(in_tmp, args, option):
    one_line_error(invoke(["train", *SMALL, *args]), 2, option)
    assert not (in_tmp / "runs").exists() or not any((in_tmp / "runs").rglob("log.jsonl"))


@pytest.mark.parametrize(("args", "option"), [
    (["--alpha", "nan"], "--alpha"), (["--storage", "inf"], "--storage"),
    (["--lr", "nan"], "--lr"),
])
def test_onepass_refuses_non_finite_options(in_tmp, args, option):
    one_line_error(invoke(["onepass", *SMALL, *args]), 2, option)


def test_python_api_refuses_non_finite_config_values():
    from subsetsel.train import TrainConfig

    with pytest.raises(ValueError, match="--lr must be a finite number"):
        TrainConfig(lr=float("nan")).validate()
    with pytest.raises(ValueError, match="--beta must be a finite number"):
        TrainConfig(policy="sb", policy_params={"beta": float("inf")}).validate()
    with pytest.raises(ValueError, match="64 bits"):
        TrainConfig(seed=10**30).validate()


def test_a_diverging_run_stops_with_one_line_and_keeps_only_finite_rounds(in_tmp):
    result = invoke(["train", *SMALL, "--epochs", "4", "--select-every", "1", "--lr", "1e4",
                     "--save-selections", "div", "--out", "d"])
    one_line_error(result, 1, "not finite")
    assert "epoch" in result.output
    records = [strict_json(line) for line in (in_tmp / "d" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(len(records)))
    store = SelectionStore.open(in_tmp / "selections" / "div.h5")
    assert not store.complete and len(store.rounds) <= len(records) + 1
    assert all(r.epoch < 4 for r in store.rounds)


def test_a_non_finite_training_loss_stops_at_its_step(small_mnist1d):
    from subsetsel.errors import DivergenceError
    from subsetsel.train import TrainConfig, Trainer

    config = TrainConfig(strategy="full", epochs=3, lr=1e30, momentum=0.0, weight_decay=0.0,
                         model="mlp", batch_size=16, device="cpu", optimizer="sgd")
    trainer = Trainer(config, dataset=small_mnist1d)
    with pytest.raises(DivergenceError, match=r"non-finite loss at epoch \d+, step \d+"):
        trainer.fit()


def test_logs_are_strict_json_even_for_non_finite_values(tmp_path):
    from subsetsel.engine.files import RunFiles

    files = RunFiles(tmp_path)
    files.append_log({"epoch": 0, "train_loss": float("nan"), "test_loss": float("inf"),
                      "nested": [float("-inf"), 1.0]})
    line = (tmp_path / "log.jsonl").read_text().strip()
    assert strict_json(line) == {"epoch": 0, "train_loss": None, "test_loss": None,
                                 "nested": [None, 1.0]}


# ---- run folders -------------------------------------------------------------------------------
def test_concurrent_claims_never_share_a_folder(tmp_path):
    claimed: list[Path] = []
    barrier = threading.Barrier(4)

    def take() -> None:
        barrier.wait()
        claimed.append(claim(tmp_path / "run", unique=True))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(claimed)) == 4
    with pytest.raises(RunDirError, match="already holds a run"):
        claim(tmp_path / "run")


def test_two_runs_with_the_same_default_name_get_two_folders(in_tmp, monkeypatch):
    import subsetsel.run

    monkeypatch.setattr(subsetsel.run, "default_run_name", lambda config: "same-second")
    for lr in ("0.05", "0.2"):
        result = invoke(["train", *SMALL, "--epochs", "2", "--strategy", "random", "--lr", lr])
        assert result.exit_code == 0, result.output
    for name, lr in (("same-second", 0.05), ("same-second-1", 0.2)):
        config = json.loads((in_tmp / "runs" / name / "config.json").read_text())
        assert config["config"]["lr"] == lr
        assert [json.loads(x)["epoch"] for x in
                (in_tmp / "runs" / name / "log.jsonl").read_text().splitlines()] == [0, 1]
    assert (in_tmp / "selections" / "same-second-1.h5").exists()
    again = invoke(["train", *SMALL, "--epochs", "2", "--out", "runs/same-second"])
    one_line_error(again, 2, "already holds a run")


# ---- killed runs and resume --------------------------------------------------------------------
def interrupted(args: list[str], epoch: int) -> None:
    """Run `args`, killed (KeyboardInterrupt) when epoch `epoch` starts."""
    from subsetsel.engine.loop import Engine

    original = Engine.run_period

    def crash(self):
        if self.period == epoch:
            raise KeyboardInterrupt
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "run_period", crash)
        assert invoke(args).exit_code != 0


def test_a_killed_runs_file_is_incomplete_and_replays_only_when_allowed(in_tmp):
    interrupted(["train", *SMALL, "--epochs", "10", "--select-every", "1", "--strategy",
                 "random", "--save-selections", "cut", "--out", "run"], 3)
    shown = invoke(["inspect", "cut"])
    assert shown.exit_code == 0 and "incomplete: rounds up to epoch 2 of 10" in shown.output
    refused = invoke(["train", *SMALL, "--replay", "cut"])
    one_line_error(refused, 1, "--allow-incomplete")
    allowed = invoke(["train", *SMALL, "--replay", "cut", "--allow-incomplete", "--epochs", "6",
                      "--out", "rep"])
    assert allowed.exit_code == 0, allowed.output
    log = [json.loads(x) for x in (in_tmp / "rep" / "log.jsonl").read_text().splitlines()]
    assert [r["replay_round"] for r in log] == [0, 0, 1, 1, 2, 2]  # 3 covered epochs over 6


@pytest.mark.parametrize("change", ["delete", "swap"])
def test_resume_refuses_a_missing_or_different_selection_file(in_tmp, change):
    interrupted(["train", *SMALL, "--epochs", "4", "--select-every", "1", "--strategy",
                 "random", "--save-selections", "r", "--out", "r"], 2)
    path = in_tmp / "selections" / "r.h5"
    path.unlink()
    if change == "swap":
        made = invoke(["train", *SMALL, "--epochs", "4", "--select-every", "1", "--strategy",
                       "random", "--save-selections", "r", "--out", "other"])
        assert made.exit_code == 0
    result = invoke(["train", "--resume", "r", "--quiet"])
    one_line_error(result, 1, "deleted" if change == "delete" else "not the file")
    if change == "swap":
        assert len(SelectionStore.open(path).rounds) == 4  # the other run's file is untouched


def test_resume_after_a_kill_finishes_like_an_uninterrupted_run(in_tmp):
    base = ["train", *SMALL, "--epochs", "4", "--select-every", "1", "--strategy", "random"]
    assert invoke([*base, "--save-selections", "a", "--out", "a"]).exit_code == 0
    interrupted([*base, "--save-selections", "b", "--out", "b"], 2)
    assert invoke(["train", "--resume", "b", "--quiet"]).exit_code == 0
    logs = [[json.loads(x) for x in (in_tmp / d / "log.jsonl").read_text().splitlines()]
            for d in ("a", "b")]
    assert [r["test_acc"] for r in logs[0]] == [r["test_acc"] for r in logs[1]]
    a, b = (SelectionStore.open(in_tmp / "selections" / f"{n}.h5") for n in "ab")
    assert a.complete and b.complete
    assert [r.indices.tolist() for r in a.rounds] == [r.indices.tolist() for r in b.rounds]


# ---- smaller refusals --------------------------------------------------------------------------
def test_replay_refuses_strategy_options_and_records_the_source_schedule(in_tmp):
    assert invoke(["train", *SMALL, "--epochs", "3", "--select-every", "1", "--strategy",
                   "random", "--save-selections", "src", "--out", "src"]).exit_code == 0
    for extra in (["--strategy", "gradmatch"], ["--fraction", "0.3"], ["--lam", "0.1"]):
        one_line_error(invoke(["train", *SMALL, "--replay", "src", *extra]), 2,
                       "does not apply to --replay")
    again = invoke(["train", *SMALL, "--replay", "src", "--save-selections", "copy",
                    "--out", "copy"])
    assert again.exit_code == 0, again.output
    copy = SelectionStore.open(in_tmp / "selections" / "copy.h5")
    assert copy.metadata.strategy == "random"
    assert copy.metadata.strategy_params["select_every"] == 1
    assert copy.metadata.strategy_params["replayed_from"].endswith("src.h5")


@pytest.mark.parametrize("strategy", ["gradmatchpb", "randompb"])
def test_per_batch_strategies_refuse_a_batch_that_holds_the_whole_subset(in_tmp, strategy):
    result = invoke(["train", *SMALL, "--strategy", strategy, "--batch-size", "600",
                     "--out", "pb"])
    one_line_error(result, 2, "full data")
    assert not list((in_tmp / "selections").glob("*.h5")) if (in_tmp / "selections").exists() \
        else True


def test_an_empty_validation_folder_is_refused(in_tmp):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from make_image_folder import make_image_folder

    make_image_folder(in_tmp / "f", size=8, limit=20)
    for image in (in_tmp / "f" / "val").rglob("*.png"):
        image.unlink()
    result = invoke(["train", "--dataset", f"folder:{in_tmp / 'f'}", "--quiet", "--workers",
                     "0", "--strategy", "full", "--epochs", "1"])
    one_line_error(result, 1, "no images")


def test_sync_bn_without_cuda_is_refused_before_any_process_starts(in_tmp):
    from click.testing import CliRunner

    from subsetsel.cli import main

    result = CliRunner().invoke(main, ["train", "--nproc", "2", "--sync-bn", "--device", "cpu",
                                       "--quiet"])
    assert result.exit_code == 2
    assert "--sync-bn needs CUDA" in result.output and "Traceback" not in result.output
    assert not (in_tmp / "runs").exists()
