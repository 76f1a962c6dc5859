"""Selection strategies. Importing this package registers every built-in strategy."""

from subsetsel.selection import random  # noqa: F401  (registers full, random, randompb)
from subsetsel.selection.base import (
    Selection,
    SelectionContext,
    Strategy,
    create_strategy,
    register_strategy,
    strategy_names,
)

__all__ = [
    "Selection",
    "SelectionContext",
    "Strategy",
    "create_strategy",
    "register_strategy",
    "strategy_names",
]
