"""The `subsetsel` command line: one click group, one module per command."""

from __future__ import annotations

import click

from subsetsel import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="subsetsel")
def main() -> None:
    """Train PyTorch models on well-chosen, weighted subsets of the data."""


def _register() -> None:
    from subsetsel.cli.inspect_cmd import inspect_command
    from subsetsel.cli.list_cmd import list_command
    from subsetsel.cli.onepass_cmd import onepass
    from subsetsel.cli.report_cmd import report_command
    from subsetsel.cli.search_cmd import search
    from subsetsel.cli.train_cmd import select, train

    main.add_command(train)
    main.add_command(select)
    main.add_command(list_command)
    main.add_command(inspect_command)
    main.add_command(onepass)
    main.add_command(report_command)
    main.add_command(search)


_register()
