"""Shared error formatting."""

from __future__ import annotations


def first_line(err: BaseException) -> str:
    """An exception as one line: its message's first line, or its type name when empty."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
