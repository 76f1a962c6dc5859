"""`subsetsel report`: fixed-accuracy speedups, final accuracy and selection time of runs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from subsetsel.cli.errors import one_line_errors
from subsetsel.report import DEFAULT_TOLERANCE


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("--reference", "references", multiple=True, metavar="DIR",
              help="Reference run(s) to time against (repeat for several seeds; added to the "
                   "runs). Default: the full-data runs among RUN_DIRs.")
@click.option("--target", type=float, metavar="A",
              help="Target test accuracy, a fraction in (0, 1] (default: lowest final accuracy "
                   "of the reference's runs minus --tolerance).")
@click.option("--tolerance", type=float, default=DEFAULT_TOLERANCE, show_default=True,
              help="Accuracy below the reference's final accuracy that still counts "
                   "(0.01 = 1 point).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--csv", "csv_path", metavar="PATH", help="Also write one CSV row per method.")
@click.option("--plot", "plot_path", metavar="PATH",
              help="Also draw accuracy vs time and vs backprops (PNG, or format by extension).")
@one_line_errors
def report_command(
    run_dirs: tuple[str, ...], references: tuple[str, ...], target: float | None,
    tolerance: float, as_json: bool, csv_path: str | None, plot_path: str | None,
) -> None:
    """Compare runs written by `subsetsel train --out` / `subsetsel onepass --out`.

    \b
    Runs differing only in seed are one method: mean ± std over runs, n = runs.
    Labels: full, <strategy>[-warm]-f<fraction>, cached-<replayed strategy>...,
    +<policy>, onepass-<priority>-m<storage>-k<steps>; [field=value] tells apart
    methods that would share a label.
    Reference: full-data runs (strategy full, plain policy, not replayed) or --reference.
    A = lowest final accuracy of the reference's runs - --tolerance, or --target.
    Time to A: select+train seconds at the first logged epoch with accuracy >= A
    (no interpolation); mean over runs, shown only when every run reaches A.
    Speedup = reference time to A / method time to A; "speedup bp" and "speedup
    steps" compare examples backpropagated and optimizer steps instead of seconds
    (independent of machine load).
    select % = select seconds / select+train seconds. time/random = method time
    to A / time to A of the random runs with the same settings (randompb for
    gradmatchpb); < 1: selecting pays. Shown when such runs are given.
    See docs/report.md.
    """
    from subsetsel.report import (
        ReportError,
        RunDirError,
        build_report,
        format_table,
        plot_report,
        read_run,
        report_to_json,
        write_csv,
    )

    paths: dict[str, str] = {}  # resolved -> as given; first mention kept, references first
    for given in (*references, *run_dirs):
        paths.setdefault(str(Path(given).resolve()), given)
    cache: dict[str, object] = {}
    try:
        runs = [read_run(p, cache) for p in paths.values()]
    except RunDirError as err:
        raise click.ClickException(str(err)) from None
    try:
        report = build_report(runs, reference_paths=references, target=target,
                              tolerance=tolerance)
    except ReportError as err:
        raise click.UsageError(str(err)) from None
    if csv_path:
        write_csv(report, csv_path)
    if plot_path:
        plot_report(report, plot_path)
    if as_json:
        click.echo(json.dumps(report_to_json(report), indent=2))
    else:
        click.echo(format_table(report))
        for note in report.warnings:
            click.echo(f"warning: {note}", err=True)
        for kind, path in (("csv", csv_path), ("plot", plot_path)):
            if path:
                click.echo(f"{kind}: {path}")
