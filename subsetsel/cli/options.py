"""Option groups shared by the commands that train (`train`/`select` and `onepass`).

Defaults come from `TrainConfig`, so every command means the same by the same option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from subsetsel.train import TrainConfig

_DEFAULTS = TrainConfig()
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _group(*options: Decorator) -> Decorator:
    """Apply options so that --help lists them in the order given."""

    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return apply


data_options = _group(
    click.option("--dataset", default=_DEFAULTS.dataset, show_default=True,
                 help="Dataset name (see `subsetsel list`), or npz:PATH."),
    click.option("--data-root", default=_DEFAULTS.data_root, show_default=True,
                 help="Folder holding torchvision datasets (never downloaded)."),
    click.option("--train-size", type=int,
                 help="Subsample the training set to this many examples."),
    click.option("--test-size", type=int, help="Subsample the test set to this many examples."),
    click.option("--data-seed", type=int, default=_DEFAULTS.data_seed, show_default=True,
                 help="Seed of data generation/subsampling (kept fixed across training seeds)."),
    click.option("--model", help="Model name (default: the dataset's default model)."),
)

optimization_options = _group(
    click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True),
    click.option("--optimizer", default=_DEFAULTS.optimizer, show_default=True,
                 help="sgd, adam, adamw or rmsprop."),
    click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True,
                 help="Learning rate."),
    click.option("--momentum", type=float, default=_DEFAULTS.momentum, show_default=True),
    click.option("--nesterov/--no-nesterov", default=_DEFAULTS.nesterov, show_default=True),
    click.option("--weight-decay", type=float, default=_DEFAULTS.weight_decay,
                 show_default=True),
    click.option("--schedule", default=_DEFAULTS.schedule, show_default=True,
                 help="Learning-rate schedule: constant, cosine or step."),
    click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
                 help="Seed of initialisation, batch order and selections."),
    click.option("--device", default=_DEFAULTS.device, show_default=True,
                 help="auto, cpu, cuda or cuda:N."),
)


def _set_threads(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value < 0:
        raise click.BadParameter("must be >= 0")
    if value:
        import torch

        torch.set_num_threads(value)
    return value


threads_option = click.option(
    "--threads", type=int, default=1, show_default=True, expose_value=False,
    callback=_set_threads, is_eager=True,
    help="CPU threads for torch (0: torch's default, all cores). One thread is as fast for the "
    "small default models and immune to oversubscription on a shared machine.",
)
