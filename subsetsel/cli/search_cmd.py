"""`subsetsel search`: hyperparameter search in which every trial replays one selection file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from subsetsel.cli.errors import one_line_errors
from subsetsel.cli.options import FLOAT, MAX_THREADS, threads_option
from subsetsel.train import LOADERS, TrainConfig

if TYPE_CHECKING:
    from subsetsel.store import SelectionStore

_DEFAULTS = TrainConfig()
# base training options that default to the selection file's run config, then to TrainConfig's
INHERITED = (
    "dataset", "data_root", "train_size", "test_size", "model", "epochs", "batch_size",
    "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "seed", "data_seed",
    "loader", "workers", "image_size", "amp", "channels_last",
)


@click.command("search")
@click.option("--selections", metavar="FILE",
              help="Selection file every trial replays (a bare name is looked up in "
                   "selections/, with .h5 added).")
@click.option("--full-data", is_flag=True,
              help="Train every trial on the full data instead (the reference search).")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUES",
              help="A searched option, repeatable: lr=log:1e-3:1e-1 (log range), "
                   "momentum=0.8:0.99 (range), optimizer=sgd,adam (choices). Names: lr, "
                   "weight_decay, momentum, batch_size, epochs, optimizer, schedule, model. "
                   "Default (none given): lr=log:LR/10:10*LR and weight_decay=0,5e-5,5e-4 "
                   "around the base --lr LR; with --sampler grid lr=LR*(0.1,0.3,1,3,10) and "
                   "weight_decay=0,5e-4 (10 configurations).")
@click.option("--sampler", type=click.Choice(["grid", "random", "tpe"]), default="tpe",
              show_default=True)
@click.option("--trials", type=int,
              help="Trials to finish (COMPLETE or PRUNED; failed trials do not count and are "
                   "retried once by the next run of the command). Default: the grid size for "
                   "grid, else 20. Raise it and run again to extend a search.")
@click.option("--study-name", help="Default: <selection file stem>-<sampler>, or "
                                   "full-<dataset>-<sampler>.")
@click.option("--storage", metavar="URL",
              help="SQLAlchemy URL of the study (default sqlite:///<out>/study.db); a shared "
                   "database (e.g. postgresql://...) lets several machines join one study.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Output folder: trials/<number>/, results.csv/json (default search/<name>).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Parallel worker processes on this machine (each uses --threads).")
@click.option("--pruner", type=click.Choice(["none", "median", "halving", "hyperband"]),
              default="none", show_default=True,
              help="Stop unpromising trials early on their per-epoch test accuracy.")
@click.option("--eval-every", type=int,
              help="Epochs between test evaluations of a trial (0: after the last epoch only). "
                   "Default: 1 with a pruner, else 0 (the objective is the final accuracy).")
@click.option("--heartbeat", type=int, default=15, show_default=True,
              help="Seconds between trial heartbeats; a trial silent for 4 beats is failed and "
                   "retried.")
@click.option("--reference", "reference_dir", type=click.Path(file_okay=False),
              help="Run folder of a full-data `subsetsel train` run: adds each trial's speedup.")
@click.option("--retrain-best", is_flag=True,
              help="Finally train the best configuration on the full data (<out>/best-full).")
@click.option("--dataset", help="Base training options below default to the selection file's "
                                "run config, else to `subsetsel train`'s defaults.")
@click.option("--data-root")
@click.option("--loader", type=click.Choice(LOADERS),
              help="tensor, dataloader or auto (as for `train`).")
@click.option("--data-workers", "data_workers", type=click.IntRange(min=0, max=MAX_THREADS),
              help="DataLoader worker processes of each trial (train's --workers).")
@click.option("--image-size", type=click.IntRange(min=8), help="folder: datasets.")
@click.option("--train-size", type=int)
@click.option("--test-size", type=int)
@click.option("--model")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--optimizer")
@click.option("--lr", type=FLOAT)
@click.option("--momentum", type=FLOAT)
@click.option("--nesterov/--no-nesterov", default=None)
@click.option("--weight-decay", type=FLOAT)
@click.option("--schedule")
@click.option("--seed", type=int, help="Seeds training and the sampler.")
@click.option("--data-seed", type=int, help="Seed of the data (default: the selection file's).")
@click.option("--device", default=_DEFAULTS.device, show_default=True)
@click.option("--slow-input", type=FLOAT, default=0.0, show_default=True,
              help="Simulated upstream cost, seconds per batch of fresh examples.")
@click.option("--quiet", is_flag=True, help="No per-trial progress lines.")
@threads_option
@one_line_errors
def search(**kwargs: Any) -> None:
    """Search hyperparameters with Optuna; every trial replays one selection file (no
    selection cost). Interrupted searches resume when run again with the same options; failed
    trials are retried once per run. Exit code 1 when every trial failed."""
    from subsetsel.search import SearchError

    try:
        _search(**kwargs)
    except SearchError as err:
        raise click.ClickException(str(err)) from None


def _search(
    selections: str | None, full_data: bool, params: tuple[str, ...], sampler: str,
    trials: int | None, study_name: str | None, storage: str | None, out_dir: str | None,
    workers: int, pruner: str, eval_every: int | None, heartbeat: int,
    reference_dir: str | None, retrain_best: bool, quiet: bool, device: str, slow_input: float,
    **options: Any,
) -> None:
    import torch

    from subsetsel.search import (
        DEFAULT_TRIALS,
        Reference,
        SearchSettings,
        default_space,
        failure_summary,
        grid_size,
        hide_password,
        new_session,
        parse_space,
        preflight,
        results,
        run_search,
        speedup_note,
        write_results,
    )
    from subsetsel.search import retrain_best as do_retrain

    if (selections is None) == (not full_data):
        raise click.UsageError("give exactly one of --selections FILE and --full-data")
    if retrain_best and full_data:
        raise click.UsageError("--retrain-best needs --selections (a full-data search already "
                               "trained on the full data)")
    if eval_every is None:
        eval_every = 0 if pruner == "none" else 1
    if eval_every < 0:
        raise click.UsageError(f"--eval-every must be >= 0, got {eval_every}")
    if pruner != "none" and eval_every == 0:
        raise click.UsageError(f"--pruner {pruner} needs per-epoch accuracies: --eval-every >= 1")
    space = parse_space(params) if params else None
    base, store = _base_config(selections, options, device, slow_input, eval_every)
    if space is None:
        space = default_space(base.lr, sampler)
    if trials is None:
        trials = grid_size(space) if sampler == "grid" else DEFAULT_TRIALS
    name = study_name or _default_name(base, selections, sampler)
    out = Path(out_dir) if out_dir else Path("search") / name
    url = storage or f"sqlite:///{out.resolve() / 'study.db'}"
    settings = SearchSettings(
        space=space, base=base, out_dir=out.resolve(), storage=url, study_name=name,
        sampler=sampler, n_trials=trials, seed=base.seed, pruner=pruner, workers=workers,
        heartbeat=heartbeat, selection_id=_identity(store), quiet=quiet,
        threads=torch.get_num_threads(),  # --threads, applied by its callback
        session=new_session(),
    )
    dataset = preflight(settings, store)
    reference = Reference.load(reference_dir, len(dataset)) if reference_dir else None
    study = run_search(settings, dataset=dataset)
    rows = results(study, space, reference)
    best = next((r for r in rows if r["state"] == "COMPLETE"), None)
    meta: dict[str, Any] = {
        "study_name": name,
        "storage": hide_password(url),
        "selections": base.replay,
        "sampler": sampler,
        "space": [str(p) for p in space],
        "n_trials": trials,
        "objective": "final test accuracy (maximised)",
        "train_seconds": "select + train wall seconds of the trial (eval excluded)",
        "speedup": speedup_note(reference),
        "reference": None if reference is None else vars(reference),
        "best_trial": None if best is None else best["trial"],
    }
    failed = failure_summary(study, settings.session)
    if failed is not None:
        write_results(out, rows, meta)
        raise click.ClickException(f"{failed}; fix it and run the command again (failed "
                                   "trials are retried)")
    if retrain_best and best is not None:
        best_params = {p.name: best[p.name] for p in space}
        if not quiet:
            click.echo(f"retraining trial {best['trial']}'s configuration on the full data",
                       err=True)
        summary = do_retrain(settings, best_params, out / "best-full", dataset=dataset)
        meta["retrain_best"] = {
            "params": best_params, "run_dir": str(out / "best-full"),
            "final_acc": summary["final_acc"], "best_acc": summary["best_acc"],
            "train_seconds": summary["elapsed_seconds"],
        }
    csv_path, json_path = write_results(out, rows, meta)
    _print(rows, space, meta, reference, csv_path, json_path)
    failures = sum(r["state"] == "FAIL" for r in rows)
    if failures:
        click.echo(f"{failures} configuration(s) failed (state FAIL, error in results.csv); run "
                   "the command again to retry them", err=True)


def _base_config(
    selections: str | None, options: dict[str, Any], device: str, slow_input: float,
    eval_every: int,
) -> tuple[TrainConfig, SelectionStore | None]:
    """Base TrainConfig of every trial and the opened selection file (None: full data)."""
    from subsetsel.store import SelectionStore, find_existing

    values = {k: v for k, v in options.items() if v is not None}
    if "data_workers" in values:
        values["workers"] = values.pop("data_workers")
    values.pop("data_workers", None)
    store = None
    replay = None
    if selections is not None:
        store = SelectionStore.open(find_existing(selections))
        stored = store.metadata.config
        for key in INHERITED:
            if key not in values and stored.get(key) is not None:
                values[key] = stored[key]
        replay = str(store.path.resolve())
    base = TrainConfig(
        **values, device=device, slow_input=slow_input, replay=replay, eval_every=eval_every,
        strategy="random" if replay else "full",
    )
    base.validate()
    return base, store


def _identity(store: SelectionStore | None) -> dict[str, Any]:
    """What identifies a selection file across machines (its path may differ)."""
    if store is None:
        return {}
    meta = store.metadata
    return {
        "fingerprint": meta.fingerprint, "created": meta.created, "strategy": meta.strategy,
        "rounds": len(store.rounds), "dataset_size": meta.dataset_size,
    }


def _default_name(base: TrainConfig, selections: str | None, sampler: str) -> str:
    if base.replay is not None and selections is not None:
        return f"{Path(base.replay).stem}-{sampler}"
    dataset = base.dataset.replace(":", "-").replace("/", "_")
    return f"full-{dataset}-{sampler}"


def _print(
    rows: list[dict[str, Any]], space: Any, meta: dict[str, Any], reference: Any,
    csv_path: Path, json_path: Path,
) -> None:
    from subsetsel.search import format_table

    click.echo(f"study {meta['study_name']}: {len(rows)} trials, best first; "
               "acc = final test accuracy, train_s = training seconds")
    click.echo(meta["speedup"])
    click.echo(format_table(rows, space))
    if "retrain_best" in meta:
        r = meta["retrain_best"]
        click.echo(f"best configuration retrained on full data: acc {r['final_acc']:.4f}, "
                   f"{r['train_seconds']:.1f} s ({r['run_dir']})")
    click.echo(f"results: {csv_path} {json_path}")
    if reference is not None and reference.final_acc is not None:
        click.echo(f"reference full-data run: acc {reference.final_acc:.4f}, "
                   f"{reference.elapsed_seconds:.1f} s")
