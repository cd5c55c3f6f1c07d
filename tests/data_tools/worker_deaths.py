"""Kill a `fact-data build` worker at a chosen moment and time how long the parent takes to end.

Used by the tests, and as the loop of issue 20 when run as a script (figures before and after a change)::

    python tests/data_tools/worker_deaths.py --runs 30 --seed 0
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

WORKER_MARK = "spawn_main"  # in the command line of every spawned multiprocessing child


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live children of ``pid``, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(entry.name), cmdline))
    return found


def wait_for_worker(parent_pid: int, alive, timeout: float = 120.0) -> int | None:
    """The pid of the first spawned worker of ``parent_pid``, or None if the parent ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [pid for pid, cmdline in children(parent_pid) if WORKER_MARK in cmdline]
        if workers:
            return workers[0]
        if not alive():
            return None
        time.sleep(0.005)
    raise TimeoutError(f"no worker of pid {parent_pid} appeared within {timeout:.0f} s")


@dataclass
class Trial:
    delay_s: float
    killed: bool
    returncode: int | None  # None: the parent did not end in time (a hang)
    end_after_kill_s: float | None
    stderr: str


def kill_a_worker_of_a_build(cmd: list[str], delay_s: float, env: dict, hang_s: float = 60.0) -> Trial:
    """Starts ``cmd``, SIGKILLs its first worker ``delay_s`` after it appears, waits at most ``hang_s``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        worker = wait_for_worker(proc.pid, lambda: proc.poll() is None)
        killed = False
        if worker is not None:
            time.sleep(delay_s)
            try:
                os.kill(worker, signal.SIGKILL)
                killed = True
            except ProcessLookupError:  # it had already ended (the build was over)
                pass
        killed_at = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=hang_s)
        except subprocess.TimeoutExpired:
            return Trial(delay_s, killed, None, None, _stacks(proc.pid))
        return Trial(delay_s, killed, proc.returncode, time.monotonic() - killed_at, stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _stacks(pid: int) -> str:
    """The hung parent's Python stacks, all threads, where py-spy is installed (a diagnosis aid only)."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return ""
    done = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=4.0,
                        help="a third of the kills come at once (inside the spawn), a third within 0.3 s (start-up), "
                             "a third at a delay drawn from [0, this] s (detector start, photos, shutdown)")
    parser.add_argument("--fact-data", default=str(Path(sys.executable).parent / "fact-data"))
    args = parser.parse_args()
    raw = Path(__file__).resolve().parents[1] / "fixtures" / "faces" / "raw"
    env = {**os.environ, "GLOG_minloglevel": "2"}
    rng = random.Random(args.seed)
    trials = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [args.fact_data, "build", "--src", str(raw), "--out", f"{tmp}/out", "--encoder", "tiny",
                   "--random-encoder", "--workers", "2", "--images-per-shard", "2", "--resolution", "128"]
            delay = [0.0, rng.uniform(0.0, 0.3), rng.uniform(0.0, args.max_delay)][run % 3]
            trial = kill_a_worker_of_a_build(cmd, delay, env)
        trials.append(trial)
        end = "HANG" if trial.returncode is None else f"exit {trial.returncode} {trial.end_after_kill_s:.2f}s"
        last = trial.stderr.strip().splitlines()[-1:] if trial.returncode not in (0, 2, None) else []
        if trial.returncode is None and trial.stderr:
            print(trial.stderr, flush=True)
        print(f"run {run:2d} delay {trial.delay_s:.2f}s killed={trial.killed} {end} {' '.join(last)[:160]}",
              flush=True)
    hung = sum(t.returncode is None for t in trials)
    killed = [t for t in trials if t.killed and t.returncode is not None]
    slowest = max((t.end_after_kill_s for t in killed), default=0.0)
    print(f"{len(trials)} runs: {hung} hung (> 60 s), {sum(t.killed for t in trials)} killed a live worker, "
          f"exit codes {sorted(t.returncode for t in trials if t.returncode is not None)}, "
          f"slowest end after a kill {slowest:.2f} s")


if __name__ == "__main__":
    main()
