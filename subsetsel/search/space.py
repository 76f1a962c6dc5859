"""The search space: `--param` parsing, the grid size and the default space."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

# searchable TrainConfig fields -> value type
PARAM_TYPES: dict[str, type] = {
    "lr": float,
    "weight_decay": float,
    "momentum": float,
    "batch_size": int,
    "epochs": int,
    "optimizer": str,
    "schedule": str,
    "model": str,
}
# the default space (no --param): the learning rate around the base one, and weight decay
DEFAULT_LR_RANGE = (0.1, 10.0)  # random / tpe: log-uniform in [base lr / 10, base lr * 10]
DEFAULT_LR_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)  # grid: these multiples of the base lr
DEFAULT_WEIGHT_DECAYS = (0.0, 5e-5, 5e-4)  # random / tpe
DEFAULT_GRID_WEIGHT_DECAYS = (0.0, 5e-4)  # grid: the two ends only (10 configurations)


class SearchSpaceError(ValueError):
    """A --param is malformed, unknown or out of range (one line)."""


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig field: listed `choices`, or a range [low, high] (log-scaled if
    `log`). Integer fields get integer ranges."""

    name: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def suggest(self, trial: optuna.trial.Trial) -> Any:
        """This trial's value (drawn by the study's sampler)."""
        if not self.is_range:
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None
        if PARAM_TYPES[self.name] is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def __str__(self) -> str:
        if self.is_range:
            return f"{self.name}={'log:' if self.log else ''}{self.low:g}:{self.high:g}"
        return f"{self.name}=" + ",".join(fmt(v) for v in self.choices)


def fmt(value: Any) -> str:
    """A parameter value as the user would type it (floats in %g)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_param(text: str) -> Param:
    """Parse `name=v1,v2,...`, `name=LO:HI` or `name=log:LO:HI` (see docs/search.md)."""
    name, sep, spec = text.partition("=")
    name = name.strip().replace("-", "_")
    spec = spec.strip()
    if not sep or not name or not spec:
        raise SearchSpaceError(
            f"--param {text!r}: expected NAME=VALUES, e.g. lr=log:1e-3:1e-1 or optimizer=sgd,adam"
        )
    if name not in PARAM_TYPES:
        raise SearchSpaceError(
            f"--param {text!r}: unknown parameter {name!r}; valid: {', '.join(sorted(PARAM_TYPES))}"
        )
    typ = PARAM_TYPES[name]
    if ":" in spec:
        return _parse_range(text, name, typ, spec)
    items = [item.strip() for item in spec.split(",")]
    if any(not item for item in items):
        raise SearchSpaceError(f"--param {text!r}: empty value in the list")
    values = tuple(_check_value(text, name, _convert(text, typ, item)) for item in items)
    if len(set(values)) != len(values):
        raise SearchSpaceError(f"--param {text!r}: a value is listed twice")
    return Param(name, choices=values)


def _parse_range(text: str, name: str, typ: type, spec: str) -> Param:
    parts = spec.split(":")
    log = parts[0].strip().lower() == "log"
    if log:
        parts = parts[1:]
    if typ is str:
        raise SearchSpaceError(f"--param {text!r}: {name} takes a list of names, not a range")
    if len(parts) != 2:
        raise SearchSpaceError(f"--param {text!r}: a range is LO:HI or log:LO:HI")
    low, high = (_check_value(text, name, _convert(text, typ, p.strip())) for p in parts)
    if not low < high:
        raise SearchSpaceError(f"--param {text!r}: range needs LO < HI, got {low} and {high}")
    if log and low <= 0:
        raise SearchSpaceError(f"--param {text!r}: a log range needs LO > 0, got {low}")
    return Param(name, low=low, high=high, log=log)


def _convert(text: str, typ: type, item: str) -> Any:
    if typ is str:
        return item
    try:
        value = typ(item)
    except ValueError:
        kind = "an integer" if typ is int else "a number"
        raise SearchSpaceError(f"--param {text!r}: {item!r} is not {kind}") from None
    if typ is float and not math.isfinite(value):
        raise SearchSpaceError(f"--param {text!r}: {item!r} is not a finite number")
    return value


def _check_value(text: str, name: str, value: Any) -> Any:
    """Range-check one value the way TrainConfig / the registries would."""
    problem = None
    if name == "lr" and value <= 0:
        problem = f"lr must be > 0, got {value:g}"
    elif name == "weight_decay" and value < 0:
        problem = f"weight_decay must be >= 0, got {value:g}"
    elif name == "momentum" and not 0 <= value < 1:
        problem = f"momentum must be in [0, 1), got {value:g}"
    elif name in ("batch_size", "epochs") and value < 1:
        problem = f"{name} must be >= 1, got {value}"
    elif name in ("optimizer", "schedule", "model"):
        valid = _names(name)
        if value not in valid:
            problem = f"unknown {name} {value!r}; valid: {', '.join(valid)}"
    if problem:
        raise SearchSpaceError(f"--param {text!r}: {problem}")
    return value


def _names(kind: str) -> list[str]:
    from subsetsel.optim import OPTIMIZERS, SCHEDULES

    if kind == "optimizer":
        return list(OPTIMIZERS)
    if kind == "schedule":
        return list(SCHEDULES)
    from subsetsel.models import model_names

    return model_names()


def parse_space(texts: Sequence[str]) -> tuple[Param, ...]:
    """All --param options; refuses an empty list (see `default_space`), a parameter given twice
    and a space of single values."""
    if not texts:
        raise SearchSpaceError(
            "empty search space: give at least one --param, e.g. --param lr=log:1e-3:1e-1"
        )
    params = tuple(parse_param(t) for t in texts)
    names = [p.name for p in params]
    for name in names:
        if names.count(name) > 1:
            raise SearchSpaceError(f"--param {name} is given more than once")
    if all(not p.is_range and len(p.choices) == 1 for p in params):
        raise SearchSpaceError("empty search space: every --param has a single value")
    return params


def default_space(base_lr: float, sampler: str) -> tuple[Param, ...]:
    """The space searched when no --param is given, around the base learning rate `base_lr`.

    random / tpe: lr log-uniform in [base_lr / 10, 10 * base_lr] and weight_decay in
    {0, 5e-5, 5e-4}. grid: lr in {0.1, 0.3, 1, 3, 10} * base_lr and weight_decay in {0, 5e-4}
    (10 configurations). Multiples are rounded to 3 significant digits. Why these: the learning
    rate matters most and acts multiplicatively; on a replayed 10 % subset (a tenth of the
    steps) the best rate is about 3x the full-data one and 10x still trains (docs/search.md).
    """
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise SearchSpaceError(f"the default search space needs a base lr > 0, got {base_lr}")
    if sampler == "grid":
        lrs = tuple(_round(base_lr * m) for m in DEFAULT_LR_GRID)
        return (Param("lr", choices=lrs), Param("weight_decay", choices=DEFAULT_GRID_WEIGHT_DECAYS))
    low, high = (_round(base_lr * m) for m in DEFAULT_LR_RANGE)
    return (Param("lr", low=low, high=high, log=True),
            Param("weight_decay", choices=DEFAULT_WEIGHT_DECAYS))


def _round(value: float) -> float:
    return float(f"{value:.3g}")


def grid_size(space: Sequence[Param]) -> int:
    """Number of configurations of an all-choices space (SearchSpaceError if it holds a range)."""
    size = 1
    for p in space:
        if p.is_range:
            raise SearchSpaceError(
                f"--sampler grid needs listed values, but --param {p} is a range "
                f"(list values instead, e.g. {p.name}=a,b,c)"
            )
        size *= len(p.choices)
    return size


def grid_points(space: Sequence[Param]) -> list[dict[str, Any]]:
    """Every configuration of an all-choices space, in the order of the listed values."""
    points: list[dict[str, Any]] = [{}]
    grid_size(space)
    for p in space:
        points = [{**point, p.name: value} for point in points for value in p.choices]
    return points
