"""Trainer: weighted loss, schedule, logs, determinism and resume."""

from __future__ import annotations

import json

import pytest
import torch

from subsetsel.data.base import Batch
from subsetsel.online.base import StepBatch
from subsetsel.selection.base import Selection
from subsetsel.train import TrainConfig, Trainer, plan_epochs, read_log


def _config(**overrides) -> TrainConfig:
    base = dict(
        dataset="mnist1d", train_size=600, test_size=200, model="mlp", strategy="random",
        fraction=0.5, select_every=2, epochs=4, batch_size=64, lr=0.05, device="cpu",
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_plan_epochs():
    assert plan_epochs(20, 0.1, 0.0) == (0, 20)
    # kappa 0.5: ceil(0.5*20*0.1) = 1 full epoch, then 20 - 10 = 10 subset epochs.
    assert plan_epochs(20, 0.1, 0.5) == (1, 11)
    assert plan_epochs(300, 0.3, 0.5) == (45, 195)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("fraction", 0.0, "fraction"), ("fraction", 1.2, "fraction"), ("batch_size", 0, "batch"),
     ("epochs", 0, "epochs"), ("select_every", 0, "select"), ("lr", -1.0, "lr"),
     ("strategy", "nope", "valid"), ("optimizer", "lbfgs", "valid"), ("schedule", "x", "valid")],
)
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        _config(**{field: value}).validate()


def test_weighted_loss_is_normalised_per_batch(small_mnist1d):
    """One step with weights w equals one step on sum(w_i l_i)/sum(w_i) computed by hand."""
    plain_sgd = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0)
    trainer = Trainer(_config(**plain_sgd), dataset=small_mnist1d)
    reference = Trainer(_config(**plain_sgd), dataset=small_mnist1d)
    x, y = small_mnist1d.x_train[:16], small_mnist1d.y_train[:16]
    w = torch.linspace(0.5, 3.0, 16)
    trainer.engine.step(StepBatch(Batch(torch.arange(16), x, y, w)))
    losses = torch.nn.functional.cross_entropy(reference.model(x), y, reduction="none")
    ((losses * w).sum() / w.sum()).backward()
    with torch.no_grad():
        for p in reference.model.parameters():
            p -= 0.05 * p.grad
    for a, b in zip(trainer.model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # Scaling all weights by a constant changes nothing.
    scaled = Trainer(_config(**plain_sgd), dataset=small_mnist1d)
    scaled.engine.step(StepBatch(Batch(torch.arange(16), x, y, w * 7.0)))
    for a, b in zip(trainer.model.parameters(), scaled.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_fit_logs_every_epoch_and_reselects_on_schedule(small_mnist1d, tmp_path):
    trainer = Trainer(_config(), dataset=small_mnist1d, out_dir=tmp_path / "run")
    summary = trainer.fit()
    log = read_log(tmp_path / "run")
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert [r["new_selection"] for r in log] == [True, False, True, False]
    assert all(r["subset_size"] == 300 for r in log)
    assert all(r["backpropagated"] == 300 and r["forwarded"] == 300 for r in log)
    assert log[-1]["total_backpropagated"] == 1200
    assert all(r["steps"] == 5 for r in log)  # ceil(300 / 64)
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in log)
    elapsed = [r["elapsed_seconds"] for r in log]
    assert elapsed == sorted(elapsed)
    assert elapsed[-1] == pytest.approx(summary["elapsed_seconds"], abs=1e-5)  # log rounds to 1 µs
    assert summary["final_acc"] == log[-1]["test_acc"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 4
    lrs = [r["lr"] for r in log]
    assert lrs == sorted(lrs, reverse=True)  # cosine decays


def test_training_learns(small_mnist1d):
    summary = Trainer(_config(strategy="full", epochs=8, lr=0.1), dataset=small_mnist1d).fit()
    assert summary["final_acc"] > 0.3  # chance is 0.1


def test_same_seed_same_run(small_mnist1d):
    runs = [Trainer(_config(), dataset=small_mnist1d).fit() for _ in range(2)]
    assert runs[0]["final_acc"] == runs[1]["final_acc"]
    a = Trainer(_config(), dataset=small_mnist1d)
    b = Trainer(_config(), dataset=small_mnist1d)
    a.fit()
    b.fit()
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


def test_resume_continues_with_the_same_schedule(small_mnist1d, tmp_path):
    full = Trainer(_config(), dataset=small_mnist1d, out_dir=tmp_path / "a")
    full.fit()

    class Stop(Exception):
        pass

    def stop_after_epoch_2(record):
        if record["epoch"] == 2:
            raise Stop

    interrupted = Trainer(
        _config(), dataset=small_mnist1d, out_dir=tmp_path / "b", callbacks=[stop_after_epoch_2]
    )
    with pytest.raises(Stop):
        interrupted.fit()
    assert len(read_log(tmp_path / "b")) == 3
    resumed = Trainer(_config(), dataset=small_mnist1d, out_dir=tmp_path / "b", resume=True)
    assert resumed.engine.period == 3
    resumed.fit()
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["epoch"] for r in b] == [0, 1, 2, 3]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["test_acc"] for r in a] == [r["test_acc"] for r in b]


def test_user_schedule_and_model(small_mnist1d):
    """The Python API takes a user's own model and a hand-made schedule."""

    class EvenOnly:
        def selection_for(self, epoch):
            if epoch == 0:
                idx = torch.arange(0, len(small_mnist1d), 2)
                return Selection(idx, torch.ones(idx.numel()), epoch=0)
            return None

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 10))
    trainer = Trainer(_config(epochs=2), model=model, dataset=small_mnist1d, schedule=EvenOnly())
    trainer.fit()
    assert [r["subset_size"] for r in trainer.history] == [300, 300]


def test_logged_lr_is_the_rate_the_epoch_trained_at(small_mnist1d):
    trainer = Trainer(_config(lr=0.05, epochs=4), dataset=small_mnist1d)
    trainer.fit()
    lrs = [r["lr"] for r in trainer.history]
    assert lrs[0] == pytest.approx(0.05) and lrs[-1] > 0.0


def test_resume_without_checkpoint_starts_over_without_duplicate_lines(small_mnist1d, tmp_path):
    Trainer(_config(epochs=2), dataset=small_mnist1d, out_dir=tmp_path).fit()
    (tmp_path / "checkpoint.pt").unlink()  # a crash before the first checkpoint was written
    Trainer(_config(epochs=2), dataset=small_mnist1d, out_dir=tmp_path, resume=True).fit()
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 1]


def test_resume_refuses_a_directory_of_another_run(small_mnist1d, tmp_path):
    Trainer(_config(epochs=2), dataset=small_mnist1d, out_dir=tmp_path).fit()
    with pytest.raises(ValueError, match="another config"):
        Trainer(_config(epochs=2, lr=0.3), dataset=small_mnist1d, out_dir=tmp_path, resume=True)


@pytest.mark.parametrize("name", ["foo", "cuda:0"])
def test_bad_device_is_a_value_error(name):
    from subsetsel.train import resolve_device

    if name == "cuda:0" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="device"):
        resolve_device(name)
