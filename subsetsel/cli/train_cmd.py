"""`subsetsel train`: train on a schedule of weighted subsets and save the selections."""

from __future__ import annotations

import json
from pathlib import Path

import click

from subsetsel.cli.errors import one_line_errors
from subsetsel.train import TrainConfig

_DEFAULTS = TrainConfig()


@click.command("train")
@click.option("--dataset", default=_DEFAULTS.dataset, show_default=True,
              help="Dataset name (see `subsetsel list`), or npz:PATH.")
@click.option("--data-root", default=_DEFAULTS.data_root, show_default=True,
              help="Folder holding torchvision datasets (never downloaded).")
@click.option("--train-size", type=int, help="Subsample the training set to this many examples.")
@click.option("--test-size", type=int, help="Subsample the test set to this many examples.")
@click.option("--model", help="Model name (default: the dataset's default model).")
@click.option("--strategy", default=_DEFAULTS.strategy, show_default=True,
              help="Selection strategy (see `subsetsel list`).")
@click.option("--fraction", type=float, default=_DEFAULTS.fraction, show_default=True,
              help="Subset size as a share of the training set, in (0, 1].")
@click.option("--select-every", type=int, default=_DEFAULTS.select_every, show_default=True,
              help="Re-select every R epochs.")
@click.option("--warm-start", type=float, default=_DEFAULTS.warm_start, show_default=True,
              help="Kappa: ceil(kappa*epochs*fraction) full-data epochs first, compute matched.")
@click.option("--epochs", type=int, default=_DEFAULTS.epochs, show_default=True)
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True)
@click.option("--optimizer", default=_DEFAULTS.optimizer, show_default=True,
              help="sgd, adam, adamw or rmsprop.")
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True, help="Learning rate.")
@click.option("--momentum", type=float, default=_DEFAULTS.momentum, show_default=True)
@click.option("--nesterov/--no-nesterov", default=_DEFAULTS.nesterov, show_default=True)
@click.option("--weight-decay", type=float, default=_DEFAULTS.weight_decay, show_default=True)
@click.option("--schedule", default=_DEFAULTS.schedule, show_default=True,
              help="constant, cosine or step (per epoch).")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--device", default=_DEFAULTS.device, show_default=True,
              help="auto, cpu, cuda or cuda:N.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Run directory for log.jsonl, checkpoint and summary (default runs/NAME).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue an interrupted run from its directory (other options are ignored).")
@click.option("--save-selections", metavar="PATH",
              help="Selection file to write (bare names go under selections/; default "
                   "selections/NAME.h5 for strategies that select).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@one_line_errors
def train(
    out_dir: str | None, resume_dir: str | None, save_selections: str | None, quiet: bool,
    as_json: bool, **options: object,
) -> None:
    """Train a model on weighted subsets chosen by a selection strategy."""
    from subsetsel.run import default_run_name, load_run_config, run
    from subsetsel.store import resolve_path

    if resume_dir is not None:
        config = load_run_config(resume_dir)
        out = Path(resume_dir)
    else:
        config = TrainConfig(**options)  # type: ignore[arg-type]
        config.validate()
        name = default_run_name(config)
        out = Path(out_dir) if out_dir else Path("runs") / name
        if (out / "log.jsonl").exists():
            raise click.UsageError(
                f"{out} already holds a run; use --resume {out} to continue it or another --out"
            )
        if save_selections:
            config.save_selections = str(resolve_path(save_selections))
        elif config.strategy != "full" and config.replay is None:
            config.save_selections = str(resolve_path(name))
    summary = run(config, out, resume=resume_dir is not None, progress=not quiet)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"final test accuracy {summary['final_acc']:.4f} (best {summary['best_acc']:.4f}) | "
        f"{summary['epochs']} epochs | {summary['elapsed_seconds']:.1f} s "
        f"(selection {summary['select_seconds']:.1f} s)"
    )
    click.echo(f"log: {out / 'log.jsonl'}")
    if config.save_selections:
        click.echo(f"selections: {config.save_selections}")
