"""The one place where a console script turns a user error into one line on stderr and exit status 2.

:func:`guarded` wraps a command's body (all four commands); :func:`run_app` runs a Typer app (fact-data,
fact-generate, fact-evaluate) so that what the parser refuses (a bad number, an unknown option, a missing
one) ends the same way, and so that SIGTERM and SIGHUP stop a run as Ctrl-C does: as an exception that every
``with`` block (an output folder being assembled) sees before the process exits.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from fact_lightning.errors import EXIT_USER_ERROR, USER_ERRORS

T = TypeVar("T")
_PYDANTIC_VALUE_ERROR = "Value error, "  # how Typer (through pydantic) prefixes a parser's ValueError


def one_line(err: BaseException) -> str:
    """The error's message on one line (OSError's ``[Errno N] text: 'path'`` included)."""
    return " ".join(str(err).split()) or type(err).__name__


def print_error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def guarded(fn: Callable[..., T], also: tuple[type[BaseException], ...] = ()) -> Callable[..., T]:
    """Runs ``fn``; a user error (or one of ``also``) prints ``error: ...`` on stderr and exits with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (*USER_ERRORS, *also) as err:
            print_error(one_line(err))
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper


class Stopped(SystemExit):
    """The run was stopped by a signal; exit status 128 + its number, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def signals_stop_the_run() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Stopped` in the main thread while the block runs (where they are not
    ignored already, as ``nohup`` ignores SIGHUP); Ctrl-C raises KeyboardInterrupt as always."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _click_exceptions():
    try:  # Typer >= 0.2x carries its own copy of click
        from typer._click import exceptions
    except ImportError:  # older Typer runs on click itself
        from click import exceptions
    return exceptions


def usage_message(err) -> str:
    """What the parser refused, on one line: ``--steps: must be an integer >= 1, got -1``."""
    cx = _click_exceptions()
    if isinstance(err, cx.BadParameter) and not isinstance(err, cx.MissingParameter) and err.param is not None:
        names = getattr(err.param, "opts", None) or [err.param.human_readable_name]
        return f"{' / '.join(names)}: {err.message.removeprefix(_PYDANTIC_VALUE_ERROR)}"
    return err.format_message()


def run_app(app, argv: list[str] | None = None) -> int:
    """Runs a Typer ``app`` on ``argv`` (default: the process's arguments) and returns its exit status:
    0, 2 with one ``error:`` line for anything the user can fix, 130 after Ctrl-C, 128 + N after signal N."""
    from typer import Abort

    cx = _click_exceptions()
    with signals_stop_the_run():
        try:
            result = app(args=argv, standalone_mode=False)
        except cx.NoArgsIsHelpError as err:  # the bare command: its help, as click shows it
            err.show()
            return err.exit_code
        except cx.UsageError as err:
            print_error(usage_message(err))
            return EXIT_USER_ERROR
        except cx.ClickException as err:
            print_error(err.format_message())
            return err.exit_code
        except Abort:  # end of input at a prompt
            print("aborted", file=sys.stderr)
            return 1
        except Stopped as stop:
            print(f"stopped by {stop.signal_name}", file=sys.stderr, flush=True)
            return stop.code
        except SystemExit as exit_:  # guarded's status 2, typer.Exit's own
            return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
    if result == 130:  # Typer's answer to KeyboardInterrupt
        print("interrupted", file=sys.stderr, flush=True)
    return result if isinstance(result, int) else 0
