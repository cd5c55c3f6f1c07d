"""Runs the console scripts the way users do: a subprocess of the installed entry point, bounded in time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
NOISE = ("kept in float32", "W0000", "absl::", "TensorFlow Lite", "Traceback", "inference_feedback_manager")


def run_cli(script: str, *args, timeout: float = 300, columns: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([str(BIN / script), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, exactly one ``error: ...`` line holding every fragment, no traceback or library noise."""
    assert result.returncode == 2, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    assert not any(n in result.stderr for n in NOISE), result.stderr
    return lines[0]
