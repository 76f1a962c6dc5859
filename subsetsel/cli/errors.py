"""Turn library exceptions into one-line click errors (exit 2 for usage, 1 for everything else)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from subsetsel.errors import DivergenceError, UnknownNameError, first_line

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(func: F) -> F:
    """Decorate a click command so known failures print one line instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from subsetsel.data import DataError, DatasetNotFoundError
        from subsetsel.engine.dist import DistributedError
        from subsetsel.engine.files import RunFileError
        from subsetsel.store import IncompatibleSelectionError, SelectionFileError

        try:
            return func(*args, **kwargs)
        except (DataError, DivergenceError, DistributedError, RunFileError) as err:  # not usage
            raise click.ClickException(first_line(err)) from None
        except (UnknownNameError, ValueError) as err:
            raise click.UsageError(first_line(err)) from None
        except (DatasetNotFoundError, SelectionFileError, IncompatibleSelectionError) as err:
            raise click.ClickException(first_line(err)) from None
        except (OSError, MemoryError, OverflowError) as err:
            raise click.ClickException(first_line(err)) from None

    return wrapper  # type: ignore[return-value]
