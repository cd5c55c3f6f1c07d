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
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


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


# The counter hands these the shapes of the kernel's tensor arguments.
def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def cpu_attention_formulas() -> dict:
    """FLOP formulas for the CPU kernels of ``scaled_dot_product_attention``, which torch's counter lacks (it
    counts them as 0 on the CPU, while the same call on CUDA or the meta device is counted): the same formulas as
    torch's own for the CUDA flash kernel."""
    aten = torch.ops.aten
    formulas = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_attention_backward_flops
    return formulas


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and backward), counted by ``torch.utils.flop_counter`` (with the CPU
    attention kernels counted too: :func:`cpu_attention_formulas`)."""
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas())
    with counter:
        fn()
    return counter.get_total_flops()
