"""Drive a policy's plan without a model: a reader over a list of indices and a scorer whose
loss of an example is a function of its index, so every loss tells whose it is."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from subsetsel.data.base import Batch, EpochReader
from subsetsel.online.base import Policy, PolicyContext, Scored, StepOut


def loss_of(indices: torch.Tensor, epoch: int = 0) -> torch.Tensor:
    """The loss of each example: unique per (index, epoch)."""
    return indices.float() * 0.01 + epoch


class IndexReader(EpochReader):
    """x of example i is [i] (or given rows of `inputs`), labels 0."""

    def __init__(self, order: torch.Tensor, inputs: torch.Tensor | None = None) -> None:
        super().__init__(order, torch.ones(order.numel()))
        self.inputs = inputs

    def read(self, plan: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             augment: bool = True) -> Iterator[Batch]:
        for indices, weights in plan:
            self.fresh += int(indices.numel())
            x = indices.float().unsqueeze(1) if self.inputs is None else self.inputs[indices]
            yield Batch(indices, x, torch.zeros_like(indices), weights)

    def augment(self, batch: Batch) -> Batch:
        return batch


Forward = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def index_forward(x: torch.Tensor, y: torch.Tensor, epoch: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits 0, loss `loss_of` the index in x[:, 0]."""
    return torch.zeros(x.shape[0], 2), loss_of(x[:, 0].long(), epoch)


def logit_forward(x: torch.Tensor, y: torch.Tensor, epoch: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs are the logits."""
    return x, torch.nn.functional.cross_entropy(x, y, reduction="none")


class FakeEngine:
    """Runs policies' plans like the engine, recording the backward batches and the scoring
    forwards; `forward` gives (logits, losses) of inputs (drift: losses change by epoch)."""

    def __init__(self, n: int, batch_size: int = 8, epochs: int = 4, drift: bool = True,
                 forward: Forward = index_forward) -> None:
        self.n, self.batch_size, self.epochs, self.drift = n, batch_size, epochs, drift
        self.forward = forward
        self.epoch = 0
        self.trained: list[Batch] = []
        self.mean_loss: list[bool] = []
        self.scored: list[torch.Tensor] = []  # x[:, 0] of every scoring forward

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(x, y, self.epoch if self.drift else 0)

    def score(self, x: torch.Tensor, y: torch.Tensor, embeddings: bool = False) -> Scored:
        self.scored.append(x[:, 0].clone())
        return Scored(*self._forward(x, y))

    def context(self, epoch: int) -> PolicyContext:
        return PolicyContext(epoch=epoch, epochs=self.epochs, seed=0,
                             batch_size=self.batch_size, dataset_size=self.n,
                             device=torch.device("cpu"), score=self.score)

    def run_epoch(self, policy: Policy, epoch: int, reader: EpochReader) -> dict:
        self.epoch = epoch
        plan = policy.plan(reader, self.context(epoch))
        taken = 0
        for step in plan:
            self.trained.append(step.batch)
            self.mean_loss.append(step.mean_loss)
            logits, losses = self._forward(step.batch.x, step.batch.y)
            policy.observe(step, StepOut(losses, logits))
            taken += 1
        assert taken == plan.steps, (taken, plan.steps)
        return policy.end_epoch()
