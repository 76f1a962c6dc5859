"""The `--threads` option shared by the commands that train."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def _set_threads(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value < 0:
        raise click.BadParameter("must be >= 0")
    if value:
        import torch

        torch.set_num_threads(value)
    return value


def threads_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--threads N`: torch CPU intra-op threads, default 1 (0 keeps torch's default).

    One thread is as fast as two for the small default models on a 2-core CPU and immune to
    OpenMP oversubscription when other processes share the cores (measured: 10-40x slower epochs
    with 2 threads on a busy 2-core machine; see README)."""
    return click.option(
        "--threads", type=int, default=1, show_default=True, expose_value=False,
        callback=_set_threads, is_eager=True,
        help="CPU threads for torch (0: torch's default, all cores).",
    )(func)
