"""Cached selections: replaying a selection file instead of selecting."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from subsetsel.cli import main
from subsetsel.run import run
from subsetsel.store import IncompatibleSelectionError, SelectionStore
from subsetsel.train import TrainConfig, Trainer, read_log


def _config(**overrides) -> TrainConfig:
    base = dict(
        dataset="mnist1d", train_size=600, test_size=200, model="mlp", strategy="random",
        fraction=0.2, select_every=2, epochs=6, batch_size=64, device="cpu",
    )
    base.update(overrides)
    return TrainConfig(**base)


class _Recorder:
    """Epoch callback that keeps the subset the trainer used each epoch."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.subsets: list[torch.Tensor] = []

    def __call__(self, record) -> None:
        assert self.trainer is not None
        self.subsets.append(self.trainer.selection.indices.clone())


def _fit(config: TrainConfig, out_dir) -> tuple[list[torch.Tensor], list[dict]]:
    recorder = _Recorder()
    trainer = Trainer(config, out_dir=out_dir, callbacks=[recorder])
    recorder.trainer = trainer
    trainer.fit()
    return recorder.subsets, read_log(out_dir)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("replay")
    path = folder / "sel.h5"
    subsets, log = _fit(_config(save_selections=str(path)), folder / "original")
    return path, subsets, log


def test_replay_trains_on_exactly_the_stored_subsets(saved, tmp_path):
    path, subsets, _ = saved
    replayed, log = _fit(
        _config(replay=str(path), optimizer="adam", lr=1e-3, model="cnn1d", seed=5), tmp_path
    )
    assert len(replayed) == len(subsets)
    for a, b in zip(subsets, replayed, strict=True):
        assert torch.equal(a, b)
    assert all(r["select_seconds"] < 0.01 for r in log)  # reading a stored round: ~microseconds
    assert [r["replay_round"] for r in log] == [0, 0, 1, 1, 2, 2]
    assert all(r["replay_file"] == str(path) for r in log)


def test_replay_maps_rounds_by_relative_progress(saved, tmp_path):
    path, subsets, _ = saved
    replayed, log = _fit(_config(replay=str(path), epochs=12), tmp_path / "long")
    assert [r["replay_round"] for r in log] == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(replayed[11], subsets[5])
    _, short = _fit(_config(replay=str(path), epochs=3), tmp_path / "short")
    assert [r["replay_round"] for r in short] == [0, 1, 2]


def test_replay_refuses_a_file_from_other_data(saved):
    path, _, _ = saved
    with pytest.raises(IncompatibleSelectionError, match="600.*500|500.*600"):
        Trainer(_config(replay=str(path), train_size=500))
    with pytest.raises(IncompatibleSelectionError, match="fingerprint"):
        Trainer(_config(replay=str(path), data_seed=1))  # same size, other generated data


def test_run_with_replay_writes_no_selection_file(saved, tmp_path):
    path, _, _ = saved
    summary = run(_config(replay=str(path)), tmp_path / "r")
    assert summary["select_seconds"] < 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def _cli(args):
    return CliRunner().invoke(main, ["train", "--quiet", "--train-size", "600", "--test-size",
                                     "200", "--epochs", "2", *args])


def test_cli_replay_happy_path_and_errors(saved, in_tmp):
    path, _, _ = saved
    ok = _cli(["--replay", str(path), "--optimizer", "rmsprop", "--lr", "0.001", "--out", "r"])
    assert ok.exit_code == 0, ok.output
    assert read_log(in_tmp / "r")[0]["replay_file"] == str(path)
    before = path.read_bytes()
    for args, needle in [
        (["--replay", str(path), "--train-size", "500"], "500"),
        (["--replay", "missing.h5"], "missing"),
    ]:
        result = _cli(args)
        assert result.exit_code == 1, result.output
        assert needle in result.output and "Traceback" not in result.output
    (in_tmp / "corrupt.h5").write_bytes(before[: len(before) // 2])
    result = _cli(["--replay", "corrupt.h5"])
    assert result.exit_code == 1 and "corrupt.h5" in result.output
    assert path.read_bytes() == before  # replay opens read-only


def test_cli_future_format_version_is_a_one_line_error(saved, in_tmp):
    import shutil

    import h5py

    path, _, _ = saved
    future = in_tmp / "future.h5"
    shutil.copy(path, future)
    with h5py.File(future, "r+") as f:
        f.attrs["format_version"] = 3
    for args in (["train", "--quiet", "--train-size", "600", "--test-size", "200",
                  "--replay", str(future)], ["inspect", str(future)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "newer subsetsel" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_cli_replay_epochs_default_to_the_files(in_tmp):
    made = _cli_base(["--strategy", "random", "--epochs", "6", "--warm-start", "0.5",
                      "--out", "src", "--save-selections", "warm"])
    assert made.exit_code == 0, made.output
    stored = SelectionStore.open(in_tmp / "selections" / "warm.h5")
    replay = _cli_base(["--replay", "warm", "--out", "rep"])
    assert replay.exit_code == 0, replay.output
    assert len(read_log(in_tmp / "rep")) == stored.metadata.epochs  # not the default 20
    longer = _cli_base(["--replay", "warm", "--epochs", "8", "--out", "rep8"])
    assert longer.exit_code == 0 and len(read_log(in_tmp / "rep8")) == 8


def _cli_base(args):
    return CliRunner().invoke(main, ["train", "--quiet", "--train-size", "600", "--test-size",
                                     "200", "--model", "mlp", *args])
