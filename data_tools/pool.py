"""Per-photo work (decode, detect, mask, crop, align) in this process or in a pool of spawned workers.

Results come back in input order whatever the number of workers. A worker that dies (killed, out of
memory, a native crash) breaks the pool: the shard fails with :class:`WorkerLost` instead of waiting
forever, and the next run resumes from the shards finished before.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from data_tools import records
from data_tools.records import ImageRecord, Reject, RecordOptions
from data_tools.sources import SourceItem
from fact_lightning.errors import UserError
from fact_lightning.faces import identity as ident

logger = logging.getLogger(__name__)


class WorkerLost(UserError):
    """A worker process died while processing photos."""


_WORKER: dict = {}
POLL_S = 1.0  # how often a wait for a photo checks that every worker is still alive


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


class Processor:
    """Maps items to records in order, in this process (``workers == 1``) or in ``workers`` spawned processes."""

    def __init__(self, workers: int, detector: str, detector_weights: Path | None, record: RecordOptions,
                 dlib_embed: bool):
        args = (detector, detector_weights, record, dlib_embed)
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                             initargs=args)
        else:
            _init_worker(*args)

    def map(self, items: list[SourceItem], label: str = "") -> Iterator[ImageRecord | Reject]:
        if self._pool is None:
            yield from map(_process, items)
            return
        futures = [self._pool.submit(_process, item) for item in items]
        for future in futures:
            while True:  # every wait is bounded: a dead worker is noticed within POLL_S, however the pool behaves
                try:
                    yield future.result(timeout=POLL_S)
                    break
                except FuturesTimeout:
                    if not self._workers_alive():
                        self._abandon(label)
                except BrokenProcessPool:
                    self._abandon(label)

    def _workers_alive(self) -> bool:
        processes = getattr(self._pool, "_processes", None) or {}  # the executor's own table of its workers
        return all(p.exitcode is None for p in list(processes.values()))

    def _abandon(self, label: str) -> None:
        """Ends the pool at once (the other workers are killed: their photos are redone on resume) and raises."""
        pool, self._pool = self._pool, None
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            if process.exitcode is None:
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise WorkerLost(f"a worker process died while processing {label or 'photos'} (killed, out of memory "
                         "or a native crash); run the build again to resume, with fewer --workers if memory "
                         "is short")

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True, cancel_futures=True)  # running photos finish; queued ones are dropped
