"""`subsetsel train` and `select`: train on a schedule of weighted subsets, save selections."""

from __future__ import annotations

import json
from pathlib import Path

import click

from subsetsel.cli.errors import one_line_errors
from subsetsel.cli.launch import launch
from subsetsel.cli.options import FLOAT, data_options, optimization_options, threads_option
from subsetsel.cli.params import options_for, refuse_inapplicable, take
from subsetsel.online.base import POLICIES
from subsetsel.selection.base import STRATEGIES, fixed_settings
from subsetsel.train import TrainConfig

_DEFAULTS = TrainConfig()
STRATEGY_FIELDS, strategy_options = options_for(STRATEGIES, "strategy")
POLICY_FIELDS, policy_options = options_for(POLICIES, "policy")


@click.command("train")
@data_options
@click.option("--strategy", default=_DEFAULTS.strategy, show_default=True,
              help="Selection strategy (see `subsetsel list`).")
@click.option("--fraction", type=FLOAT, default=_DEFAULTS.fraction, show_default=True,
              help="Subset size as a share of the training set, in (0, 1].")
@click.option("--select-every", type=click.IntRange(min=1), default=_DEFAULTS.select_every,
              show_default=True,
              help="Re-select every R epochs (infobatch selects every epoch: 1).")
@click.option("--warm-start", type=FLOAT, default=_DEFAULTS.warm_start, show_default=True,
              help="Kappa: ceil(kappa*epochs*fraction) full-data epochs first, compute matched.")
@click.option("--epochs", type=click.IntRange(min=1), default=_DEFAULTS.epochs,
              show_default=True)
@optimization_options
@click.option("--lr-per-step", is_flag=True, default=_DEFAULTS.lr_per_step,
              help="Set the learning rate before every step from the progress in epochs "
                   "(epoch + step/steps_in_epoch) instead of once per epoch; follows epochs "
                   "whose length changes (infobatch).")
@click.option("--policy", default=_DEFAULTS.policy, show_default=True,
              help="Per-batch policy (see `subsetsel list`; docs/online.md).")
@strategy_options
@policy_options
@click.option("--eval-every", type=click.IntRange(min=0), default=_DEFAULTS.eval_every,
              show_default=True,
              help="Epochs between test evaluations (0: after the last epoch only).")
@click.option("--slow-input", type=FLOAT, default=_DEFAULTS.slow_input, show_default=True,
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
@click.option("--allow-incomplete", is_flag=True,
              help="Replay a selection file whose run stopped early, over the epochs it covers.")
@click.option("--sync-bn", is_flag=True, default=_DEFAULTS.sync_bn,
              help="torch.distributed on CUDA: SyncBatchNorm across ranks instead of BatchNorm "
                   "(no effect in one process).")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Start this many processes on this machine with torchrun's launcher "
                   "(torch.distributed: DDP training, sharded selection).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@threads_option
@one_line_errors
def train(
    out_dir: str | None, resume_dir: str | None, save_selections: str | None, quiet: bool,
    as_json: bool, nproc: int | None, **options: object,
) -> None:
    """Train a model on weighted subsets chosen by a selection strategy."""
    ctx = click.get_current_context()
    if options.get("sync_bn"):
        from subsetsel.train import resolve_device

        if resolve_device(str(options["device"])).type != "cuda":
            raise click.UsageError("--sync-bn needs CUDA devices (torch's SyncBatchNorm); this "
                                   f"run's --device {options['device']} is not")
    if nproc is not None:
        launch(ctx.command.name or "train", nproc)
        return
    from subsetsel.engine import dist
    from subsetsel.engine.files import claim, release
    from subsetsel.run import default_run_name, load_run_config, run
    from subsetsel.store import find_existing, resolve_path
    from subsetsel.train import resolve_device

    selecting = ctx.command.name == "select"
    group = dist.Dist.local()
    if resume_dir is not None:
        config = load_run_config(resume_dir)
        out = Path(resume_dir)
    else:
        config = _config(options, ctx)
        config.validate()
        if selecting:
            if config.strategy == "full" or config.replay is not None:
                raise click.UsageError("select needs a selecting --strategy and no --replay")
            config.eval_every = 0
        if config.replay is not None:
            config.replay = str(find_existing(config.replay))
            if ctx.get_parameter_source("epochs") is click.core.ParameterSource.DEFAULT:
                from subsetsel.store import SelectionStore

                config.epochs = SelectionStore.open(config.replay).metadata.epochs
        group = dist.init(resolve_device(config.device))
        if group.main:  # rank 0 names and claims the run folder; the others are told
            name = default_run_name(config)
            out = claim(Path(out_dir), unique=False) if out_dir else claim(
                Path("runs") / name, unique=True)
            if save_selections:
                config.save_selections = str(resolve_path(save_selections))
            elif config.strategy != "full" and config.replay is None:
                config.save_selections = str(resolve_path(out.name))
        out, config.save_selections = group.broadcast_object(
            (out if group.main else None, config.save_selections))
    try:
        summary = run(config, out, resume=resume_dir is not None, claimed=resume_dir is None,
                      progress=not quiet)
    except BaseException:
        if resume_dir is None and group.main:
            release(out)  # refused before it started: the folder is free again
        raise
    group = dist.init(resolve_device(config.device))
    dist.shutdown()
    if not group.main:
        return
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    final, best = summary["final_acc"], summary["best_acc"]
    accuracy = "no test split" if final is None else (
        f"final test accuracy {final:.4f} (best {best:.4f})")
    click.echo(
        f"{accuracy} | {summary['epochs']} epochs | {summary['elapsed_seconds']:.1f} s "
        f"(selection {summary['select_seconds']:.1f} s)"
    )
    click.echo(f"log: {out / 'log.jsonl'}")
    if config.save_selections:
        click.echo(f"selections: {config.save_selections}")


def _config(options: dict[str, object], ctx: click.Context) -> TrainConfig:
    """The TrainConfig of the given options; strategy and policy options that do not apply to
    the chosen strategy / policy (or to a replay) are usage errors."""
    options = dict(options)
    strategy_params = take(options, STRATEGY_FIELDS)
    policy_params = take(options, POLICY_FIELDS)
    if "echo" in policy_params and options["policy"] == "plain":
        options["policy"] = "echo"  # --echo alone selects data echoing
    if options.get("replay") is not None:
        explicit = [f"--{name.replace('_', '-')}"
                    for name in ("strategy", "fraction", "select_every", "warm_start")
                    if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        explicit += [f"--{k.replace('_', '-')}" for k in strategy_params]
        if explicit:
            raise click.UsageError(f"{explicit[0]} does not apply to --replay (the file's "
                                   "rounds are replayed as stored)")
    strategy, policy = str(options["strategy"]), str(options["policy"])
    if strategy in STRATEGIES:
        cls = STRATEGIES.get(strategy)
        refuse_inapplicable(strategy_params, cls, f"--strategy {strategy}")
        if options.get("replay") is None:  # settings the strategy decides itself
            given = {name: options[name] for name in cls.fixed}
            unset = {name: value for name, value in given.items()  # an explicit value is asked
                     if ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT}
            try:
                options.update(fixed_settings(strategy, given, unset))
            except ValueError as err:
                raise click.UsageError(str(err)) from None
    if policy in POLICIES:
        refuse_inapplicable(policy_params, POLICIES.get(policy), f"--policy {policy}")
    return TrainConfig(**options, strategy_params=strategy_params,  # type: ignore[arg-type]
                       policy_params=policy_params)


select = click.Command(
    "select",
    callback=train.callback,
    params=list(train.params),
    help="Run a selecting strategy and save its selection schedule, without the per-epoch test "
    "evaluation (one evaluation at the end). Same options as `train`.",
)
