"""`subsetsel train`: train on a schedule of weighted subsets and save the selections."""

from __future__ import annotations

import json
from pathlib import Path

import click

from subsetsel.cli.errors import one_line_errors
from subsetsel.cli.options import data_options, optimization_options, threads_option
from subsetsel.train import TrainConfig

_DEFAULTS = TrainConfig()


@click.command("train")
@data_options
@click.option("--strategy", default=_DEFAULTS.strategy, show_default=True,
              help="Selection strategy (see `subsetsel list`).")
@click.option("--fraction", type=float, default=_DEFAULTS.fraction, show_default=True,
              help="Subset size as a share of the training set, in (0, 1].")
@click.option("--select-every", type=int, default=_DEFAULTS.select_every, show_default=True,
              help="Re-select every R epochs.")
@click.option("--warm-start", type=float, default=_DEFAULTS.warm_start, show_default=True,
              help="Kappa: ceil(kappa*epochs*fraction) full-data epochs first, compute matched.")
@click.option("--epochs", type=int, default=_DEFAULTS.epochs, show_default=True)
@optimization_options
@click.option("--policy", default=_DEFAULTS.policy, show_default=True,
              help="Per-batch policy (see `subsetsel list`; docs/online.md).")
@click.option("--beta", type=float, help="sb, stale-sb: P(select) = percentile^beta [3].")
@click.option("--history", type=int, help="sb, stale-sb: recent losses kept [1024].")
@click.option("--floor", type=float, help="sb, stale-sb: minimum selection probability [0].")
@click.option("--staleness", type=int, help="stale-sb [2], sb [1]: epochs a loss is reused.")
@click.option("--keep", type=float, help="sb-keep [0.5], random-keep [0.25]: share backpropagated.")
@click.option("--keep-start", type=float, help="sb-keep [0.5], random-keep [0]: active from.")
@click.option("--keep-end", type=float, help="sb-keep [0.9], random-keep [1]: active until.")
@click.option("--interrupt", type=int, help="sb-keep [2], random-keep [0]: every n-th normal.")
@click.option("--keep-scale", type=float, help="sb-keep: image scale of the selection forward.")
@click.option("--accumulate/--no-accumulate", default=None,
              help="random-keep: gather kept examples into full batches [accumulate].")
@click.option("--presample", type=float, help="is, is-uniform: presample B = presample*b [3].")
@click.option("--score", type=click.Choice(["gnorm", "loss", "gradnorm"]),
              help="is: importance score [gnorm].")
@click.option("--tau-th", type=float, help="is: switch threshold [(B+3b)/(3b)]; 0 always on.")
@click.option("--echo", type=float, help="echo: factor >= 1, fractional allowed [2].")
@click.option("--echo-mode",
              type=click.Choice(["example-before-aug", "example-after-aug", "batch"]),
              help="echo: where to echo [example-before-aug].")
@click.option("--shuffle-buffer", type=int, help="echo: shuffle buffer examples [8*batch].")
@click.option("--lam", type=float, help="gradmatch [0.5], gradmatchpb [0]: OMP ridge weight.")
@click.option("--eps", type=float, help="gradmatch*: OMP relative residual tolerance [1e-6].")
@click.option("--valid", is_flag=True, default=None,
              help="gradmatch*: match the gradient of a held-out validation split.")
@click.option("--per-gradient", is_flag=True, default=None,
              help="gradmatch: match only each class's own slice of the gradient.")
@click.option("--picks-per-step", type=click.IntRange(min=1),
              help="gradmatch*: atoms added per OMP step [ceil(budget/32)]; 1: one at a time.")
@click.option("--eval-every", type=int, default=_DEFAULTS.eval_every, show_default=True,
              help="Epochs between test evaluations (0: after the last epoch only).")
@click.option("--slow-input", type=float, default=_DEFAULTS.slow_input, show_default=True,
              help="Simulated input cost, seconds per batch of fresh examples read.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Run directory for log.jsonl, checkpoint and summary (default runs/NAME).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue an interrupted run from its directory (other options are ignored).")
@click.option("--save-selections", metavar="PATH",
              help="Selection file to write (bare names go under selections/; default "
                   "selections/NAME.h5 for strategies that select).")
@click.option("--replay", metavar="PATH",
              help="Replay the rounds of this selection file instead of selecting "
                   "(Cached-Grad-Match); rounds map to epochs by relative progress; --epochs "
                   "defaults to the file's.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@threads_option
@one_line_errors
def train(
    out_dir: str | None, resume_dir: str | None, save_selections: str | None, quiet: bool,
    as_json: bool, **options: object,
) -> None:
    """Train a model on weighted subsets chosen by a selection strategy."""
    from subsetsel.run import default_run_name, load_run_config, run
    from subsetsel.store import find_existing, resolve_path

    selecting = click.get_current_context().command.name == "select"

    if resume_dir is not None:
        config = load_run_config(resume_dir)
        out = Path(resume_dir)
    else:
        options = _with_policy_params(options)
        grad = {k: options.pop(k) for k in ("lam", "eps", "valid", "per_gradient",
                                            "picks_per_step")}
        options["strategy_params"] = _strategy_params(str(options["strategy"]), grad)
        config = TrainConfig(**options)  # type: ignore[arg-type]
        config.validate()
        if selecting:
            if config.strategy == "full" or config.replay is not None:
                raise click.UsageError("select needs a selecting --strategy and no --replay")
            config.eval_every = 0
        if config.replay is not None:
            config.replay = str(find_existing(config.replay))
            ctx = click.get_current_context()
            if ctx.get_parameter_source("epochs") is click.core.ParameterSource.DEFAULT:
                from subsetsel.store import SelectionStore

                config.epochs = SelectionStore.open(config.replay).metadata.epochs
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


_POLICY_OPTIONS = (
    "beta", "history", "floor", "staleness", "keep", "keep_start", "keep_end", "interrupt",
    "keep_scale", "accumulate", "presample", "score", "tau_th", "echo", "echo_mode",
    "shuffle_buffer",
)


def _with_policy_params(options: dict[str, object]) -> dict[str, object]:
    """Move the given per-policy options into `policy_params` (`--echo` alone selects the echo
    policy); an option the chosen policy does not take is a usage error."""

    from subsetsel.online.base import POLICIES, policy_names

    options = dict(options)
    params = {k: options.pop(k) for k in _POLICY_OPTIONS}
    params = {k: v for k, v in params.items() if v is not None}
    if "echo" in params and options["policy"] == "plain":
        options["policy"] = "echo"
    policy = str(options["policy"])
    if policy in policy_names():
        _refuse_inapplicable(params, POLICIES.get(policy), f"--policy {policy}")
    return {**options, "policy_params": params}


select = click.Command(
    "select",
    callback=train.callback,
    params=list(train.params),
    help="Run a selecting strategy and save its selection schedule, without the per-epoch test "
    "evaluation (one evaluation at the end). Same options as `train`.",
)


def _strategy_params(strategy: str, given: dict[str, object]) -> dict[str, object]:
    """The strategy options given; one the strategy does not take is a usage error."""
    from subsetsel.selection.base import STRATEGIES, strategy_names

    params = {k: v for k, v in given.items() if v is not None}
    if strategy in strategy_names():
        _refuse_inapplicable(params, STRATEGIES.get(strategy), f"--strategy {strategy}")
    return params


def _refuse_inapplicable(params: dict[str, object], cls: type, chosen: str) -> None:
    """A usage error for an option that is not a field of the chosen strategy/policy class."""
    from dataclasses import fields

    taken = {f.name for f in fields(cls)}
    for key in params:
        if key not in taken:
            raise click.UsageError(f"--{key.replace('_', '-')} does not apply to {chosen}")
