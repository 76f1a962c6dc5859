"""Grad-Match strategies: budgets, validation split, selection structure, CLI end to end."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from subsetsel import memory
from subsetsel.cli import main
from subsetsel.models import build_model
from subsetsel.selection.base import SelectionContext, budget, create_strategy, fixed_partition
from subsetsel.selection.gradients import last_layer_gradients
from subsetsel.selection.gradmatch import (
    GradMatch,
    GradMatchPB,
    auto_picks_per_step,
    class_budgets,
    validation_split,
)
from subsetsel.selection.random import Random, RandomPB
from subsetsel.store import SelectionStore
from subsetsel.train import read_log


@pytest.fixture(scope="module")
def ctx(small_mnist1d):
    torch.manual_seed(0)
    model = build_model("cnn1d", small_mnist1d.input_shape, small_mnist1d.num_classes)
    return SelectionContext(model=model, dataset=small_mnist1d, epoch=3, round_index=1,
                            batch_size=32, seed=0, device=torch.device("cpu"))


def test_class_budgets_sum_exactly_to_k():
    for counts, k in [([50, 30, 20], 10), ([7, 7, 7], 10), ([1, 0, 99], 5), ([3, 4], 7),
                      ([5, 5], 100)]:
        counts_t = torch.tensor(counts)
        got = class_budgets(k, counts_t)
        assert int(got.sum()) == min(k, sum(counts))
        assert (got <= counts_t).all()
        quota = counts_t.double() * min(k, sum(counts)) / sum(counts)
        assert ((got >= quota.floor()) & (got <= quota.ceil())).all()


def test_validation_split_is_stratified_seeded_and_disjoint():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 1 + [3] * 19)
    train, val = validation_split(y, 0.1, seed=4)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert len(train) + len(val) == 100
    assert torch.bincount(y[val], minlength=4).tolist() == [5, 3, 0, 2]
    again = validation_split(y, 0.1, seed=4)[1]
    assert torch.equal(val, again)
    assert not torch.equal(val, validation_split(y, 0.1, seed=5)[1])


def test_gradmatch_selection_has_the_budget_per_class(ctx):
    strategy = create_strategy("gradmatch", fraction=0.1, seed=0)
    assert strategy.lam == 0.5
    sel = strategy.select(ctx)
    y = ctx.dataset.y_train
    k = budget(0.1, len(ctx.dataset))
    assert len(sel) == k and len(set(sel.indices.tolist())) == k
    assert torch.equal(sel.indices, sel.indices.sort().values)
    assert (sel.weights > 0).all() and torch.isfinite(sel.weights).all()
    counts = torch.bincount(y, minlength=10)
    assert torch.equal(torch.bincount(y[sel.indices], minlength=10), class_budgets(k, counts))
    assert sel.batch_ids is None
    assert torch.equal(strategy.select(ctx).weights, sel.weights)  # deterministic


def test_gradmatch_matches_the_gradient_far_better_than_random(ctx):
    x, y = ctx.dataset.x_train, ctx.dataset.y_train
    rows = last_layer_gradients(ctx.model, x, y).double()
    full = rows.sum(0)

    def error(sel):
        return float((sel.weights.double() @ rows[sel.indices] - full).norm() / full.norm())

    gm = error(GradMatch(fraction=0.1, seed=0, lam=0.0).select(ctx))
    pb = error(GradMatchPB(fraction=0.1, seed=0).select(ctx))
    rand = Random(fraction=0.1, seed=0).select(ctx)
    rand_err = error(type(rand)(rand.indices, rand.weights * 10.0))
    assert gm < 0.5 * rand_err
    assert pb < rand_err


def test_gradmatchpb_picks_whole_batches(ctx):
    strategy = GradMatchPB(fraction=0.1, seed=0)
    assert strategy.lam == 0.0
    sel = strategy.select(ctx)
    n, bs = len(ctx.dataset), ctx.batch_size
    m = math.ceil(budget(0.1, n) / bs)
    batches = fixed_partition(n, bs, 0)
    assert sel.batch_ids is not None and len(sel.batch_ids) == m
    expected = torch.cat([batches[i] for i in sel.batch_ids.tolist()])
    assert torch.equal(sel.indices, expected)
    start = 0
    for i in sel.batch_ids.tolist():
        w = sel.weights[start : start + len(batches[i])]
        assert (w == w[0]).all() and w[0] > 0
        start += len(batches[i])


@pytest.mark.parametrize("cls", [GradMatch, GradMatchPB])
def test_valid_mode_never_selects_validation_examples(ctx, cls):
    sel = cls(fraction=0.1, seed=0, valid=True).select(ctx)
    _, val = validation_split(ctx.dataset.y_train, 0.1, 0)
    assert set(sel.indices.tolist()).isdisjoint(val.tolist())
    assert (sel.weights > 0).all()
    if cls is GradMatch:
        assert len(sel) == budget(0.1, len(ctx.dataset))


def test_per_gradient_variant(ctx):
    sel = GradMatch(fraction=0.1, seed=0, per_gradient=True).select(ctx)
    assert len(sel) == budget(0.1, len(ctx.dataset)) and (sel.weights > 0).all()


def test_random_first_round(ctx):
    first = SelectionContext(**{**ctx.__dict__, "epoch": 0, "round_index": 0})
    sel = GradMatch(fraction=0.1, seed=0, random_first=True).select(first)
    ref = Random(fraction=0.1, seed=0).select(first)
    assert torch.equal(sel.indices, ref.indices) and torch.equal(sel.weights, ref.weights)
    pb = GradMatchPB(fraction=0.1, seed=0, random_first=True).select(first)
    ref_pb = RandomPB(fraction=0.1, seed=0).select(first)
    assert torch.equal(pb.indices, ref_pb.indices) and torch.equal(pb.batch_ids, ref_pb.batch_ids)
    assert (pb.weights == 1).all()


@pytest.mark.parametrize("cls", [GradMatch, GradMatchPB])
def test_random_first_round_never_selects_validation_examples(ctx, cls):
    first = SelectionContext(**{**ctx.__dict__, "epoch": 0, "round_index": 0})
    strategy = cls(fraction=0.1, seed=0, valid=True, random_first=True)
    _, val = validation_split(first.dataset.y_train, strategy.valid_fraction, 0)
    sel = strategy.select(first)
    assert len(sel) > 0 and not torch.isin(sel.indices, val).any()


def test_picks_per_step_default_and_override(ctx):
    assert [auto_picks_per_step(k) for k in (0, 1, 16, 17, 200, 5000)] == [1, 1, 1, 2, 13, 313]
    auto = GradMatch(fraction=0.1, seed=0)
    auto.select(ctx)
    budgets = class_budgets(budget(0.1, len(ctx.dataset)), torch.bincount(ctx.dataset.y_train))
    assert auto.last_info["picks_per_step"] == auto_picks_per_step(int(budgets.max()))
    picks = auto.last_info["picks_per_step"]
    assert auto.last_info["omp_mode"] == ("pool" if picks > 1 else "one")
    single = GradMatch(fraction=0.1, seed=0, picks_per_step=1)
    sel = single.select(ctx)
    assert single.last_info["picks_per_step"] == 1 and single.last_info["omp_mode"] == "one"
    assert single.last_info["omp_steps"] >= int(budgets.max())  # one atom per step
    assert len(sel) == budget(0.1, len(ctx.dataset))


@pytest.mark.parametrize("params", [{"lam": -1.0}, {"eps": -1.0}, {"valid_fraction": 1.0},
                                    {"memory_share": 0.0}, {"check_every": 0},
                                    {"picks_per_step": 0}])
def test_bad_parameters(params):
    with pytest.raises(ValueError):
        GradMatch(fraction=0.1, **params)


# ---- CLI -------------------------------------------------------------------------------------

SMALL = ["--train-size", "1000", "--test-size", "200", "--epochs", "3", "--select-every", "1",
         "--quiet"]


@pytest.mark.parametrize("strategy,extra,size,batches", [
    ("gradmatch", ["--lam", "0.25", "--eps", "1e-7"], 100, None),
    ("gradmatchpb", ["--batch-size", "50"], 100, 2),
    ("gradmatch", ["--valid", "--per-gradient", "--picks-per-step", "3"], 100, None),
])
def test_cli_runs_and_writes_selection_files(in_tmp, strategy, extra, size, batches):
    result = CliRunner().invoke(main, ["train", *SMALL, "--strategy", strategy, *extra,
                                       "--out", "runs/x", "--save-selections", "selections/x.h5"])
    assert result.exit_code == 0, result.output
    store = SelectionStore.open(in_tmp / "selections" / "x.h5")
    assert [r.epoch for r in store.rounds] == [0, 1, 2]
    for r in store.rounds:
        assert len(r) == size and r.seconds > 0 and (r.weights > 0).all()
        if batches is None:
            assert r.batch_ids is None
        else:
            assert r.batch_ids is not None and len(r.batch_ids) == batches
    params = store.metadata.strategy_params
    if "--lam" in extra:
        assert params["lam"] == 0.25 and params["eps"] == 1e-7
    if "--valid" in extra:
        assert params["valid"] is True and params["per_gradient"] is True
        assert params["picks_per_step"] == 3
    # The file replays: another optimizer and model train on exactly the stored rounds.
    replay_args = [a for a in SMALL if a not in ("--select-every", "1")]
    replay = CliRunner().invoke(main, ["train", *replay_args, "--replay", "selections/x.h5",
                                       "--optimizer", "adam", "--lr", "1e-3", "--model", "mlp",
                                       "--out", "runs/replay"])
    assert replay.exit_code == 0, replay.output
    log = read_log(in_tmp / "runs" / "replay")
    assert [r["replay_round"] for r in log] == [0, 1, 2]
    assert [r["subset_size"] for r in log] == [len(r) for r in store.rounds]


def test_cli_memory_refusal_is_one_line(in_tmp, monkeypatch):
    monkeypatch.setattr(memory, "free_memory", lambda device: 1024)
    result = CliRunner().invoke(main, ["train", *SMALL, "--strategy", "gradmatch"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: gradmatch on 1000 examples needs")
    assert lines[0].endswith("try a smaller --fraction")  # with 1 KiB free nothing else fits


@pytest.mark.parametrize("args,message", [
    (["--strategy", "random", "--picks-per-step", "2"], "--picks-per-step does not apply"),
    (["--strategy", "gradmatch", "--picks-per-step", "0"], "--picks-per-step"),
])
def test_cli_refuses_bad_picks_per_step(in_tmp, args, message):
    result = CliRunner().invoke(main, ["train", *SMALL, *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_selection_chunk_follows_the_input_size_on_cpus():
    from subsetsel.selection.gradmatch import CHUNK, selection_chunk

    cpu = torch.device("cpu")
    assert selection_chunk(cpu, (1, 40)) == 1024  # MNIST-1D: 40 floats an example
    assert selection_chunk(cpu, (1, 28, 28)) == 128  # 784 floats: 2^17 / 784 -> 128
    assert selection_chunk(cpu, (3, 224, 224)) == 128  # never below 128
    assert selection_chunk(cpu, (300,)) == 256
    assert selection_chunk(torch.device("cuda"), (3, 224, 224)) == CHUNK
