"""InfoBatch (lossless dynamic pruning): the pruning rule, the annealing tail, losses recorded
from the training forward, replay of a CLI run's rounds, the DataLoader path, SubsetLoader's
record(), the per-step learning rate over shrinking epochs, bad options, and two gloo ranks
holding the same selection."""

from __future__ import annotations

import copy
import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_distributed import run_ranks
from test_loader import Pairs

from subsetsel import SubsetLoader
from subsetsel.cli import main
from subsetsel.data import TensorData
from subsetsel.data.sampler import epoch_order
from subsetsel.engine.loop import ByProgress
from subsetsel.optim import SCHEDULES
from subsetsel.selection.base import create_strategy, round_generator
from subsetsel.selection.infobatch import SALT, InfoBatch, infobatch_prune, prune_stop
from subsetsel.selection.losses import LossRecord
from subsetsel.store import SelectionStore
from subsetsel.train import TrainConfig, Trainer, read_log


# ---- the rule ----------------------------------------------------------------------------------
def test_pruning_rule_on_a_hand_made_loss_vector():
    nan = float("nan")
    losses = torch.tensor([nan, 0.1, 0.2, 0.3, 5.0, 6.0, nan, 0.05, 4.0, 0.4])
    mean = torch.tensor([0.1, 0.2, 0.3, 5.0, 6.0, 0.05, 4.0, 0.4]).mean()  # 2.00625
    r = 0.5
    indices, weights = infobatch_prune(losses, r, torch.Generator().manual_seed(3))
    draws = torch.rand(10, generator=torch.Generator().manual_seed(3))
    well = {i for i in range(10) if not math.isnan(losses[i]) and losses[i] < mean}
    assert well == {1, 2, 3, 7, 9}
    dropped = {i for i in well if draws[i] < r}
    assert set(indices.tolist()) == set(range(10)) - dropped
    assert 0 < len(dropped) < len(well)  # this seed drops some, keeps some
    for i, w in zip(indices.tolist(), weights.tolist(), strict=True):
        assert w == pytest.approx(1 / (1 - r) if i in well else 1.0)
    assert {0, 6, 4, 5, 8} <= set(indices.tolist())  # unseen and high-loss always kept


def test_expected_kept_fraction_and_edge_cases():
    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(100_000, generator=gen)  # uniform: half below the mean
    indices, weights = infobatch_prune(losses, 0.3, torch.Generator().manual_seed(1))
    well = int((losses < losses.mean()).sum())
    assert abs(len(indices) - (100_000 - 0.3 * well)) < 600  # ~4 std of the binomial
    # the weighted count of the well-learned examples is unbiased
    kept_well = losses[indices] < losses.mean()
    assert abs(float(weights[kept_well].sum()) - well) / well < 0.02
    # r = 0 or nothing seen: everything, weight 1
    for vec, r in ((losses, 0.0), (torch.full((50,), float("nan")), 0.5)):
        idx, w = infobatch_prune(vec, r, torch.Generator().manual_seed(0))
        assert idx.tolist() == list(range(len(vec))) and bool((w == 1).all())


class _Ctx:
    """A stand-in SelectionContext for the strategy alone."""

    def __init__(self, epoch, epochs, losses, n=40):
        self.dataset = range(n)
        self.epoch, self.epochs, self.round_index, self.losses = epoch, epochs, epoch, losses


def test_epochs_from_delta_times_epochs_train_on_the_full_data():
    assert [prune_stop(0.875, e) for e in (1, 4, 8, 12, 20, 200)] == [1, 4, 7, 11, 18, 175]
    strategy = InfoBatch(prune_ratio=0.5, delta=0.875, seed=2)
    record = LossRecord(40, "cpu")
    record.record(torch.arange(40), torch.linspace(0, 1, 40))
    sizes = [len(strategy.select(_Ctx(e, 20, record))) for e in range(20)]
    assert all(s < 40 for s in sizes[:18]) and sizes[18:] == [40, 40]
    full = strategy.select(_Ctx(18, 20, record))
    assert full.indices.tolist() == list(range(40)) and bool((full.weights == 1).all())
    # the losses of epoch e are wanted only when epoch e + 1 prunes
    assert [strategy.wants_losses(e, 20) for e in (0, 16, 17, 18, 19)] == [True] * 2 + [False] * 3
    # the draw is the seeded per-round generator: any process draws the same subset
    again = strategy.select(_Ctx(5, 20, record))
    ref, _ = infobatch_prune(record.values, 0.5, round_generator(2, 5, SALT))
    assert torch.equal(again.indices, ref)


# ---- losses from the engine --------------------------------------------------------------------
def _own_data(n=240, d=12, classes=3):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n + 60, d, generator=gen), torch.randint(0, classes, (n + 60,),
                                                                generator=gen)
    return TensorData("mine", x[:n], y[:n], x[n:], y[n:], num_classes=classes)


def _mlp(d=12, classes=3):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, classes))


def test_engine_records_the_training_forward_losses_by_index():
    data, model = _own_data(), _mlp()
    initial = copy.deepcopy(model)
    # a rate so small the weights do not move: every batch's losses are the initial model's
    config = TrainConfig(dataset="mine", strategy="infobatch", epochs=2, batch_size=32,
                         lr=1e-9, momentum=0.0, weight_decay=0.0)
    trainer = Trainer(config, model=model, dataset=data)
    trainer.fit()
    recorded = trainer.schedule.losses.values  # epoch 0's losses (epoch 1 records none)
    with torch.no_grad():
        direct = F.cross_entropy(initial(data.x_train), data.y_train, reduction="none")
    assert not bool(torch.isnan(recorded).any())
    torch.testing.assert_close(recorded, direct, rtol=1e-5, atol=1e-6)
    assert trainer.history[1]["subset_size"] < len(data)  # epoch 1 pruned from them
    # epoch 1's steps: mean(w * l) over each batch (the reference's normalisation)
    order = epoch_order(trainer.selection, config.seed, 1)
    with torch.no_grad():
        steps = [(F.cross_entropy(initial(data.x_train[i]), data.y_train[i], reduction="none")
                  * w).mean() for i, w in zip(order.indices.split(32), order.weights.split(32),
                                              strict=True)]
    assert trainer.history[1]["train_loss"] == pytest.approx(float(torch.stack(steps).mean()),
                                                             rel=1e-5)
    # a strategy that wants no losses records nothing
    other = Trainer(TrainConfig(dataset="mine", strategy="random", fraction=0.5, epochs=1,
                                batch_size=32), model=_mlp(), dataset=data)
    other.fit()
    assert other.schedule.losses is None


# ---- CLI: replay, DataLoader path, bad options -------------------------------------------------
SMALL = ["--train-size", "600", "--test-size", "100", "--quiet"]


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_run_is_replayed_exactly(in_tmp):
    out = _invoke(["train", "--strategy", "infobatch", "--epochs", "6", *SMALL,
                   "--save-selections", "ib", "--out", "runs/ib"])
    assert out.exit_code == 0, out.output
    stored = SelectionStore.open("selections/ib.h5")
    assert stored.metadata.strategy_params["select_every"] == 1
    assert stored.metadata.strategy_params["prune_ratio"] == 0.5
    rounds = stored.schedule()
    assert [r.epoch for r in rounds] == list(range(6))
    assert [len(r) == 600 for r in rounds] == [True, False, False, False, False, True]
    assert set(torch.cat([r.weights for r in rounds[1:5]]).unique().tolist()) == {1.0, 2.0}
    log = read_log("runs/ib")
    assert [r["subset_size"] for r in log] == [len(r) for r in rounds]
    assert [r["backpropagated"] for r in log] == [len(r) for r in rounds]
    again = _invoke(["train", "--replay", "ib", "--lr", "0.1", *SMALL,
                     "--save-selections", "ib-replayed", "--out", "runs/replay"])
    assert again.exit_code == 0, again.output
    replayed = SelectionStore.open("selections/ib-replayed.h5").schedule()
    assert len(replayed) == len(rounds)
    for a, b in zip(rounds, replayed, strict=True):
        assert a.epoch == b.epoch
        assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert all(r["select_seconds"] == 0 for r in read_log("runs/replay"))
    # replayed with the same settings, the run is the original one (same steps, same loss)
    same = _invoke(["train", "--replay", "ib", *SMALL, "--out", "runs/same"])
    assert same.exit_code == 0, same.output
    assert ([(r["train_loss"], r["test_acc"]) for r in read_log("runs/same")]
            == [(r["train_loss"], r["test_acc"]) for r in log])


def test_dataloader_path_prunes_like_the_tensor_path(in_tmp):
    sizes = {}
    for loader in ("tensor", "dataloader"):
        out = _invoke(["train", "--strategy", "infobatch", "--epochs", "3", *SMALL,
                       "--loader", loader, "--workers", "0", "--out", f"runs/{loader}",
                       "--model", "mlp"])
        assert out.exit_code == 0, out.output
        sizes[loader] = [r["subset_size"] for r in read_log(f"runs/{loader}")]
    assert sizes["dataloader"][0] == 600 and all(s < 600 for s in sizes["dataloader"][1:])
    assert sizes["dataloader"] == sizes["tensor"]  # same losses, same seeded draws


@pytest.mark.parametrize("args", [
    ["--prune-ratio", "1"], ["--prune-ratio", "-0.1"], ["--delta", "0"], ["--delta", "1.5"],
    ["--prune-ratio", "nan"], ["--delta", "inf"], ["--select-every", "3"],
    ["--fraction", "0.3"], ["--warm-start", "0.5"],
])
def test_bad_options_are_one_line_usage_errors(in_tmp, args):
    out = CliRunner().invoke(main, ["train", "--strategy", "infobatch", *SMALL, *args])
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output
    assert len([line for line in out.output.splitlines() if line.startswith("Error")]) == 1


def test_infobatch_options_refused_for_other_strategies_and_python_config(in_tmp):
    out = CliRunner().invoke(main, ["train", "--strategy", "random", "--prune-ratio", "0.3",
                                    *SMALL])
    assert out.exit_code == 2 and "does not apply to --strategy random" in out.output
    config = TrainConfig(strategy="infobatch")
    config.validate()  # defaults: the strategy's own schedule settings put in
    assert (config.select_every, config.fraction, config.warm_start) == (1, 1.0, 0.0)
    with pytest.raises(ValueError, match="--select-every 3 does not apply"):
        TrainConfig(strategy="infobatch", select_every=3).validate()
    with pytest.raises(ValueError, match="--prune-ratio"):
        TrainConfig(strategy="infobatch", strategy_params={"prune_ratio": 1.0}).validate()


# ---- SubsetLoader ------------------------------------------------------------------------------
def test_subset_loader_prunes_from_recorded_losses(small_mnist1d):
    from subsetsel.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", small_mnist1d.input_shape, 10)
    ds = Pairs(small_mnist1d.x_train, small_mnist1d.y_train)
    loader = SubsetLoader(ds, model=model, strategy="infobatch", epochs=4, batch_size=64,
                          num_workers=0, strategy_params={"prune_ratio": 0.5, "delta": 1.0})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sizes, weights = [], set()
    for epoch in range(4):
        for i, (inputs, targets, w) in enumerate(loader):
            losses = F.cross_entropy(model(inputs), targets, reduction="none")
            loss = (losses * w).sum() / w.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if epoch == 1 and i == 0:  # explicit indices work too
                loader.record(losses, loader.indices)
                with pytest.raises(RuntimeError, match="already"):
                    loader.record(losses)  # the batch was recorded through its indices
            else:
                loader.record(losses)
            if i == 0:
                with pytest.raises(RuntimeError, match="already"):
                    loader.record(losses)
                with pytest.raises(ValueError, match="one loss per example"):
                    loader.record(losses.mean(), loader.indices)
        sizes.append(len(loader.selection))
        weights |= set(loader.selection.weights.tolist())
    assert sizes[0] == 600 and all(s < 600 for s in sizes[1:])
    assert weights == {1.0, 2.0}
    assert loader.mean_loss  # global_loss divides by the rows: mean(w * l)
    loss, w = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 1.0, 2.0])
    assert float(loader.global_loss(loss, w)) == pytest.approx(float((loss * w).mean()))
    with pytest.raises(RuntimeError, match="no batch is in flight"):
        loader.record(torch.zeros(3))


def test_subset_loader_without_record_warns_and_keeps_everything(small_mnist1d):
    ds = Pairs(small_mnist1d.x_train, small_mnist1d.y_train)
    loader = SubsetLoader(ds, strategy="infobatch", epochs=3, batch_size=200, num_workers=0)
    with pytest.warns(UserWarning, match="loader.record"):
        for _ in loader:
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in loader:
            pass
    assert len(loader.selection) == 600
    with pytest.raises(ValueError, match="--select-every 2 does not apply"):
        SubsetLoader(ds, strategy="infobatch", select_every=2, epochs=3)
    # other strategies: record() only checks the shape
    plain = SubsetLoader(ds, strategy="random", fraction=0.5, select_every=1, epochs=1,
                         batch_size=100, num_workers=0)
    for _x, y, _w in plain:
        plain.record(torch.zeros(len(y)))


# ---- the learning rate over shrinking epochs ---------------------------------------------------
def test_per_step_rate_follows_progress_in_epochs_and_ends_at_its_final_value():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    lr = ByProgress(opt, SCHEDULES.get("cosine")(4))
    seen = []
    for epoch, steps in enumerate([10, 6, 7, 3]):  # shrinking, then growing epochs
        lr.start_period(epoch, steps)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + math.cos(math.pi * epoch
                                                                                 / 4)))
        for _ in range(steps):
            seen.append(opt.param_groups[0]["lr"])
            lr.after_step()
        lr.after_period()
    assert all(a >= b for a, b in zip(seen, seen[1:], strict=False))  # smooth, decreasing
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine's end


def test_trainer_per_step_rate_reaches_zero_despite_pruned_epochs():
    data = _own_data()
    config = TrainConfig(dataset="mine", strategy="infobatch", epochs=4, batch_size=16,
                         lr=0.1, lr_per_step=True, schedule="cosine")
    trainer = Trainer(config, model=_mlp(), dataset=data)
    rates = []
    trainer.engine.callbacks.append(lambda eng, rec: rates.append(
        eng.optimizer.param_groups[0]["lr"]))
    trainer.fit()
    sizes = [r["subset_size"] for r in trainer.history]
    assert sizes[0] == 240 and min(sizes[1:]) < 240  # epochs of changing length
    for epoch, rate in enumerate(rates):  # the end of epoch e: cosine at e + 1, exactly
        assert rate == pytest.approx(0.05 * (1 + math.cos(math.pi * (epoch + 1) / 4)), abs=1e-12)
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)


def test_resumed_run_draws_the_same_subsets(tmp_path):
    data = _own_data()

    def config():
        return TrainConfig(dataset="mine", strategy="infobatch", epochs=5, batch_size=32,
                           save_selections=str(tmp_path / "a.h5"))

    whole = Trainer(config(), model=_mlp(), dataset=data, out_dir=tmp_path / "a")
    whole.fit()

    class Stop(Exception):
        pass

    def stop(record):
        if record["epoch"] == 2:
            raise Stop

    cfg = config()
    cfg.save_selections = str(tmp_path / "b.h5")
    with pytest.raises(Stop):
        Trainer(cfg, model=_mlp(), dataset=data, out_dir=tmp_path / "b", callbacks=[stop]).fit()
    cfg = config()
    cfg.save_selections = str(tmp_path / "b.h5")
    Trainer(cfg, model=_mlp(), dataset=data, out_dir=tmp_path / "b", resume=True).fit()
    a = SelectionStore.open(tmp_path / "a.h5").schedule()
    b = SelectionStore.open(tmp_path / "b.h5").schedule()
    assert len(a) == len(b) == 5
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.weights, y.weights)


# ---- torch.distributed -------------------------------------------------------------------------
class _ThreadGroup:
    """Two ranks as two threads: all_reduce sums the ranks' tensors (the Dist interface)."""

    def __init__(self, rank: int, shared: dict, barrier: threading.Barrier) -> None:
        self.rank, self.world, self.shared, self.barrier = rank, 2, shared, barrier
        self.active = True

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.shared[self.rank] = tensor.clone()
        self.barrier.wait()
        total = self.shared[0] + self.shared[1]
        self.barrier.wait()
        tensor.copy_(total)
        return tensor


def test_ranks_losses_are_combined_before_the_draw():
    shared, barrier, out = {}, threading.Barrier(2), {}

    def rank(r: int) -> None:
        record = LossRecord(6, "cpu", _ThreadGroup(r, shared, barrier))
        record.values[:] = 9.0  # the losses of earlier epochs (the same on every rank)
        # rank 0 records examples 0, 2 (and 1, also on rank 1); rank 1 records 1, 3
        idx = torch.tensor([0, 2, 1]) if r == 0 else torch.tensor([1, 3])
        record.record(idx, torch.tensor([1.0, 2.0, 3.0]) if r == 0 else torch.tensor([5.0, 4.0]))
        record.flush()
        out[r] = (record.values.clone(), InfoBatch(seed=1).select(_Ctx(1, 8, record, n=6)))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert out[0][0].tolist() == out[1][0].tolist() == [1.0, 4.0, 2.0, 4.0, 9.0, 9.0]
    assert torch.equal(out[0][1].indices, out[1][1].indices)
    assert torch.equal(out[0][1].weights, out[1][1].weights)


def _ranks_infobatch(rank: int) -> list:
    from subsetsel.engine import dist

    dist.init(torch.device("cpu"))
    config = TrainConfig(dataset="mine", strategy="infobatch", epochs=3, batch_size=16,
                         device="cpu")
    subsets: list = []
    trainer = Trainer(config, model=_mlp(), dataset=_own_data(),
                      callbacks=[lambda rec: subsets.append(
                          (trainer.selection.indices.clone(), trainer.selection.weights.clone()))])
    trainer.fit()
    return subsets


@pytest.mark.slow
def test_two_gloo_ranks_hold_the_same_selection_every_epoch():
    a, b = run_ranks(_ranks_infobatch, timeout=120)
    assert isinstance(a, list) and isinstance(b, list), (a, b)
    assert len(a) == len(b) == 3
    for (ia, wa), (ib, wb) in zip(a, b, strict=True):
        assert ia.tolist() == ib.tolist() and wa.tolist() == wb.tolist()
    assert len(a[0][0]) == 240 and len(a[1][0]) < 240


def test_strategy_is_listed_with_its_options():
    out = _invoke(["train", "--help"])
    assert "--prune-ratio" in out.output and "--delta" in out.output
    assert "infobatch" in _invoke(["list"]).output
    assert create_strategy("infobatch", prune_ratio=0.25).params()["prune_ratio"] == 0.25
