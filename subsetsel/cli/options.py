"""Option groups shared by the commands that train (`train`/`select`, `onepass`, `search`).

Defaults come from `TrainConfig`, so every command means the same by the same option. Every
float option refuses NaN and infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import click

from subsetsel.train import LOADERS, TrainConfig

_DEFAULTS = TrainConfig()
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class FiniteFloat(click.ParamType):
    """A float that must be finite (NaN and inf are refused, naming the option)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"must be a finite number, got {value!r}", param, ctx)
        return number


FLOAT = FiniteFloat()


def group(*options: Decorator) -> Decorator:
    """Apply options so that --help lists them in the order given."""

    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return apply


data_options = group(
    click.option("--dataset", default=_DEFAULTS.dataset, show_default=True,
                 help="Dataset name (see `subsetsel list`), npz:PATH, or folder:PATH (an "
                      "ImageFolder with train/ and val/)."),
    click.option("--data-root", default=_DEFAULTS.data_root, show_default=True,
                 help="Folder holding torchvision datasets (never downloaded)."),
    click.option("--train-size", type=click.IntRange(min=1),
                 help="Subsample the training set to this many examples."),
    click.option("--test-size", type=click.IntRange(min=1),
                 help="Subsample the test set to this many examples."),
    click.option("--data-seed", type=int, default=_DEFAULTS.data_seed, show_default=True,
                 help="Seed of data generation/subsampling (kept fixed across training seeds)."),
    click.option("--loader", type=click.Choice(LOADERS), default=_DEFAULTS.loader,
                 show_default=True,
                 help="tensor: the data as tensors on the device; dataloader: read through a "
                      "torch DataLoader with --workers processes; auto: tensors when they fit "
                      "in half of the device's free memory (folder: always dataloader)."),
    click.option("--workers", type=click.IntRange(min=0),
                 help="DataLoader worker processes [min(4, cores - 1)]."),
    click.option("--image-size", type=click.IntRange(min=8),
                 help="folder: datasets: image side in pixels [first image's shorter side, at "
                      "most 224]."),
    click.option("--model", help="Model name (default: the dataset's default model)."),
)

optimization_options = group(
    click.option("--batch-size", type=click.IntRange(min=1), default=_DEFAULTS.batch_size,
                 show_default=True),
    click.option("--optimizer", default=_DEFAULTS.optimizer, show_default=True,
                 help="sgd, adam, adamw or rmsprop."),
    click.option("--lr", type=FLOAT, default=_DEFAULTS.lr, show_default=True,
                 help="Learning rate."),
    click.option("--momentum", type=FLOAT, default=_DEFAULTS.momentum, show_default=True),
    click.option("--nesterov/--no-nesterov", default=_DEFAULTS.nesterov, show_default=True),
    click.option("--weight-decay", type=FLOAT, default=_DEFAULTS.weight_decay,
                 show_default=True),
    click.option("--schedule", default=_DEFAULTS.schedule, show_default=True,
                 help="Learning-rate schedule: constant, cosine or step."),
    click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
                 help="Seed of initialisation, batch order and selections."),
    click.option("--device", default=_DEFAULTS.device, show_default=True,
                 help="auto, cpu, cuda or cuda:N."),
    click.option("--amp", is_flag=True, default=_DEFAULTS.amp,
                 help="bf16 autocast for training, evaluation and selection forwards."),
    click.option("--channels-last", is_flag=True, default=_DEFAULTS.channels_last,
                 help="NHWC memory layout for convolutional models."),
)


def _set_threads(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value:
        import torch

        torch.set_num_threads(value)
    return value


MAX_THREADS = 1024  # more than any CPU has cores; torch overflows past 2**31 - 1

threads_option = click.option(
    "--threads", type=click.IntRange(min=0, max=MAX_THREADS), default=1, show_default=True,
    expose_value=False, callback=_set_threads, is_eager=True,
    help="CPU threads for torch (0: torch's default, all cores). One thread is as fast for the "
    "small default models and immune to oversubscription on a shared machine.",
)
