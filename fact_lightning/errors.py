"""Errors a user can cause and fix.

Library code raises :class:`UserError` (or a subclass, or ``ValueError`` / ``OSError`` for a bad value or
a missing, unreadable or unwritable file); every console script runs its work through
``fact_lightning.commands.cli_errors.guarded``, so the user reads ``error: <what and where>`` instead of a
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix: a missing or damaged file, a bad option, data that does not fit."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError)
