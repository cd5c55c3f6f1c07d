"""Kill a real `fact-data build` subprocess part-way, resume it, and compare with a clean build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_tools.dataset import inspect_dataset
from fact_lightning.data import shards

pytestmark = pytest.mark.slow


def _cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "data_tools.cli", "build", "--src", str(src), "--out", str(out),
            "--encoder", "tiny", "--random-encoder", "--images-per-shard", "2", "--max-per-group", "2"]


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def test_killed_build_resumes_to_identical_shards(raw_copy, tmp_path):
    env = {**os.environ, "GLOG_minloglevel": "2"}
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(raw_copy, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    marker = out / "shard-000000.stats.json"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "first shard never finished"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / shards.MANIFEST_NAME).exists(), "the build finished before it could be killed"
    finished_before = {p.name for p in out.glob("*.stats.json")}
    assert not inspect_dataset(out).ok  # no manifest: reported as unfinished

    resumed = subprocess.run(_cmd(raw_copy, out), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(finished_before)} resumed" in resumed.stdout.replace("\n", " ")

    clean = tmp_path / "clean"
    done = subprocess.run(_cmd(raw_copy, clean), capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _shards(out) == _shards(clean) and len(_shards(clean)) == 5
    assert (out / shards.REJECTS_NAME).read_text() == (clean / shards.REJECTS_NAME).read_text()
    assert not list(out.glob("*.tmp"))
    assert inspect_dataset(out).ok
