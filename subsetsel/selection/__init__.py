"""Selection strategies. Importing this package registers every built-in strategy."""

from subsetsel.selection import gradmatch, infobatch, random  # noqa: F401  (register the built-in strategies)
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
