"""Timing and FLOP-counting helpers shared by the benchmarks.

Wall-clock ratios are only meaningful within one run on a shared machine: ``interleaved`` alternates the
variants inside one loop (reversing the order every other repeat), so that load from other processes
falls on all of them alike, and reports medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device | str) -> None:
    """Waits for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, *, warmup: int = 1,
                device: torch.device | str = "cpu",
                progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each variant, ``repeats`` times each, the variants alternating in one loop."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            variants[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names))
    return times


def summary(seconds: list[float]) -> dict:
    """Median, min and every sample of a list of timings (seconds)."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "samples_s": [round(s, 4) for s in seconds]}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and backward), counted by ``torch.utils.flop_counter``."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()
