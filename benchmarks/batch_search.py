"""The batch search of ``benchmarks.gpu``: the largest batch a variant fits, doubling then bisecting after an
out-of-memory (the caching allocator's, or cuBLAS/cuDNN failing to allocate their workspace)."""

from __future__ import annotations

import argparse
import logging
import time

from benchmarks.budget import Budget
from benchmarks.gpu_step import Trainer, add_mfu, error_text, fmt, free_memory, measure

log = logging.getLogger("benchmarks.gpu")


# Allocation failures: the caching allocator's, and cuBLAS's/cuDNN's when it cannot give them their workspace.
_OOM_MARKERS = ("outofmemoryerror", "out of memory", "can't allocate memory", "cublas_status_alloc_failed",
                "cudnn_status_alloc_failed", "cudnn_status_not_enough_workspace")


def is_oom(error: str) -> bool:
    text = error.lower()
    return any(marker in text for marker in _OOM_MARKERS)


def search_batch(trainer: Trainer, args: argparse.Namespace, peak: float | None, gflop_per_sample: float | None,
                 deadline: float, runs: list[dict]) -> dict:
    """Doubles the batch from ``args.batch`` up to ``args.max_batch``; after an out-of-memory, bisects between
    the largest batch that fitted and the smallest that did not, in multiples of 8 (a few tries at most).
    ``deadline`` is a ``time.monotonic()``."""
    last_ok, failed, tried = args.batch, None, []
    candidates = []
    size = args.batch * 2
    while size <= args.max_batch:
        candidates.append(size)
        size *= 2
    stop = "max_batch reached"
    while candidates:
        size = candidates.pop(0)
        ok = [r for r in runs if "error" not in r][-1]
        step_estimate = ok["step_s"] * size / ok["batch"]
        needed = step_estimate * (args.search_warmup + args.search_steps) * 1.5 + trainer.compile_s
        if time.monotonic() + needed > deadline:
            stop = f"time budget: batch {size} skipped"
            break
        tried.append(size)
        try:
            run = measure(trainer, size, args.resolution, args.search_warmup, args.search_steps, deadline)
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one; the CPU allocator raises a plain one
            error = error_text(err)
            run = None
        if run is None:
            trainer.optimizer.zero_grad(set_to_none=True)
            free_memory(trainer.device)
            runs.append({"batch": size, "error": error})
            log.info("[%s] batch %d: %s", trainer.variant.name, size, error.splitlines()[0][:160])
            if not is_oom(error):
                stop = "error"
                break
            failed, stop = size, "out of memory"
        else:
            runs.append(add_mfu(run, gflop_per_sample, peak))
            last_ok = size
            log.info("[%s] batch %d: %.2f samples/s, MFU %s, peak memory %s GiB", trainer.variant.name, size,
                     run["samples_per_s"], fmt(run.get("mfu")), fmt(run["peak_memory_gib"]))
        if failed is not None:  # bisect between the largest fitting and the smallest failing batch
            mid = (last_ok + failed) // 2 // 8 * 8
            candidates = [mid] if failed - last_ok > 8 and mid > last_ok and mid not in tried else []
    return {"tried": tried, "largest_fitting": last_ok, "smallest_failing": failed, "stopped_by": stop}


def run_search(trainer: Trainer, entry: dict, args: argparse.Namespace, peak: float | None, budget: Budget,
               deadline: float) -> None:
    name = trainer.variant.name
    if not [r for r in entry["runs"] if "error" not in r]:
        budget.skip(f"{name}: batch search", "no run at the equal batch to start from")
        return
    with budget.phase("batch search", f"{name}: batch search"):
        try:
            entry["search"] = search_batch(trainer, args, peak, entry.get("gflop_per_sample"), deadline, entry["runs"])
        except Exception as err:  # keep the runs measured so far
            entry["search"] = {"error": error_text(err)}
            log.exception("[%s] batch search failed", name)
    if entry["search"].get("stopped_by", "").startswith("time budget"):
        budget.skip(f"{name}: batch search", entry["search"]["stopped_by"])
    fits = [r for r in entry["runs"] if "error" not in r]
    entry["largest_batch"] = max(fits, key=lambda r: r["batch"])["batch"]
    best = max(fits, key=lambda r: r["samples_per_s"])
    entry["best"] = {k: best.get(k) for k in ("batch", "samples_per_s", "mfu", "peak_memory_gib")}
