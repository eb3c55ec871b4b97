"""What every command shares: turning expected errors into one clear line and an exit status."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import click

from mec_hub.errors import MecHubError

F = TypeVar("F", bound=Callable[..., Any])


class UserError(click.ClickException):
    """Printed as ``Error: message`` with exit status 1, no traceback."""

    exit_code = 1


def friendly_errors(func: F) -> F:
    """Report mec_hub's errors (and unreadable files) as one line instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MecHubError as exc:
            raise UserError(str(exc)) from None
        except PermissionError as exc:
            raise UserError(f"permission denied: {exc.filename or exc}") from None

    return wrapper  # type: ignore[return-value]


def show_warnings_briefly() -> None:
    """Warnings (e.g. unverified weights) as ``Warning: ...`` lines on stderr, not source excerpts."""

    def _show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        click.secho(f"Warning: {message}", fg="yellow", err=True)

    warnings.showwarning = _show  # type: ignore[assignment]
