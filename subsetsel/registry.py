"""One registry for everything created by name: strategies, policies, models, datasets,
optimizers and schedules (`subsetsel list` prints them all)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from subsetsel.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind.

    kind: what the names are ("strategy", "model", ...), used in messages.
    load: imports the modules whose decorators fill the registry (called before every lookup,
    so a registry is complete however the package was imported).
    """

    def __init__(self, kind: str, load: Callable[[], Any] | None = None) -> None:
        self.kind = kind
        self._load = load
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: register under `name` (default: the object's `name` attribute)."""

        def add(obj: T) -> T:
            self.add(name if name is not None else obj.name, obj)  # type: ignore[attr-defined]
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        self._items[name] = obj

    def _loaded(self) -> dict[str, T]:
        if self._load is not None:
            self._load()
        return self._items

    def names(self) -> list[str]:
        return sorted(self._loaded())

    def __contains__(self, name: object) -> bool:
        return name in self._loaded()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The object registered as `name`; UnknownNameError listing the valid names."""
        items = self._loaded()
        if name not in items:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(items))}"
            )
        return items[name]

    def check(self, name: str) -> None:
        """UnknownNameError unless `name` is registered."""
        self.get(name)


def create_dataclass(cls: type[T], params: dict[str, Any]) -> T:
    """Build a dataclass from the params it declares (None values and other keys are ignored)."""
    accepted = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in params.items() if k in accepted and v is not None})
