"""The package's error vocabulary and its one-line formatting."""

from __future__ import annotations


class UnknownNameError(ValueError):
    """A registry was asked for a name it does not hold; the message lists the valid names."""


class NonFiniteError(ValueError):
    """A number that must be finite is NaN or infinite (an option, an input, a loss)."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss: the run stops (the message names epoch and step)."""


def first_line(err: BaseException) -> str:
    """An exception as one line: its message's first line, or its type name when empty."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
