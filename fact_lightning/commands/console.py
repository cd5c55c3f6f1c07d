"""What the console scripts show: their own progress and results, warnings that matter, no library noise.

Progress: on a terminal a rich bar; anywhere else (a log file, a pipe: a cluster job's output) plain
``progress: ...`` lines on stderr, the first once the first unit is done, then one every
``FACT_PROGRESS_INTERVAL`` seconds (30 by default; 0: after every unit) and a last one at the end, each
flushed at once (:class:`ProgressLines`). Lines never start with ``error:``, and stdout (fact-evaluate's JSON)
never carries them.

Native libraries write to file descriptor 2 directly (mediapipe's TFLite and absl lines on its first
detection), past Python's logging: :func:`native_noise_filtered` catches them while the detector starts.
:func:`quiet_library_noise` drops the Python-level messages of Lightning and torch that say nothing about a
run (fact-train, the FAIR ablation); :func:`setup_logging` drops diffusers' dtype-cast notice, which SDXL's
pipelines provoke themselves (:data:`_FP32_CAST_NOTICE`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TextIO

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)

console = Console(stderr=True)  # progress, warnings, errors
out_console = Console()  # results

PROGRESS_INTERVAL_ENV = "FACT_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 30.0  # seconds between plain progress lines

# mediapipe's native start-up lines: glog/absl ("W0000 00:00:...") and TFLite's delegate notice.
_NATIVE_NOISE = re.compile(r"^(?:[IWE]\d{4} \d\d:\d\d:|INFO: Created TensorFlow Lite|"
                           r"WARNING: All log messages before absl::InitializeLog)")


class _RandomWeightsNotice(logging.Filter):
    """With --tiny the command says once that the models are random; the loaders' own notices repeat it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("fact_lightning.") and "RANDOM" in record.getMessage())


def setup_logging(verbose: bool = False, *, tiny: bool = False) -> None:
    """Our loggers at INFO (DEBUG with ``verbose``) through rich on stderr; other libraries at WARNING."""
    # On the emitting logger: diffusers writes through a handler of its own, past the root logger's.
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_FP32_CAST_NOTICE)
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    if tiny:
        handler.addFilter(_RandomWeightsNotice())
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("fact_lightning").setLevel(logging.DEBUG if verbose else logging.INFO)
    if tiny:
        console.print("[bold yellow]warning:[/] --tiny: seeded RANDOM models, no weights; the images check "
                      "the installation and show no one")


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


# diffusers' ModelMixin.to warns on every dtype cast that names a dtype, with an empty module list too. SDXL's
# inpainting pipeline casts its VAE to float32 and back itself (force_upcast) on every call, float32 runs
# included: nothing the user did or can change.
_FP32_CAST_NOTICE = _DropMessages("that should be kept in float32")


def quiet_library_noise() -> None:
    """Drops library messages that say nothing about this run (advertising, warnings about intended states)."""
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessages("litlogger"))
    # The shards' manifest says so already when the face encoder is random (the data module warns once).
    logging.getLogger("fact_lightning.interop.official").addFilter(_DropMessages("RANDOMLY INITIALISED"))
    # Lightning's internals call a torch API that torch itself has deprecated: nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # The frozen SD1.5 parts are in eval mode on purpose (no dropout, fixed norms).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)
    # Without data.val_root the validation loaders are an empty list, which Lightning reports as zero length.
    warnings.filterwarnings("ignore", message=r".*Total length of .* across ranks is zero", category=UserWarning)
    # The data module saves and restores its position itself (a resumed run continues the data order).
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


@contextlib.contextmanager
def native_noise_filtered() -> Iterator[None]:
    """Runs the block with file descriptor 2 captured; afterwards replays all but native start-up noise."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            kept = "".join(line for line in text.splitlines(keepends=True) if not _NATIVE_NOISE.match(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


# -- progress -------------------------------------------------------------------------------------------------
def progress_interval() -> float:
    """Seconds between plain progress lines: ``$FACT_PROGRESS_INTERVAL`` (0: every unit), else 30."""
    text = os.environ.get(PROGRESS_INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_PROGRESS_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        log.warning("%s=%r is not a number of seconds >= 0: progress lines every %g s", PROGRESS_INTERVAL_ENV, text,
                    DEFAULT_PROGRESS_INTERVAL)
        return DEFAULT_PROGRESS_INTERVAL
    return value


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0.0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLines:
    """Plain progress lines for a log file, one every ``interval`` seconds at most, each flushed at once::

        progress: step 40/200 (20%), 3.12 steps/s, elapsed 0:00:13, ETA 0:00:51, train/loss 0.342

    The first line comes once the first unit is done (the work has started, and at what pace), then one when
    ``interval`` seconds have passed since the last (0: at every update); :meth:`finish` writes the last.
    ``start``: units already done when the count began (a resumed run), left out of the rate.
    """

    def __init__(self, description: str, total: int | float | None = None, *, unit: str = "item", start: int = 0,
                 interval: float | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.description = description
        self.total = total
        self.unit = unit
        self.interval = progress_interval() if interval is None else interval
        self._stream = stream
        self._clock = clock
        self._start = start
        self._t0 = clock()
        self.done = start
        self._last_time: float | None = None  # when the last line was written
        self._last_done: int | None = None

    def due(self, done: int) -> bool:
        """Would :meth:`update` write a line for ``done`` now?"""
        if done <= self._start or done == self._last_done:
            return False
        return self._last_time is None or self._clock() - self._last_time >= self.interval

    def update(self, done: int, **fields) -> bool:
        """Records ``done`` units; writes a line if one is due. ``fields``: extra values for the line."""
        self.done = done
        if not self.due(done):
            return False
        self.write(done, **fields)
        return True

    def finish(self, done: int | None = None, **fields) -> None:
        """The last line (unless one was written for this count already)."""
        done = self.done if done is None else done
        if done != self._last_done:
            self.write(done, **fields)

    def write(self, done: int, **fields) -> None:
        now = self._clock()
        self.done, self._last_time, self._last_done = done, now, done
        stream = self._stream or sys.stderr
        stream.write(self.line(done, now - self._t0, **fields) + "\n")
        stream.flush()

    def line(self, done: int, elapsed: float, **fields) -> str:
        parts = [f"{self.description} {done}/{self.total}" if self.total else f"{self.description} {done}"]
        if self.total:
            parts[0] += f" ({100 * done / self.total:.0f}%)"
        rate = (done - self._start) / elapsed if elapsed > 0 else 0.0
        if rate >= 1:
            parts.append(f"{rate:.3g} {self.unit}s/s")
        elif rate > 0:
            parts.append(f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0:
            parts.append(f"ETA {_clock(max(self.total - done, 0) / rate)}")
        parts += [f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                  for key, value in fields.items()]
        return "progress: " + ", ".join(parts)


class PlainProgress:
    """The part of rich's ``Progress`` the commands use (``add_task``, ``update``, ``advance``, a ``with``
    block), written as :class:`ProgressLines`; the last lines come when the block ends without an error."""

    def __init__(self, interval: float | None = None):
        self.interval = interval
        self.tasks: list[ProgressLines] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            for task in self.tasks:
                task.finish()

    def add_task(self, description: str, total: float | None = None, unit: str = "item", **_fields) -> int:
        self.tasks.append(ProgressLines(description, total, unit=unit, interval=self.interval))
        return len(self.tasks) - 1

    def update(self, task: int, *, total: float | None = None, description: str | None = None,
               advance: float | None = None, completed: float | None = None, **_fields) -> None:
        lines = self.tasks[task]
        if total is not None:
            lines.total = total
        if description is not None:
            lines.description = description
        done = lines.done if completed is None else int(completed)
        lines.update(done + int(advance or 0))

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)


def progress(*columns, console: Console = console) -> Progress | PlainProgress:
    """A progress display on ``console`` (stderr): rich's bar on a terminal, plain lines anywhere else.
    ``add_task(description, total=..., unit="image")``: ``unit`` names one unit in the plain lines' rate."""
    if not console.is_interactive:
        return PlainProgress()
    columns = columns or (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn())
    return Progress(*columns, console=console, transient=False)
