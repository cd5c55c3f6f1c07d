"""The one place where a console script turns a user error into one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

from fact_lightning.errors import EXIT_USER_ERROR, USER_ERRORS

T = TypeVar("T")


def one_line(err: BaseException) -> str:
    """The error's message on one line (OSError's ``[Errno N] text: 'path'`` included)."""
    return " ".join(str(err).split()) or type(err).__name__


def guarded(fn: Callable[..., T], also: tuple[type[BaseException], ...] = ()) -> Callable[..., T]:
    """Runs ``fn``; a user error (or one of ``also``) prints ``error: ...`` on stderr and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (*USER_ERRORS, *also) as err:
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper
