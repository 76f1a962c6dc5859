"""Strategy and policy options generated from their dataclass fields: a new strategy or policy
(or a new field) reaches the command line without a CLI edit.

Every field of every registered strategy (except the shared `fraction` and `seed`) and policy
becomes `--field-name` (default unset: the class's own default applies). The help lists which
classes take it and their defaults; a field's metadata may add `help` and `choices`. An option
given for a strategy or policy that does not take it is refused.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from subsetsel.cli.options import FLOAT, group
from subsetsel.registry import Registry

SHARED = ("fraction", "seed")  # Strategy fields set by --fraction / --seed


Owner = tuple[str, dataclasses.Field, Any]  # (class name, field, resolved annotation)


def component_fields(registry: Registry[Any]) -> dict[str, list[Owner]]:
    """field name -> [(class name, field, annotation), ...] over the registry's classes."""
    out: dict[str, list[Owner]] = {}
    for name in registry.names():
        cls = registry.get(name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in SHARED or not f.init:
                continue
            out.setdefault(f.name, []).append((name, f, hints.get(f.name, f.type)))
    return out


def _base_type(annotation: Any) -> Any:
    """int / float / bool / str of an annotation like `float | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0] if args else str
    return annotation


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default) if isinstance(f.default, str) else str(f.default)
    return "-"


def options_for(registry: Registry[Any], kind: str) -> tuple[list[str], Callable[..., Any]]:
    """(field names, a decorator adding one option per field) for a registry's classes."""
    fields = component_fields(registry)
    decorators = []
    for name in sorted(fields):
        owners = fields[name]
        _, first, annotation = owners[0]
        typ = _base_type(annotation)
        meta_help = first.metadata.get("help", "")
        takers = ", ".join(f"{owner} [{_default_text(f)}]" for owner, f, _ in owners)
        text = f"{kind} {takers}" + (f": {meta_help}" if meta_help else ".")
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            decorators.append(click.option(f"{flag}/--no-{flag[2:]}", name, default=None,
                                           help=text))
            continue
        choices = first.metadata.get("choices")
        ptype: Any = click.Choice(list(choices)) if choices else {
            float: FLOAT, int: int, str: str}.get(typ, str)
        decorators.append(click.option(flag, name, type=ptype, default=None, help=text))
    return sorted(fields), group(*decorators)


def take(options: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Pop `names` out of `options`; return those that were given."""
    given = {k: options.pop(k) for k in names}
    return {k: v for k, v in given.items() if v is not None}


def refuse_inapplicable(params: dict[str, Any], cls: type, chosen: str) -> None:
    """A usage error for an option that is not a field of the chosen class."""
    taken = {f.name for f in dataclasses.fields(cls)}
    for key in params:
        if key not in taken:
            raise click.UsageError(f"--{key.replace('_', '-')} does not apply to {chosen}")
