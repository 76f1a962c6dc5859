"""`subsetsel list`: everything that can be named on the command line."""

from __future__ import annotations

import json

import click


def registries() -> dict[str, list[str]]:
    """Name -> valid names, for datasets, models, strategies, policies, optimizers, schedules."""
    from subsetsel.data import dataset_names
    from subsetsel.models import model_names
    from subsetsel.online.base import policy_names
    from subsetsel.optim import OPTIMIZERS, SCHEDULES
    from subsetsel.selection.base import strategy_names

    return {
        "datasets": dataset_names(),
        "models": model_names(),
        "strategies": strategy_names(),
        "policies": policy_names(),
        "optimizers": list(OPTIMIZERS),
        "schedules": list(SCHEDULES),
    }


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_command(as_json: bool) -> None:
    """List datasets, models, strategies, policies, optimizers and schedules."""
    names = registries()
    if as_json:
        click.echo(json.dumps(names, indent=2))
        return
    for kind, values in names.items():
        click.echo(f"{kind}: {', '.join(values)}")
