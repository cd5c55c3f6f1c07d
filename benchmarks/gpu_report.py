"""The JSON report of ``benchmarks.gpu``: the one-switch ablation table, the headline summary against the targets,
and whether the run failed."""

from __future__ import annotations

import statistics

from benchmarks.gpu_step import SWITCHES

TARGET_MFU, TARGET_SPEEDUP = 0.5, 2.0


def ablation_table(times: dict[str, list[float]], entries: dict[str, dict], batch: int) -> dict:
    """Each variant against plain at the same batch, from the same interleaved loop: plain's median step time
    over the variant's (> 1: faster than plain)."""
    table: dict = {"batch": batch, "interleaved": True, "baseline": "plain",
                   "ratio": "plain median step time / variant median step time (> 1: faster than plain)",
                   "switches": {}}
    plain = times.get("plain")
    for name, entry in entries.items():
        if name == "plain":
            continue
        row: dict = {"settings_on": [s for s in SWITCHES if entry["settings"][s]],
                     "gradient_checkpointing": entry["settings"].get("gradient_checkpointing", False)}
        if plain and name in times:
            med = statistics.median(times[name])
            row.update(speedup_vs_plain=statistics.median(plain) / med,
                       speedup_vs_plain_fastest=min(plain) / min(times[name]), samples_per_s=batch / med,
                       step_s=med, repeats=len(times[name]))
        elif "error" in entry:
            row["error"] = entry["error"]
        else:
            row["skipped"] = entry.get("skipped") or "not timed"
        table["switches"][name] = row
    table["slower_than_plain"] = [n for n, r in table["switches"].items() if r.get("speedup_vs_plain", 1.0) < 1.0]
    return table


def summarize(result: dict) -> dict:
    """Headline numbers: the equal-batch speedup, each variant's own best batch, the ablation, the data path,
    the targets (the speedup target is judged at equal batch: batch size is not an optimisation of the step)."""
    variants = result.get("variants", {})
    plain, opt = variants.get("plain", {}), variants.get("optimized", {})
    batch = result["config"]["batch"]
    ok = lambda v: [r for r in v.get("runs", []) if "error" not in r]  # noqa: E731
    at = lambda v, b: next((r for r in ok(v) if r["batch"] == b), None)  # noqa: E731
    summary: dict = {"base": result["config"].get("base", "sd15"), "batch": batch}
    p, o = at(plain, batch), at(opt, batch)
    if p:
        summary["plain_samples_per_s"], summary["plain_mfu"] = p["samples_per_s"], p.get("mfu")
    if o:
        summary["optimized_samples_per_s"], summary["optimized_mfu"] = o["samples_per_s"], o.get("mfu")
    if p and o:
        summary["speedup_equal_batch"] = o["samples_per_s"] / p["samples_per_s"]
    for name, v in (("plain", plain), ("optimized", opt)):
        if ok(v):
            best = max(ok(v), key=lambda r: r["samples_per_s"])
            summary[f"{name}_best"] = {k: best.get(k) for k in ("batch", "samples_per_s", "mfu", "peak_memory_gib")}
    if "plain_best" in summary and "optimized_best" in summary:
        summary["speedup_best_vs_best"] = (summary["optimized_best"]["samples_per_s"]
                                           / summary["plain_best"]["samples_per_s"])
    common = sorted({r["batch"] for r in ok(plain)} & {r["batch"] for r in ok(opt)})
    summary["speedup_by_batch"] = {str(b): at(opt, b)["samples_per_s"] / at(plain, b)["samples_per_s"] for b in common}
    switches = result.get("ablation", {}).get("switches", {})
    if switches:
        summary["ablation_speedup_vs_plain"] = {n: r.get("speedup_vs_plain") for n, r in switches.items()}
    dp = result.get("data_path") or {}
    if "reader" in dp:
        summary["data_path"] = {"reader_samples_per_s": dp["reader"]["samples_per_s"],
                                "step_from_loader_samples_per_s": dp["step_from_loader"]["samples_per_s"],
                                "bytes_per_sample": dp["bytes_per_sample"]["total"],
                                "bytes_per_sample_read_by_step": dp["bytes_per_sample"]["read_by_step"]}
        if o:
            summary["data_path"]["reader_over_step"] = dp["reader"]["samples_per_s"] / o["samples_per_s"]
    best_mfu, speedup = summary.get("optimized_best", {}).get("mfu"), summary.get("speedup_equal_batch")
    summary["targets"] = {"mfu": TARGET_MFU, "speedup": TARGET_SPEEDUP, "speedup_measured_at": "equal batch",
                          "mfu_met": None if best_mfu is None else best_mfu >= TARGET_MFU,
                          "speedup_met": None if speedup is None else speedup >= TARGET_SPEEDUP}
    return summary


def failed(result: dict) -> bool:
    parts = [*result.get("variants", {}).values(), result.get("data_path") or {}, result.get("step_host_copies") or {},
             *result.get("ablation", {}).get("switches", {}).values()]
    errors = "error" in result or any("error" in p for p in parts)
    return errors or "speedup_equal_batch" not in result["summary"]
