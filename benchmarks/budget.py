"""A time budget counted from the start of the process: imports, building, FLOP counts, compilation, warm-up and
every measured step spend it.

Each phase asks ``Budget.allows(phase, needed_s)`` before it starts; a phase that would not fit is skipped and
recorded in ``skipped`` with what it needed and what was left, so the JSON says what is missing and why. A phase
that cannot be estimated beforehand (the first compilation) is stopped when the budget runs out: within
``Budget.enforced()`` a timer raises :class:`BudgetExceeded` in the middle of whatever runs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


class BudgetExceeded(BaseException):
    """The budget ran out in the middle of a phase. A BaseException, as KeyboardInterrupt: the ``except
    Exception`` that records a part's failure does not swallow it."""


def process_start(fallback: float) -> tuple[float, str]:
    """``time.monotonic()`` at the start of this process, and how it was found.

    On Linux the kernel records the start (``/proc/self/stat``, in clock ticks since boot, against
    ``/proc/uptime``); elsewhere ``fallback`` (a ``time.monotonic()`` taken by the caller as early as it can).
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        started = int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")  # field 22
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        now = time.monotonic()
        age = uptime - started
        if 0.0 <= age < 7 * 24 * 3600:
            return min(now - age, fallback), "process start (/proc/self/stat)"
    except (OSError, ValueError, IndexError):
        pass
    return fallback, "first import of the entry module"


@dataclass
class Budget:
    """``seconds`` from ``start`` (a ``time.monotonic()``), the phases it paid for and the ones it skipped."""

    seconds: float
    start: float
    clock: str = "process start"
    spent: dict[str, float] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    current: str | None = None  # the phase running now

    @property
    def deadline(self) -> float:
        return self.start + self.seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, phase: str, needed_s: float = 0.0) -> bool:
        """Whether ``phase`` (about ``needed_s`` seconds) fits in what is left; records it as skipped if not."""
        left = self.left()
        if left > 0 and needed_s <= left:
            return True
        self.skip(phase, f"time budget: needs ~{needed_s:.1f} s, {max(left, 0.0):.1f} s left", needed_s)
        return False

    def skip(self, phase: str, reason: str, needed_s: float | None = None) -> None:
        entry = {"phase": phase, "reason": reason, "at_s": round(self.elapsed(), 2)}
        if needed_s is not None:
            entry["needed_s"] = round(needed_s, 2)
        self.skipped.append(entry)

    @contextmanager
    def phase(self, name: str, label: str | None = None):
        """Adds the time spent in the block to ``spent[name]``; ``label`` names what runs (else ``name``)."""
        begin, outer, self.current = time.monotonic(), self.current, label or name
        try:
            yield
        finally:
            self.spent[name] = self.spent.get(name, 0.0) + time.monotonic() - begin
            self.current = outer

    @contextmanager
    def enforced(self):
        """Raises :class:`BudgetExceeded` in the block when the budget runs out (a ``SIGALRM`` timer; in the main
        thread of a POSIX process; elsewhere only the checks between phases hold)."""
        if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_alarm(signum, frame):
            raise BudgetExceeded(f"the time budget ran out during {self.current or 'the run'}")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 1e-3))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def report(self) -> dict:
        return {"seconds": self.seconds, "clock_starts_at": self.clock, "elapsed_s": round(self.elapsed(), 2),
                "left_s": round(self.left(), 2), "spent_s": {k: round(v, 2) for k, v in self.spent.items()},
                "skipped": self.skipped}
