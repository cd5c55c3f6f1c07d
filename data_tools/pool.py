"""Per-photo work (decode, detect, mask, crop, align) in this process or in a pool of spawned workers.

Results come back in input order whatever the number of workers. A worker that dies (killed, out of
memory, a native crash), at any moment from its spawn to its shutdown, ends the shard with
:class:`WorkerLost` within about a second, and the next run resumes from the shards finished before.

Why not ``concurrent.futures.ProcessPoolExecutor``: a worker killed while it holds one of the executor's
shared queue locks, or while the parent's feeder thread is writing to it, can leave the executor's manager
thread (which the interpreter joins at exit) or the queues blocked for good. Here each worker has its own
pipe and nothing else is shared: the parent waits on the pipes and the processes' sentinels together
(``multiprocessing.connection.wait``), so a death is an event it sees at once, and no thread or lock of
ours can outlive it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

from data_tools import records
from data_tools.records import ImageRecord, Reject, RecordOptions
from data_tools.sources import SourceItem
from fact_lightning.errors import UserError
from fact_lightning.faces import identity as ident

logger = logging.getLogger(__name__)


class WorkerLost(UserError):
    """A worker process died (or stalled) while processing photos."""


_WORKER: dict = {}
IN_FLIGHT = 2      # photos sent ahead to each worker: it never waits for the parent, pipes never fill
STALL_S = 600.0    # a worker silent this long with photos in hand is stuck (a native hang): it ends the shard
JOIN_S = 5.0       # how long a worker told to stop may take before it is killed
_INIT_FAILED, _RESULT = "init_failed", "result"


def _init_worker(detector: str, weights: Path | None, record_opts: RecordOptions, dlib_embed: bool) -> None:
    from fact_lightning.commands.console import native_noise_filtered
    from fact_lightning.faces.detectors import start_detector

    with native_noise_filtered():  # mediapipe's native start-up lines, not the user's business
        _WORKER["detector"] = start_detector(detector, weights)
    _WORKER["opts"] = record_opts
    _WORKER["embedder"] = ident.DlibEmbedder() if dlib_embed else None


def _process(item: SourceItem) -> ImageRecord | Reject:
    try:
        return records.process_item(item, _WORKER["detector"], _WORKER["opts"], _WORKER["embedder"])
    except Exception as exc:  # noqa: BLE001 - per-sample error handler: one bad photo must not end a build
        logger.exception("unexpected error on %s", item.source)
        return Reject(item.source, item.identity, records.PROCESSING_ERROR, f"{type(exc).__name__}: {exc}")


def _worker_main(conn: Connection, init_args: tuple) -> None:
    """A worker's life: start, then answer ``(index, item)`` messages until ``None`` or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    try:
        try:
            _init_worker(*init_args)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which ends the build with it
            conn.send((_INIT_FAILED, f"{type(exc).__name__}: {exc}"))
            return
        while (message := conn.recv()) is not None:
            index, item = message
            conn.send((_RESULT, index, _process(item)))
    except (EOFError, OSError):  # the parent went away: nothing left to do
        pass


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    in_flight: deque = field(default_factory=deque)
    last_heard: float = field(default_factory=time.monotonic)


def _exit_detail(process: mp.process.BaseProcess) -> str:
    process.join(timeout=1.0)  # its sentinel or pipe said it ended: the exit status follows at once
    code = process.exitcode
    if code is None:
        return "its pipe closed"
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


class Processor:
    """Maps items to records in order, in this process (``workers == 1``) or in ``workers`` spawned processes."""

    def __init__(self, workers: int, detector: str, detector_weights: Path | None, record: RecordOptions,
                 dlib_embed: bool):
        args = (detector, detector_weights, record, dlib_embed)
        self._workers: list[_Worker] = []
        if workers <= 1:
            _init_worker(*args)
            return
        ctx = mp.get_context("spawn")
        for n in range(workers):
            parent_end, child_end = ctx.Pipe(duplex=True)
            process = ctx.Process(target=_worker_main, args=(child_end, args), name=f"fact-data-worker-{n}",
                                  daemon=True)  # daemon: never outlives this process
            self._workers.append(_Worker(process, parent_end))
            try:
                process.start()  # a worker killed during its spawn breaks the pipe that start() writes to
            except OSError as exc:
                self._abandon("the start of the workers", f"{type(exc).__name__}: {exc}")
            finally:
                child_end.close()  # only the child holds it now: its death reads as end-of-file here

    def map(self, items: list[SourceItem], label: str = "") -> Iterator[ImageRecord | Reject]:
        if not self._workers:
            yield from map(_process, items)
            return
        pending = deque(enumerate(items))
        done: dict[int, ImageRecord | Reject] = {}
        for index in range(len(items)):
            while index not in done:
                self._send(pending, label)
                self._receive(done, label)
            yield done.pop(index)

    def _send(self, pending: deque, label: str) -> None:
        for worker in self._workers:
            while pending and len(worker.in_flight) < IN_FLIGHT:
                index, item = pending[0]
                try:
                    worker.conn.send((index, item))
                except OSError:
                    self._abandon(label)
                pending.popleft()
                if not worker.in_flight:
                    worker.last_heard = time.monotonic()
                worker.in_flight.append(index)

    def _receive(self, done: dict, label: str) -> None:
        """Waits for the next message or death, at most a second, then checks for stalls."""
        by_handle = {w.conn: w for w in self._workers} | {w.process.sentinel: w for w in self._workers}
        for handle in wait(list(by_handle), timeout=1.0):
            worker = by_handle[handle]
            try:  # a process that ended may have said why first (a failed start): read that before its death
                message = worker.conn.recv() if worker.conn.poll() else None
            except (EOFError, OSError):
                message = None
            if message is None:
                self._abandon(label, _exit_detail(worker.process))
            if message[0] == _INIT_FAILED:
                self._abandon(label, message[1], died=False)
            _, index, result = message
            worker.in_flight.remove(index)
            worker.last_heard = time.monotonic()
            done[index] = result
        now = time.monotonic()
        for worker in self._workers:
            if worker.in_flight and now - worker.last_heard > STALL_S:
                self._abandon(label, f"no answer for {STALL_S:.0f} s", died=False)

    def _abandon(self, label: str, detail: str = "", died: bool = True) -> None:
        """Ends every worker at once (their photos are redone on resume) and raises."""
        self._stop(grace_s=0.0)
        what = label or "photos"
        if died:
            raise WorkerLost(f"a worker process died ({detail or 'killed'}) while processing {what}: killed, out of "
                             "memory or a native crash; run the build again to resume, with fewer --workers if "
                             "memory is short")
        raise WorkerLost(f"a worker process failed while processing {what}: {detail}")

    def _stop(self, grace_s: float) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            if grace_s > 0:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + grace_s
        for worker in workers:
            if worker.process.pid is None:  # never started
                worker.conn.close()
                continue
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=JOIN_S)
            worker.conn.close()

    def close(self) -> None:
        """Stops the workers: each finishes its photo, then exits; one that does not within JOIN_S is killed."""
        self._stop(grace_s=JOIN_S)
