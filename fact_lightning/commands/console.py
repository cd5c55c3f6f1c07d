"""What ``fact-generate`` and ``fact-evaluate`` show on the terminal: their own progress and results,
warnings that matter, and no library noise.

Native libraries write to file descriptor 2 directly (mediapipe's TFLite and absl lines on its first
detection), past Python's logging: :func:`native_noise_filtered` catches them while the detector starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)  # progress, warnings, errors
out_console = Console()  # results

# mediapipe's native start-up lines: glog/absl ("W0000 00:00:...") and TFLite's delegate notice.
_NATIVE_NOISE = re.compile(r"^(?:[IWE]\d{4} \d\d:\d\d:|INFO: Created TensorFlow Lite|"
                           r"WARNING: All log messages before absl::InitializeLog)")


class _RandomWeightsNotice(logging.Filter):
    """With --tiny the command says once that the models are random; the loaders' own notices repeat it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("fact_lightning.") and "RANDOM" in record.getMessage())


def setup_logging(verbose: bool = False, *, tiny: bool = False) -> None:
    """Our loggers at INFO (DEBUG with ``verbose``) through rich on stderr; other libraries at WARNING."""
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    if tiny:
        handler.addFilter(_RandomWeightsNotice())
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("fact_lightning").setLevel(logging.DEBUG if verbose else logging.INFO)
    if tiny:
        console.print("[bold yellow]warning:[/] --tiny: seeded RANDOM models, no weights; the images check "
                      "the installation and show no one")


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


def progress() -> Progress:
    """A progress bar on stderr for a command's images."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)
