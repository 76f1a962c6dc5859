"""`subsetsel inspect`: show a selection file's provenance and its rounds."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from subsetsel.cli.errors import one_line_errors

if TYPE_CHECKING:
    import torch

    from subsetsel.store import SelectionStore


@click.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option(
    "--class-balance",
    is_flag=True,
    help="Load the dataset named in the file's config (checked by fingerprint) and add per-round "
    "class counts.",
)
@one_line_errors
def inspect_command(file: str, as_json: bool, class_balance: bool) -> None:
    """Show the metadata and per-round statistics of selection FILE.

    A bare name is looked up in selections/ with ".h5" added: `subsetsel inspect gm10` reads
    selections/gm10.h5.
    """
    from subsetsel.store import SelectionStore, find_existing, summarize

    store = SelectionStore.open(find_existing(file))
    labels = _labels(store) if class_balance else None
    summary = summarize(store, labels)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_summary(summary))


def _labels(store: SelectionStore) -> torch.Tensor:
    """Train labels of the dataset in the file's config, after checking its fingerprint."""
    from subsetsel.data import load_dataset

    config = store.metadata.config
    if "dataset" not in config or "seed" not in config:
        raise click.UsageError(
            f"{store.path}: its config names no dataset/seed, so --class-balance cannot load it"
        )
    dataset = load_dataset(
        config["dataset"],
        root=config.get("data_root"),
        seed=config.get("data_seed", config["seed"]),
        train_size=config.get("train_size"),
        test_size=config.get("test_size"),
        loader="dataloader" if str(config["dataset"]).startswith("folder:") else "tensor",
        workers=0,
        labels_only=True,
    )
    store.check_compatible(
        fingerprint=dataset.fingerprint(), dataset_size=len(dataset), dataset=config["dataset"]
    )
    return dataset.labels()


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable report: a metadata header, warnings (an incomplete file) and a table
    of rounds."""
    meta = summary["metadata"]
    n = meta["dataset_size"]
    params = ", ".join(f"{k}={v}" for k, v in sorted(meta["strategy_params"].items()))
    lines = [
        f"{summary['path']}",
        f"  dataset   {meta['dataset']}  N={n}  classes={meta['num_classes']}  "
        f"fingerprint={meta['fingerprint'][:16]}",
        f"  strategy  {meta['strategy']}" + (f"  ({params})" if params else ""),
        f"  model     {meta['model']}  seed={meta['seed']}  epochs={meta['epochs']}",
        f"  created   {meta['created']}  subsetsel {meta['package_version']}  "
        f"format {meta['format_version']}" + (f"  id {meta['file_id']}" if meta["file_id"] else ""),
        f"  rounds    {len(summary['rounds'])}",
    ]
    lines += [f"  {warning}" for warning in summary["warnings"]]
    rows = summary["rounds"]
    if not rows:
        return "\n".join(lines)
    balance = "class_counts" in rows[0]
    batches = any(r["batches"] is not None for r in rows)
    header = ["round", "epoch", "size", "% of N", "sel s", "w min", "w mean", "w max"]
    header += ["jaccard", "kept"] + (["batches"] if batches else [])
    if balance:
        header += ["classes", "min/cls", "max/cls"]
    table = [header]
    for r in rows:
        cells = [
            str(r["round"]),
            str(r["epoch"]),
            str(r["size"]),
            f"{100 * r['fraction']:.1f}",
            f"{r['seconds']:.2f}",
            f"{r['weight_min']:.3g}",
            f"{r['weight_mean']:.3g}",
            f"{r['weight_max']:.3g}",
            _opt(r["jaccard_prev"]),
            _opt(r["overlap_prev"]),
        ]
        if batches:
            cells.append(_opt(r["batches"], "d"))
        if balance:
            counts = r["class_counts"]
            cells += [str(r["classes"]), str(min(counts)), str(max(counts))]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines.append("")
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.append("")
    lines.append("jaccard: indices shared with the previous round / indices in either")
    lines.append("kept: share of the previous round's indices selected again")
    return "\n".join(lines)


def _opt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)
