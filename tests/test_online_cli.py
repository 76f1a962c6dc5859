"""Every online policy end to end on MNIST-1D through `subsetsel train`, checking the log's
counters (forwarded, backpropagated, fresh, steps) against what each policy must do."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from subsetsel.cli import main
from subsetsel.train import read_log


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train far faster on one thread than on two busy cores; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = ["train", "--train-size", "600", "--test-size", "200", "--epochs", "2", "--quiet",
         "--strategy", "full", "--fraction", "1"]
# 600 examples in batches of 128: four of 128 and one of 88


def train(*args: str) -> list[dict]:
    result = CliRunner().invoke(main, [*SMALL, *args, "--out", "runs/x"])
    assert result.exit_code == 0, result.output
    log = read_log("runs/x")
    assert len(log) == 2
    for record in log:
        assert record["train_seconds"] > 0 and record["elapsed_seconds"] > 0
    assert log[1]["total_forwarded"] == log[0]["forwarded"] + log[1]["forwarded"]
    assert log[1]["total_fresh"] == log[0]["fresh"] + log[1]["fresh"]
    return log


def plain_epoch(record: dict, n: int = 600) -> None:
    assert record["forwarded"] == record["backpropagated"] == record["fresh"] == n
    assert record["steps"] == -(-n // 128)


def test_sb_scores_everything_and_backpropagates_full_batches_of_the_selected(in_tmp):
    log = train("--policy", "sb", "--beta", "2", "--history", "256")
    plain_epoch(log[0])
    e = log[1]
    assert e["fresh"] == 600 and 0 < e["backpropagated"] < e["forwarded"]
    assert e["forwarded"] == 600 + e["backpropagated"]  # selection forward + backward batches
    assert e["steps"] == -(-e["backpropagated"] // 128)
    assert e["backpropagated"] == round(e["sb_selected_fraction"] * 600)


def test_stale_sb_reuses_cached_losses_without_forwards(in_tmp):
    log = train("--policy", "stale-sb", "--staleness", "2")
    plain_epoch(log[0])
    e = log[1]
    assert e["sb_reused_fraction"] == 1.0
    assert e["forwarded"] == e["backpropagated"] < 600  # no selection forward at all


def test_sb_keep_always_active(in_tmp):
    log = train("--policy", "sb-keep", "--keep", "0.5", "--keep-start", "0", "--keep-end", "1",
                "--interrupt", "0")
    for e in log:
        assert e["keep_active_fraction"] == 1.0 and e["steps"] == 5
        assert e["backpropagated"] == 4 * 64 + 44
        assert e["forwarded"] == 600 + e["backpropagated"]


def test_sb_keep_default_window(in_tmp):
    log = train("--policy", "sb-keep")
    plain_epoch(log[0])  # progress < 0.5
    e = log[1]  # progress 0.5 .. 0.9: batches 0 and 2 select, 1 and 3 interrupt, 4 is at 0.9
    assert e["keep_active_fraction"] == pytest.approx(0.4)
    assert e["backpropagated"] == 64 + 64 + 128 + 128 + 88
    assert e["forwarded"] == e["backpropagated"] + 2 * 128


@pytest.mark.parametrize(("flag", "steps"), [("--accumulate", 2), ("--no-accumulate", 5)])
def test_random_keep_baseline(in_tmp, flag, steps):
    log = train("--policy", "random-keep", "--keep", "0.25", flag)
    plain_epoch(log[0])
    e = log[1]
    assert e["forwarded"] == e["backpropagated"] == 4 * 32 + 22 and e["steps"] == steps


def test_is_always_on_counts_presample_reads_and_forwards(in_tmp):
    log = train("--policy", "is", "--presample", "3", "--tau-th", "0")
    for e in log:
        assert e["is_on_fraction"] == 1.0 and e["steps"] == 5 and e["backpropagated"] == 600
        assert e["fresh"] == 5 * 384  # B = 3 * 128 per step
        assert e["forwarded"] == 5 * 384 + 600


def test_is_default_switch_and_gradnorm_score(in_tmp):
    log = train("--policy", "is", "--score", "gradnorm")
    for e in log:
        on = e["is_on_fraction"]
        assert 0.0 <= on <= 1.0 and e["is_tau"] >= 1.0 and e["backpropagated"] == 600
        assert e["forwarded"] == 600 + 384 * round(on * 5)  # a scored presample per on-step
        assert e["fresh"] >= 600 and (e["fresh"] > 600) == (on > 0)
    assert log[0]["is_on_fraction"] < 1.0  # the first step is always off


def test_is_uniform_reads_presamples_without_scoring(in_tmp):
    log = train("--policy", "is-uniform")
    for e in log:
        assert e["forwarded"] == e["backpropagated"] == 600 and e["fresh"] == 5 * 384


@pytest.mark.parametrize("mode", ["example-before-aug", "example-after-aug"])
def test_echo_trains_twice_per_fresh_example(in_tmp, mode):
    log = train("--policy", "echo", "--echo", "2", "--echo-mode", mode, "--shuffle-buffer", "256")
    for e in log:
        assert e["fresh"] == 600 and e["forwarded"] == e["backpropagated"] == 1200
        assert e["steps"] == 10 and e["echoed_per_fresh"] == 2.0


def test_fractional_batch_echo_implied_by_echo_flag_with_slow_input(in_tmp):
    log = train("--echo", "1.5", "--echo-mode", "batch", "--slow-input", "0.002")
    config = json.loads((in_tmp / "runs" / "x" / "config.json").read_text())
    assert config["config"]["policy"] == "echo" and config["config"]["slow_input"] == 0.002
    for e in log:
        assert e["fresh"] == 600 and 5 <= e["steps"] <= 10
        # each batch is repeated 1 or 2 times: the forwarded total is a sum of batch sizes
        assert e["forwarded"] in {600 + 128 * k + 88 * j for k in range(5) for j in range(2)}
        assert e["echoed_per_fresh"] == e["forwarded"] / 600


def test_policy_composes_with_a_subset_strategy(in_tmp):
    log = train("--strategy", "random", "--fraction", "0.5", "--policy", "sb")
    plain_epoch(log[0], n=300)
    e = log[1]
    assert e["subset_size"] == 300 and e["fresh"] == 300
    assert e["forwarded"] == 300 + e["backpropagated"] and e["backpropagated"] < 300


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "sb", "--keep", "0.3"], "--keep does not apply to --policy sb"),
        (["--policy", "sb", "--echo", "2"], "--echo does not apply to --policy sb"),
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--policy", "sb", "--beta", "-1"], "--beta must be >= 0"),
        (["--echo", "0.5"], "--echo must be >= 1"),
        (["--policy", "is", "--presample", "1"], "--presample must be > 1"),
        (["--slow-input", "-1"], "--slow-input must be >= 0"),
    ],
)
def test_bad_policy_options_are_one_line_usage_errors(in_tmp, args, message):
    result = CliRunner().invoke(main, [*SMALL, *args, "--out", "runs/bad"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and message in result.output
    assert sum(line.startswith("Error") for line in result.output.splitlines()) == 1


def test_list_shows_the_policies():
    result = CliRunner().invoke(main, ["list", "--json"])
    assert result.exit_code == 0
    policies = json.loads(result.output)["policies"]
    for name in ("plain", "sb", "stale-sb", "sb-keep", "random-keep", "is", "is-uniform", "echo"):
        assert name in policies


class Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    ("policy", "params"),
    [("stale-sb", {}), ("is", {"tau_th": 1.0}), ("echo", {"echo": 1.5})],
)
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(in_tmp, small_mnist1d, policy,
                                                                   params):
    from subsetsel.train import TrainConfig, Trainer

    def config() -> TrainConfig:
        return TrainConfig(strategy="full", fraction=1.0, epochs=3, device="cpu", policy=policy,
                           policy_params=dict(params))

    straight = Trainer(config(), dataset=small_mnist1d, out_dir="runs/straight")
    straight.fit()

    def stop_after_first(record: dict) -> None:
        if record["epoch"] == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        Trainer(config(), dataset=small_mnist1d, out_dir="runs/cut",
                callbacks=[stop_after_first]).fit()
    resumed = Trainer(config(), dataset=small_mnist1d, out_dir="runs/cut", resume=True)
    assert resumed.engine.period == 1
    resumed.fit()
    keys = ("test_acc", "test_loss", "forwarded", "backpropagated", "fresh", "steps")
    for a, b in zip(read_log("runs/straight"), read_log("runs/cut"), strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_keep_scale_on_signals_fails_before_training(in_tmp):
    result = CliRunner().invoke(main, [*SMALL, "--policy", "sb-keep", "--keep-scale", "0.5",
                                       "--out", "ks"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "keep-scale" in result.output
    assert not (in_tmp / "ks" / "log.jsonl").exists()  # refused at epoch 0, not mid-run
