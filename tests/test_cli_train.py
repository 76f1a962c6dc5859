"""`subsetsel train` and `subsetsel list` through click's CliRunner."""

from __future__ import annotations

import json

import h5py
import pytest
from click.testing import CliRunner

from subsetsel.cli import main
from subsetsel.store import SelectionStore
from subsetsel.train import read_log

SMALL = ["--train-size", "600", "--test-size", "200", "--epochs", "2", "--quiet"]


def _invoke(args):
    return CliRunner().invoke(main, args)


def _assert_one_line_error(result, code):
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error")], result.output


def test_list_shows_every_registry():
    result = _invoke(["list", "--json"])
    assert result.exit_code == 0, result.output
    names = json.loads(result.output)
    assert "mnist1d" in names["datasets"] and "randompb" in names["strategies"]
    assert "sgd" in names["optimizers"] and "cosine" in names["schedules"]
    assert "plain" in names["policies"] and names["models"]
    text = _invoke(["list"]).output
    assert "strategies:" in text and "mnist1d" in text


def test_train_randompb_writes_a_readable_selection_file(in_tmp):
    result = _invoke(
        ["train", *SMALL, "--strategy", "randompb", "--fraction", "0.1", "--select-every", "1",
         "--out", "runs/pb", "--save-selections", "selections/x.h5"]
    )
    assert result.exit_code == 0, result.output
    assert "final test accuracy" in result.output
    store = SelectionStore.open(in_tmp / "selections" / "x.h5")
    assert [r.epoch for r in store.rounds] == [0, 1]
    assert all(r.batch_ids is not None for r in store.rounds)
    with h5py.File(in_tmp / "selections" / "x.h5", "r") as f:
        assert f.attrs["strategy"] == "randompb"
        assert len(f["rounds"]) == 2
    assert len(read_log(in_tmp / "runs" / "pb")) == 2
    inspected = _invoke(["inspect", "selections/x.h5"])
    assert inspected.exit_code == 0, inspected.output
    assert "randompb" in inspected.output


def test_train_json_summary_and_default_selection_path(in_tmp):
    result = _invoke(["train", *SMALL, "--strategy", "random", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["epochs"] == 2 and 0 <= summary["final_acc"] <= 1
    saved = list((in_tmp / "selections").glob("random-mnist1d-*.h5"))
    assert len(saved) == 1


def test_full_strategy_saves_no_selection_file(in_tmp):
    result = _invoke(["train", *SMALL, "--strategy", "full", "--out", "runs/full"])
    assert result.exit_code == 0, result.output
    assert not (in_tmp / "selections").exists()


def test_existing_run_directory_is_not_overwritten(in_tmp):
    assert _invoke(["train", *SMALL, "--strategy", "full", "--out", "runs/a"]).exit_code == 0
    result = _invoke(["train", *SMALL, "--strategy", "full", "--out", "runs/a"])
    _assert_one_line_error(result, 2)
    assert "--resume" in result.output


def test_resume_finishes_an_interrupted_run(in_tmp, monkeypatch):
    from subsetsel.engine.loop import Engine

    original = Engine.run_period

    def crash_at_epoch_1(self):
        if self.period == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Engine, "run_period", crash_at_epoch_1)
    args = ["train", *SMALL, "--strategy", "random", "--select-every", "1", "--out", "runs/r",
            "--save-selections", "r"]
    assert _invoke(args).exit_code != 0
    assert [r["epoch"] for r in read_log(in_tmp / "runs/r")] == [0]
    assert len(SelectionStore.open(in_tmp / "selections/r.h5").rounds) == 1
    monkeypatch.setattr(Engine, "run_period", original)
    result = _invoke(["train", "--resume", "runs/r", "--quiet"])
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in read_log(in_tmp / "runs/r")] == [0, 1]
    assert [r.epoch for r in SelectionStore.open(in_tmp / "selections/r.h5").rounds] == [0, 1]


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--dataset", "nope"], 2, "valid"),
        (["--model", "nope"], 2, "valid"),
        (["--strategy", "nope"], 2, "valid"),
        (["--optimizer", "nope"], 2, "valid"),
        (["--schedule", "nope"], 2, "valid"),
        (["--fraction", "0"], 2, "fraction"),
        (["--fraction", "1.5"], 2, "fraction"),
        (["--batch-size", "0"], 2, "batch"),
        (["--epochs", "0"], 2, "epochs"),
        (["--dataset", "cifar10", "--data-root", "no/such/dir"], 1, "cifar"),
        (["--dataset", "npz:no/such.npz"], 1, "no/such.npz"),
        (["--save-selections", "selections/bad.h5"], 1, "exists"),
    ],
)
def test_bad_input_gives_one_line_errors(in_tmp, args, code, needle):
    (in_tmp / "selections").mkdir()
    (in_tmp / "selections" / "bad.h5").write_text("not hdf5")
    result = _invoke(["train", *SMALL, "--strategy", "random", *args])
    _assert_one_line_error(result, code)
    assert needle in result.output
    assert (in_tmp / "selections" / "bad.h5").read_text() == "not hdf5"  # never clobbered


def test_resume_of_a_folder_that_is_not_a_run(in_tmp):
    (in_tmp / "empty").mkdir()
    _assert_one_line_error(_invoke(["train", "--resume", "empty"]), 1)


def test_select_saves_selections_and_evaluates_once(in_tmp):
    result = _invoke(["select", *SMALL, "--strategy", "random", "--select-every", "1",
                      "--out", "runs/s", "--save-selections", "s"])
    assert result.exit_code == 0, result.output
    log = read_log(in_tmp / "runs/s")
    assert [r["test_acc"] is None for r in log] == [True, False]
    assert [r.epoch for r in SelectionStore.open(in_tmp / "selections/s.h5").rounds] == [0, 1]
    report = _invoke(["report", "runs/s", "--target", "0.05", "--reference", "runs/s", "--json"])
    assert report.exit_code == 0, report.output


def test_select_refuses_full_and_replay(in_tmp):
    _assert_one_line_error(_invoke(["select", *SMALL, "--strategy", "full"]), 2)


def test_threads_option_sets_torch_threads(in_tmp):
    import torch

    before = torch.get_num_threads()
    try:
        result = _invoke(["train", *SMALL, "--strategy", "full", "--threads", "3", "--out", "t"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 3
        _assert_one_line_error(_invoke(["train", "--threads", "-1"]), 2)
    finally:
        torch.set_num_threads(before)


def test_failed_first_selection_leaves_no_empty_selection_file(in_tmp, monkeypatch):
    from subsetsel.selection.random import Random

    def fail(self, ctx):
        raise MemoryError("cannot fit")

    monkeypatch.setattr(Random, "select", fail)
    result = _invoke(["train", *SMALL, "--strategy", "random", "--save-selections", "oom"])
    _assert_one_line_error(result, 1)
    assert not (in_tmp / "selections" / "oom.h5").exists()


def test_replaying_a_file_without_rounds_is_a_one_line_error(in_tmp):
    from subsetsel.store import SelectionMetadata

    meta = SelectionMetadata(dataset="mnist1d", dataset_size=600, fingerprint="x", num_classes=10,
                             strategy="random", strategy_params={}, model="mlp", seed=0,
                             epochs=2, config={})
    SelectionStore.create(in_tmp / "empty.h5", meta)
    result = _invoke(["train", *SMALL, "--replay", "empty.h5"])
    _assert_one_line_error(result, 1)
    assert "nothing to replay" in result.output


@pytest.mark.parametrize("config_text", ["{not json", '{"other": 1}', '{"config": {"x": 1}}'])
def test_resume_of_a_broken_config_is_a_one_line_error(in_tmp, config_text):
    (in_tmp / "broken").mkdir()
    (in_tmp / "broken" / "config.json").write_text(config_text)
    result = _invoke(["train", "--resume", "broken"])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    assert "not a subsetsel train config" in result.output


def test_unknown_device_is_a_one_line_error(in_tmp):
    _assert_one_line_error(_invoke(["train", *SMALL, "--device", "foo"]), 2)


@pytest.mark.parametrize(("strategy", "option"), [("random", ["--lam", "3"]),
                                                  ("gradmatchpb", ["--per-gradient"])])
def test_strategy_option_that_does_not_apply_is_refused(in_tmp, strategy, option):
    result = _invoke(["train", *SMALL, "--strategy", strategy, *option])
    _assert_one_line_error(result, 2)
    assert "does not apply" in result.output
