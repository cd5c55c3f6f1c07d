"""A photo worker killed at any moment of its life, from its spawn to its shutdown, ends the map within seconds
with WorkerLost (or, once every photo is back, does not matter), and leaves no process behind (issue 20)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from data_tools.pool import Processor, WorkerLost
from data_tools.records import RecordOptions
from data_tools.sources import discover
from dt_helpers import RAW
from worker_deaths import WORKER_MARK, children, wait_for_worker

BOUND_S = 10.0  # a death must end the map this fast (the pool notices within about a second)


class Killer(threading.Thread):
    """SIGKILLs this process's first spawned worker ``delay_s`` after it appears, or when ``trigger`` is set."""

    def __init__(self, delay_s: float = 0.0, trigger: threading.Event | None = None):
        super().__init__(daemon=True)
        self.delay_s, self.trigger = delay_s, trigger
        self.killed_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        pid = wait_for_worker(os.getpid(), lambda: not self.stop.is_set(), timeout=60)
        if self.trigger is not None:
            self.trigger.wait(60)
        time.sleep(self.delay_s)
        if pid is not None and not self.stop.is_set():
            try:
                os.kill(pid, signal.SIGKILL)
                self.killed_at = time.monotonic()
            except ProcessLookupError:
                pass


def _one_life(items, killer: Killer, first_result: threading.Event, closing: threading.Event) -> str:
    killer.start()
    try:
        processor = Processor(2, "mediapipe", None, RecordOptions(resolution=128), dlib_embed=False)
        results = []
        for result in processor.map(items, label="shard-x"):
            results.append(result)
            first_result.set()
        closing.set()
        processor.close()
        assert len(results) == len(items)
        return "completed"
    except WorkerLost as exc:
        assert "shard-x" in str(exc) or "start of the workers" in str(exc), exc
        return "lost"
    finally:
        killer.stop.set()
        killer.join(60)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("moment", ["spawn", "start-up", "mid-photo", "shutdown", "random"])
def test_a_worker_killed_at_any_moment_ends_the_map_within_seconds(moment):
    items = discover(RAW).items[:6]
    first_result, closing = threading.Event(), threading.Event()
    delay = {"start-up": 0.4, "random": random.Random(os.getpid()).uniform(0.0, 3.0)}.get(moment, 0.0)
    trigger = {"mid-photo": first_result, "shutdown": closing}.get(moment)
    killer = Killer(delay, trigger)
    outcome = _one_life(items, killer, first_result, closing)
    ended = time.monotonic()
    assert killer.killed_at is not None or moment == "random", f"the {moment} kill found no live worker"
    if killer.killed_at is not None:
        assert ended - killer.killed_at < BOUND_S, f"ended {ended - killer.killed_at:.1f} s after the kill"
    if moment in ("spawn", "start-up", "mid-photo"):
        assert outcome == "lost"
    if moment == "shutdown":
        assert outcome == "completed"  # every photo was back: a death while closing loses nothing
    deadline = time.monotonic() + 5
    while [c for c in children(os.getpid()) if WORKER_MARK in c[1]] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [c for c in children(os.getpid()) if WORKER_MARK in c[1]], "a worker outlived the pool"


@pytest.mark.timeout(120)
def test_a_worker_that_cannot_start_names_the_reason(tmp_path):
    """A detector that fails to start in the workers (no weights in the folder) is told as such, not as a crash."""
    with pytest.raises(WorkerLost) as info:
        processor = Processor(2, "facexlib", tmp_path, RecordOptions(resolution=128), dlib_embed=False)
        list(processor.map(discover(RAW).items[:2], label="shard-y"))
    message = str(info.value)
    assert "failed while processing shard-y" in message and str(tmp_path) in message, message
    assert "died" not in message
