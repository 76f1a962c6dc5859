"""Optimizers and learning-rate schedules by name (schedules step once per epoch)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from subsetsel.registry import Registry

Params = Iterable[torch.nn.Parameter]
OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
SCHEDULES: Registry[Callable[[int], Callable[[int], float]]] = Registry("schedule")


@OPTIMIZERS.register("sgd")
def _sgd(params: Params, lr: float, momentum: float, nesterov: bool,
         weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                           weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def _adam(params: Params, lr: float, momentum: float, nesterov: bool,
          weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def _adamw(params: Params, lr: float, momentum: float, nesterov: bool,
           weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("rmsprop")
def _rmsprop(params: Params, lr: float, momentum: float, nesterov: bool,
             weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def build_optimizer(
    name: str,
    params: Params,
    *,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), Adam, AdamW or RMSprop; momentum: SGD and RMSprop."""
    if not lr > 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    return OPTIMIZERS.get(name)(params, lr, momentum, nesterov, weight_decay)


@SCHEDULES.register("constant")
def _constant(epochs: int) -> Callable[[int], float]:
    return lambda _: 1.0


@SCHEDULES.register("cosine")
def _cosine(epochs: int) -> Callable[[int], float]:
    return lambda e: 0.5 * (1.0 + math.cos(math.pi * min(e, epochs) / max(epochs, 1)))


@SCHEDULES.register("step")
def _step(epochs: int) -> Callable[[int], float]:
    milestones = sorted({max(1, int(epochs * 0.5)), max(1, int(epochs * 0.75))})
    return lambda e: 0.1 ** sum(e >= m for m in milestones)


def build_schedule(
    name: str, optimizer: torch.optim.Optimizer, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule over `epochs` epochs.

    constant: lr throughout; cosine: lr * (1 + cos(pi * e / epochs)) / 2;
    step: lr divided by 10 at 50 % and 75 % of the epochs.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES.get(name)(epochs))
