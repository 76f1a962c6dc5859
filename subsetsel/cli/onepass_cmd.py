"""`subsetsel onepass`: stream the training set once, replaying from a bounded buffer.

Data, model and optimization options are shared with `subsetsel train` (cli/options.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from subsetsel.cli.errors import one_line_errors
from subsetsel.cli.launch import launch
from subsetsel.cli.options import FLOAT, data_options, optimization_options, threads_option
from subsetsel.onepass.buffer import INSERTIONS
from subsetsel.onepass.stream import ALPHA_DECAYS, PRIORITIES, OnePassConfig

_DEFAULTS = OnePassConfig()


def default_run_name(config: OnePassConfig) -> str:
    """`onepass-<method>-<dataset>-m<storage>-k<steps>-s<seed>-<UTC time>`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dataset = config.dataset.replace(":", "-").replace("/", "_")
    return (
        f"onepass-{config.label()}-{dataset}-m{config.storage:g}-k{config.replay_steps}"
        f"-s{config.seed}-{stamp}"
    )


@click.command("onepass")
@data_options
@click.option("--storage", type=FLOAT, default=_DEFAULTS.storage, show_default=True,
              help="Replay buffer size as a share of the training set, in (0, 1].")
@click.option("--insertion", type=click.Choice(INSERTIONS), default=_DEFAULTS.insertion,
              show_default=True, help="Which examples the full buffer keeps.")
@click.option("--replay-steps", type=int, default=_DEFAULTS.replay_steps, show_default=True,
              help="k: replay steps after each incoming batch (0: naive one pass, no buffer).")
@click.option("--priority", type=click.Choice(PRIORITIES), default=_DEFAULTS.priority,
              show_default=True, help="Replay sampling: uniform, or P = 1 - alpha*exp(-loss).")
@click.option("--alpha", type=FLOAT, default=_DEFAULTS.alpha, show_default=True,
              help="Alpha of the error priority, in [0, 1].")
@click.option("--alpha-decay", type=click.Choice(ALPHA_DECAYS), default=_DEFAULTS.alpha_decay,
              show_default=True, help="Schedule of alpha over the run's optimizer steps.")
@click.option("--importance-weights/--no-importance-weights",
              default=_DEFAULTS.importance_weights, show_default=True,
              help="Weight prioritised replay losses by 1/(M q) (unbiased for the uniform loss).")
@click.option("--reference-epochs", type=int, default=_DEFAULTS.reference_epochs,
              show_default=True, help="E of the reference run: compute % = backprops / (E N).")
@click.option("--log-every", type=FLOAT, default=_DEFAULTS.log_every, show_default=True,
              help="Evaluate and log every this share of the stream.")
@optimization_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Run directory for config.json, log.jsonl, summary.json (default runs/NAME).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Start this many processes with torchrun's launcher; each streams its shard "
                   "and keeps its share of the buffer.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@threads_option
@one_line_errors
def onepass(out_dir: str | None, quiet: bool, as_json: bool, nproc: int | None,
            **options: object) -> None:
    """Train in one pass over the data with a bounded (prioritised) replay buffer."""
    if nproc is not None:
        launch("onepass", nproc)
        return
    from subsetsel.engine import dist
    from subsetsel.engine.files import claim, release
    from subsetsel.onepass.stream import run_onepass
    from subsetsel.train import resolve_device

    config = OnePassConfig(**options)  # type: ignore[arg-type]
    config.validate()
    group = dist.init(resolve_device(config.device))
    out = None
    if group.main:
        out = claim(Path(out_dir)) if out_dir else claim(
            Path("runs") / default_run_name(config), unique=True)
    out = group.broadcast_object(out)
    try:
        summary = run_onepass(config, out, claimed=True, progress=not quiet)
    except BaseException:
        if out is not None:
            release(out)  # refused before it started: the folder is free again
        raise
    dist.shutdown()
    if not group.main:
        return
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"final test accuracy {summary['final_acc']:.4f} (best {summary['best_acc']:.4f}) | "
        f"storage {summary['storage_pct']:.2f} % | compute {summary['compute_pct']:.2f} % of "
        f"{summary['reference_epochs']} epochs | {summary['elapsed_seconds']:.1f} s"
    )
    click.echo(f"log: {out / 'log.jsonl'}")
