"""The engine: one training loop for every mode.

Data flows one way: a feed opens each period (an epoch of subset training, or a stretch of a
one-pass stream) as an `EpochReader` over the examples in force -> the policy turns the reader
into a plan of step batches (count known beforehand) -> one optimizer step per step batch, whose
losses go back to the policy -> at the end of the period: test evaluation when due, a log record,
and the callbacks (log file, checkpoint, progress, user hooks).

Weighted loss: a step's loss is sum_i w_i * l_i / sum_i w_i (the reference Grad-Match
normalisation), or mean_i(w_i * l_i) for unbiased estimators (importance sampling, replay, and
the selections of strategies that ask for it, `Period.mean_loss`: InfoBatch).

Time accounting (wall seconds, CUDA synchronised): `select_seconds` is time spent choosing
subsets, `train_seconds` the time in training steps (reading, policy work and steps),
`eval_seconds` the test evaluation. `elapsed_seconds` is the cumulative select + train time:
the clock of time-to-accuracy reports (evaluation is bookkeeping, not training cost).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from subsetsel.data.base import EpochReader, TrainData
from subsetsel.engine.dist import Dist
from subsetsel.engine.precision import Precision
from subsetsel.errors import DivergenceError
from subsetsel.models import capture_last_input
from subsetsel.online.base import Policy, PolicyContext, Scored, StepBatch, StepOut


@dataclass
class Counters:
    """Examples forwarded, backpropagated and freshly read; optimizer steps."""

    forwarded: int = 0
    backpropagated: int = 0
    fresh: int = 0
    steps: int = 0

    def add(self, other: Counters) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class LossSink(Protocol):
    """Where a period's per-example training losses go (`subsetsel.selection.losses`)."""

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None: ...

    def flush(self) -> None: ...


@dataclass
class Period:
    """One period's data: the reader, the seconds spent choosing its examples, log fields, and
    where the training losses of its steps go (None: they are not recorded)."""

    reader: EpochReader
    select_seconds: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    losses: LossSink | None = None
    mean_loss: bool = False  # every step's loss is mean(w * l) (the selection's strategy asks)


class Feed(Protocol):
    """Where the engine's periods get their examples (a selection schedule, a one-pass stream)."""

    periods: int

    def open(self, period: int) -> Period: ...

    def finish(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class LRControl(Protocol):
    """Learning-rate schedule hooks: after every optimizer step, after every period."""

    def after_step(self) -> None: ...

    def after_period(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PerPeriod:
    """A `torch.optim.lr_scheduler` stepped once per period (epoch)."""

    def __init__(self, schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.schedule = schedule

    def after_step(self) -> None:
        pass

    def after_period(self) -> None:
        self.schedule.step()

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)


class PerStep(PerPeriod):
    """A `torch.optim.lr_scheduler` stepped after every optimizer step."""

    def after_step(self) -> None:
        self.schedule.step()

    def after_period(self) -> None:
        pass


class ByProgress:
    """The learning rate set before every optimizer step from the run's progress in epochs,
    p = epoch + steps_taken / steps_in_epoch: lr = base_lr * factor(p) (factor: a schedule of
    `subsetsel.optim.SCHEDULES`, evaluated at fractional epochs).

    A per-step schedule built on a total step count needs every epoch's length in advance; with
    epochs whose length changes (InfoBatch prunes each epoch anew, from losses not yet seen) that
    count is unknown. Progress in epochs is known: whatever the epoch lengths, the rate moves
    smoothly within each epoch, starts epoch e at factor(e), and reaches factor(epochs) (cosine:
    0) after the last step of the last epoch. The engine calls `start_period(epoch, steps)`
    before each epoch's first step."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 factor: Callable[[float], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        self.base = [float(g.setdefault("initial_lr", g["lr"])) for g in optimizer.param_groups]
        self.epoch, self.steps, self.taken = 0, 1, 0
        self._apply(0.0)

    @property
    def progress(self) -> float:
        return self.epoch + min(self.taken, self.steps) / self.steps

    def _apply(self, progress: float) -> None:
        scale = self.factor(progress)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * scale

    def start_period(self, epoch: int, steps: int) -> None:
        self.epoch, self.steps, self.taken = epoch, max(1, steps), 0
        self._apply(self.progress)

    def after_step(self) -> None:
        self.taken += 1
        self._apply(self.progress)

    def after_period(self) -> None:
        self.epoch, self.steps, self.taken = self.epoch + 1, 1, 0
        self._apply(self.progress)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps": self.steps, "taken": self.taken,
                "base": list(self.base)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.steps, self.taken = state["epoch"], state["steps"], state["taken"]
        self.base = [float(b) for b in state["base"]]
        self._apply(self.progress)


Callback = Callable[["Engine", dict[str, Any]], None]


class Engine:
    """Trains `model` on the periods of `feed`, each transformed by `policy`.

    eval_every: periods between test evaluations (0: only after the last one).
    callbacks: called with (engine, record) after every period, in order.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        data: TrainData,
        optimizer: torch.optim.Optimizer,
        lr: LRControl,
        feed: Feed,
        policy: Policy,
        seed: int,
        batch_size: int,
        device: torch.device,
        precision: Precision | None = None,
        eval_every: int = 1,
        callbacks: list[Callback] | None = None,
        dist: Dist | None = None,
    ) -> None:
        self.model = model  # possibly DistributedDataParallel; `module` is the network
        self.data = data
        self.optimizer = optimizer
        self.lr = lr
        self.feed = feed
        self.policy = policy
        self.seed = seed
        self.batch_size = batch_size
        self.device = device
        self.precision = precision or Precision(device)
        self.eval_every = eval_every
        self.callbacks = list(callbacks or [])
        self.dist = dist or Dist.local(device)
        self.period = 0  # the next period to train
        self.counts = Counters()
        self.total_counts = Counters()
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        self._loss_sum = torch.zeros((), device=device)
        self._bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self._mean_loss = False  # the current period's selections ask for mean(w * l)

    @property
    def module(self) -> nn.Module:
        """The network itself (unwrapped from DistributedDataParallel)."""
        return getattr(self.model, "module", self.model)

    # ---- forwards and steps ------------------------------------------------------------------
    @torch.no_grad()
    def score(self, x: torch.Tensor, y: torch.Tensor, embeddings: bool = False) -> Scored:
        """A no-grad eval-mode forward, counted as forwarded examples (model left in train)."""
        module = self.module
        module.eval()
        with capture_last_input(module, embeddings) as inputs:
            logits = self.precision.forward(module, x)
        module.train()
        self.counts.forwarded += int(x.shape[0])
        emb = inputs[-1] if inputs else None
        return Scored(logits, F.cross_entropy(logits, y, reduction="none"), emb)

    def step(self, step: StepBatch, embeddings: bool = False) -> StepOut:
        """One optimizer step on the step batch's weighted loss.

        Under torch.distributed the loss is the global one: sum(w * l) / sum(w) (or the mean)
        over the batches of all ranks, from one all-reduce of (sum w, rows, sum w * l); each
        rank's loss is scaled by the world size because DDP averages the gradients."""
        batch = step.batch
        mean_loss = step.mean_loss or self._mean_loss
        self.model.train()
        with capture_last_input(self.module, embeddings) as inputs:
            logits = self.precision.forward(self.model, batch.x)
        losses = F.cross_entropy(logits, batch.y, reduction="none")
        weighted = (losses * batch.w).sum()
        if self.dist.active:
            totals = torch.stack([batch.w.sum().float(),
                                  torch.tensor(float(len(batch)), device=losses.device),
                                  weighted.detach().float()])
            self.dist.all_reduce(totals)
            norm = totals[1] if mean_loss else totals[0].clamp_min(1e-12)
            loss = weighted * (self.dist.world / norm)
            value = totals[2] / norm  # the global loss, the same on every rank
        else:
            if mean_loss:
                loss = (losses * batch.w).mean()
            else:
                loss = weighted / batch.w.sum().clamp_min(1e-12)
            value = loss.detach()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._check_finite(value)
        self.optimizer.step()
        self.lr.after_step()
        n = len(batch)
        self.counts.forwarded += n
        self.counts.backpropagated += n
        self.counts.steps += 1
        self._loss_sum += value
        return StepOut(losses.detach(), logits.detach(), inputs[-1] if inputs else None)

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Stop at a non-finite loss: at once on the CPU; on a GPU the first bad step is kept on
        the device and read at the end of the period (no host sync per step)."""
        if self.device.type == "cpu":
            if not math.isfinite(float(loss)):
                self._diverged(self.counts.steps)
            return
        bad = ~torch.isfinite(loss.detach()) & (self._bad_step < 0)
        self._bad_step = torch.where(bad, self.counts.steps, self._bad_step)

    def _diverged(self, step: int) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        raise DivergenceError(
            f"training diverged: non-finite loss at epoch {self.period}, step {step} "
            f"(lr {lr:g}); the run stops, its last checkpoint and selection file hold only what "
            "came before"
        )

    @torch.no_grad()
    def evaluate(self, chunk: int = 1024) -> tuple[float | None, float | None]:
        """(test accuracy in [0, 1], mean test loss), or (None, None) without a test split; a
        non-finite mean loss is reported as None (strict JSON logs)."""
        module = self.module
        module.eval()
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)  # correct, loss, n
        with self.precision.eval_pass(module) as settings:
            for x, y in self.data.test_batches(chunk, self.dist.rank, self.dist.world):
                logits = settings.forward(module, x)
                totals[0] += (logits.argmax(1) == y).sum()
                totals[1] += F.cross_entropy(logits, y, reduction="sum").double()
                totals[2] += y.shape[0]
        module.train()
        self.dist.all_reduce(totals)  # the test split is sharded over ranks
        correct, loss, n = totals.tolist()
        if n == 0:
            return None, None
        mean = loss / n
        return correct / n, mean if math.isfinite(mean) else None

    def context(self) -> PolicyContext:
        return PolicyContext(
            epoch=self.period, epochs=self.feed.periods, seed=self.seed,
            batch_size=self.batch_size, dataset_size=len(self.data), device=self.device,
            score=self.score, image_inputs=len(self.data.input_shape) == 3,
            rank=self.dist.rank, mean_over_ranks=self._mean_over_ranks,
        )

    def _mean_over_ranks(self, value: float) -> float:
        if not self.dist.active:
            return float(value)
        total = self.dist.all_reduce(torch.tensor([float(value)], dtype=torch.float64,
                                                  device=self.device))
        return float(total) / self.dist.world

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> None:
        """Train every remaining period."""
        self.policy.check(self.context())
        while self.period < self.feed.periods:
            record = self.run_period()
            self.period += 1
            for callback in self.callbacks:
                callback(self, record)
        self.feed.finish()

    def run_period(self) -> dict[str, Any]:
        """Train one period; return its log record."""
        period = self.period
        torch.manual_seed(self.seed * 100_003 + period)
        self.data.check_length()
        self.counts = Counters()
        self._loss_sum.zero_()
        opened = self.feed.open(period)
        self._mean_loss = opened.mean_loss
        start = time.perf_counter()
        plan = self.policy.plan(opened.reader, self.context())
        embeddings = self.policy.wants_embeddings
        taken = 0
        sink = opened.losses
        start_period = getattr(self.lr, "start_period", None)
        if start_period is not None:  # a per-step rate by progress: log the period's first
            start_period(period, plan.steps)
        first_lr = self.optimizer.param_groups[0]["lr"]
        for step in plan:
            out = self.step(step, embeddings)
            if sink is not None:  # per-example losses of the training forward, by index
                sink.record(step.batch.indices, out.losses)
            self.policy.observe(step, out)
            taken += 1
        if taken != plan.steps:
            raise RuntimeError(f"policy {self.policy.name!r} planned {plan.steps} steps but took "
                               f"{taken} (a bug: please report it)")
        if sink is not None:
            sink.flush()  # under torch.distributed: the ranks' losses combined
        extra = self.policy.end_epoch()
        # the rate this period trained at (by progress: the one of its first step)
        lr = first_lr if start_period is not None else self.optimizer.param_groups[0]["lr"]
        self.lr.after_period()
        self.counts.fresh = opened.reader.fresh
        if self.dist.active:  # examples of all ranks; the steps are shared
            seen = torch.tensor([self.counts.forwarded, self.counts.backpropagated,
                                 self.counts.fresh], device=self.device, dtype=torch.float64)
            self.counts.forwarded, self.counts.backpropagated, self.counts.fresh = (
                int(v) for v in self.dist.all_reduce(seen).tolist())
        train_loss = float(self._loss_sum) / max(1, self.counts.steps)
        if self.device.type != "cpu":
            torch.cuda.synchronize(self.device)
            if int(self._bad_step) >= 0:
                self._diverged(int(self._bad_step))
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        test_acc = test_loss = None
        last = period == self.feed.periods - 1
        if last or (self.eval_every and (period + 1) % self.eval_every == 0):
            test_acc, test_loss = self.evaluate()
        eval_seconds = time.perf_counter() - start
        self.elapsed += opened.select_seconds + train_seconds
        self.total_counts.add(self.counts)
        record = {
            "epoch": period,
            **opened.fields,
            "select_seconds": round(opened.select_seconds, 6),
            "train_seconds": round(train_seconds, 6),
            "eval_seconds": round(eval_seconds, 6),
            "elapsed_seconds": round(self.elapsed, 6),
            **dataclasses.asdict(self.counts),
            **{f"total_{k}": v for k, v in dataclasses.asdict(self.total_counts).items()},
            "train_loss": train_loss,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": lr,
            **extra,
        }
        self.history.append(record)
        return record

    def summary(self) -> dict[str, Any]:
        """Final and best accuracy, periods, time and totals of the run so far."""
        accs = [r["test_acc"] for r in self.history if r["test_acc"] is not None]
        return {
            "final_acc": accs[-1] if accs else None,
            "best_acc": max(accs) if accs else None,
            "epochs": self.feed.periods,
            "elapsed_seconds": self.elapsed,
            "select_seconds": sum(r["select_seconds"] for r in self.history),
            **{f"total_{k}": v for k, v in dataclasses.asdict(self.total_counts).items()},
        }

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs after the periods trained so far ("period": the next
        one to train)."""
        return {
            "period": self.period,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr": self.lr.state_dict(),
            "feed": self.feed.state_dict(),
            "policy": self.policy.state_dict(),
            "total_counts": dataclasses.asdict(self.total_counts),
            "elapsed": self.elapsed,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["lr"])
        self.feed.load_state_dict(state["feed"])
        self.policy.load_state_dict(state["policy"])
        self.total_counts = Counters(**state["total_counts"])
        self.elapsed = state["elapsed"]
        self.history = list(state["history"])
        self.period = state["period"]
