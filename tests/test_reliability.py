"""Hostile input and failures: non-finite numbers and divergence, run-folder collisions, killed
runs' selection files, resume safety, and the smaller one-line refusals."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
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


# ---- found by scripts/fuzz_inputs.py -----------------------------------------------------------
def _npz(path: Path, **changes) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(60, 8)).astype(np.float32), "y": np.arange(60) % 3,
              "x_test": rng.normal(size=(20, 8)).astype(np.float32), "y_test": np.arange(20) % 3}
    arrays.update(changes)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


@pytest.mark.parametrize(("change", "needle"), [
    ({"y": -(np.arange(60) % 3)}, "labels must be >= 0"),
    ({"y": np.arange(60) % 3 + 0.5}, "whole numbers"),
    ({"y": np.arange(59) % 3}, "60 inputs but 59 labels"),
    ({"x": np.zeros(60, "float32")}, "must be (N, D)"),
    ({"x_test": np.zeros((20, 9), "float32")}, "per example but x_test"),
    ({"y_test": None}, "lacks array(s) y_test"),
])
def test_a_broken_npz_is_a_data_error_exit_1(in_tmp, change, needle):
    _npz(in_tmp / "d.npz", **change)
    result = invoke(["train", "--dataset", "npz:d.npz", "--epochs", "1", "--quiet"])
    one_line_error(result, 1, needle)


@pytest.mark.parametrize("content", [b"", b"not a zip archive\n" * 10])
def test_an_unreadable_npz_is_a_data_error_exit_1(in_tmp, content):
    (in_tmp / "d.npz").write_bytes(content)
    result = invoke(["train", "--dataset", "npz:d.npz", "--epochs", "1", "--quiet"])
    one_line_error(result, 1, "not a readable .npz file")


def _claimed_folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("config.json"))


@pytest.mark.parametrize("args", [
    ["--replay", "selections/nope.h5", "--out", "r"],
    ["--dataset", "npz:none.npz", "--out", "r"],
    ["--dataset", "npz:none.npz"],
])
def test_a_run_refused_before_it_starts_leaves_no_claimed_folder(in_tmp, args):
    result = invoke(["train", *SMALL, "--epochs", "1", *args])
    one_line_error(result, 1, "no")
    assert _claimed_folders(in_tmp) == []
    if "--out" in args:  # the same --out is free for the corrected run
        again = invoke(["train", *SMALL, "--epochs", "1", "--strategy", "random", "--out", "r"])
        assert again.exit_code == 0, again.output


@pytest.mark.parametrize("command", ["train", "onepass"])
def test_a_refused_run_keeps_the_empty_out_folder_the_user_made(in_tmp, command):
    (in_tmp / "mine").mkdir()
    result = invoke([command, *SMALL, "--dataset", "npz:none.npz", "--out", "mine"])
    one_line_error(result, 1, "npz file not found")
    assert (in_tmp / "mine").is_dir() and not any((in_tmp / "mine").iterdir())
    result = invoke([command, *SMALL, "--dataset", "npz:none.npz", "--out", "made"])
    assert result.exit_code == 1 and not (in_tmp / "made").exists()


def test_a_refused_save_path_leaves_no_claimed_folder(in_tmp):
    base = ["train", *SMALL, "--epochs", "1", "--strategy", "random", "--save-selections", "s"]
    assert invoke([*base, "--out", "a"]).exit_code == 0
    one_line_error(invoke([*base, "--out", "b"]), 1, "already exists")
    assert _claimed_folders(in_tmp) == [in_tmp / "a"]


def test_onepass_refused_before_it_starts_leaves_no_claimed_folder(in_tmp):
    result = invoke(["onepass", *SMALL, "--dataset", "npz:none.npz", "--out", "o"])
    one_line_error(result, 1, "npz file not found")
    assert _claimed_folders(in_tmp) == []


def _finished_run(in_tmp: Path) -> Path:
    result = invoke(["train", *SMALL, "--epochs", "2", "--strategy", "random", "--out", "r"])
    assert result.exit_code == 0, result.output
    (in_tmp / "r" / "summary.json").unlink()
    return in_tmp / "r"


def test_resume_of_a_truncated_config_is_exit_1_naming_it(in_tmp):
    config = _finished_run(in_tmp) / "config.json"
    config.write_text(config.read_text()[:100])
    one_line_error(invoke(["train", "--resume", "r", "--quiet"]), 1, "config.json")


def test_resume_of_a_truncated_checkpoint_is_exit_1_naming_it(in_tmp):
    checkpoint = _finished_run(in_tmp) / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:300])
    one_line_error(invoke(["train", "--resume", "r", "--quiet"]), 1, "checkpoint.pt")


@pytest.mark.parametrize("command", ["train", "onepass", "search"])
@pytest.mark.parametrize("value", [str(10**12), str(10**30)])
def test_a_huge_thread_count_is_refused_naming_the_option(in_tmp, command, value):
    one_line_error(invoke([command, "--threads", value]), 2, "--threads")


@pytest.mark.parametrize("option", ["--train-size", "--test-size"])
@pytest.mark.parametrize("value", [str(10**7), str(10**30)])
def test_an_mnist1d_size_beyond_the_generator_is_refused_at_once(in_tmp, option, value):
    result = invoke(["train", *SMALL, "--epochs", "1", option, value])
    one_line_error(result, 2, option)


@pytest.mark.parametrize("args", [
    ["--epochs"], ["--workers"], ["--select-every"], ["--batch-size"],
    ["--strategy", "gradmatch", "--check-every"], ["--policy", "echo", "--prefetch"],
])
def test_an_integer_beyond_64_bits_is_refused_naming_the_option(in_tmp, args):
    result = invoke(["train", *SMALL, "--epochs", "1", *args, str(10**30)])
    one_line_error(result, 2, args[-1])


def test_onepass_refuses_an_integer_beyond_64_bits(in_tmp):
    one_line_error(invoke(["onepass", *SMALL, "--replay-steps", str(10**30)]), 2, "--replay-steps")


@pytest.mark.parametrize("value", [str(2**32), "-1"])
def test_an_mnist1d_data_seed_numpy_cannot_take_is_refused_naming_it(in_tmp, value):
    one_line_error(invoke(["train", *SMALL, "--epochs", "1", "--data-seed", value]), 2,
                   "--data-seed")


def test_a_huge_loss_history_holds_only_what_was_pushed():
    import torch

    from subsetsel.online.selective_backprop import LossHistory

    losses = torch.arange(5000, dtype=torch.float32)
    for capacity in (7, 3000, 10**12):
        history = LossHistory(capacity)
        for chunk in losses.split(333):
            history.push(chunk)
        kept = sorted(history.values().tolist())
        assert kept == losses[-min(capacity, 5000):].tolist()
        assert history.buffer.numel() <= max(2 * 5000, 1024)


def test_selective_backprop_with_a_huge_history_trains(in_tmp):
    result = invoke(["train", *SMALL, "--epochs", "1", "--strategy", "full", "--policy", "sb",
                     "--history", str(10**12), "--out", "sb"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("option", "value"), [
    ("--heartbeat", str(10**12)), ("--workers", str(10**30)), ("--trials", str(10**30)),
    ("--epochs", str(10**30)), ("--batch-size", str(10**30)),
])
def test_search_refuses_huge_integers_naming_the_option(in_tmp, option, value):
    made = invoke(["train", *SMALL, "--epochs", "1", "--strategy", "random", "--save-selections",
                   "s", "--out", "s"])
    assert made.exit_code == 0, made.output
    result = invoke(["search", "--selections", "s", "--sampler", "random", "--trials", "1",
                     "--epochs", "1", "--quiet", option, value])
    one_line_error(result, 2, option)


@pytest.mark.parametrize("strategy", ["gradmatch", "gradmatchpb"])
def test_more_picks_per_step_than_the_budget_means_the_budget(in_tmp, strategy):
    result = invoke(["train", *SMALL, "--epochs", "1", "--strategy", strategy,
                     "--picks-per-step", str(10**12), "--out", "p"])
    assert result.exit_code == 0, result.output


def test_resume_removes_a_killed_writers_temporary_checkpoint(in_tmp):
    import subprocess

    interrupted(["train", *SMALL, "--epochs", "3", "--strategy", "random", "--out", "r"], 1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = in_tmp / "r" / f".checkpoint.pt.{dead.pid}.0badc0de.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert invoke(["train", "--resume", "r", "--quiet"]).exit_code == 0
    assert not stale.exists()


def test_search_names_data_workers_when_it_is_huge(in_tmp):
    result = invoke(["search", "--selections", "s", "--data-workers", str(10**30)])
    one_line_error(result, 2, "--data-workers")
