"""Errors a user can cause and fix, and the one place where a command turns them into one line and exit 2.

Library code raises :class:`UserError` (or a subclass, or ``ValueError`` / ``OSError`` for a bad value or
a missing, unreadable or unwritable file); every console script runs its work through :func:`guarded`, so
the user reads ``error: <what and where>`` instead of a traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2

T = TypeVar("T")


class UserError(Exception):
    """Something the user can fix: a missing or damaged file, a bad option, data that does not fit."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (OSError's ``[Errno N] text: 'path'`` included)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def guarded(fn: Callable[..., T]) -> Callable[..., T]:
    """Runs ``fn``; a user error prints ``error: ...`` on stderr and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper
