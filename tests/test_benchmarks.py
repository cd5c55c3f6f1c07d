"""The speed benchmarks run end to end on tiny components and write well-formed JSON (no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu
from benchmarks.timing import interleaved

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, timeout: int = 600) -> None:
    cmd = [sys.executable, "-m", module, *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_tiny(tmp_path):
    out = tmp_path / "gpu.json"
    _run("benchmarks.gpu", "--device", "cpu", "--tiny", "--out", str(out), "--threads", "1", "--steps", "1")
    result = json.loads(out.read_text())
    assert "error" not in result
    assert set(result["variants"]) == {"plain", "optimized"}
    plain, opt = result["variants"]["plain"], result["variants"]["optimized"]
    assert not plain["settings"]["cached_latents"] and opt["settings"]["cached_latents"]
    assert opt["settings"]["fused_adam"] and not plain["settings"]["fused_adam"]
    for variant in (plain, opt):
        assert "error" not in variant
        assert variant["gflop_per_sample"] > 0
        run = variant["runs"][0]
        assert run["batch"] == 2 and run["samples_per_s"] > 0 and run["steps"] >= 1
        assert run["mfu"] is None  # no peak known for a CPU without --peak-tflops
    # The cached-latents step skips the VAE encoder: fewer FLOPs per sample.
    assert opt["gflop_per_sample"] < plain["gflop_per_sample"]
    assert opt["largest_batch"] >= 2 and opt["search"]["tried"] in ([], [4])
    summary = result["summary"]
    assert summary["plain_samples_per_s"] == plain["runs"][0]["samples_per_s"]
    assert summary["optimized_samples_per_s"] == opt["runs"][0]["samples_per_s"]
    assert math.isclose(summary["speedup"], summary["optimized_samples_per_s"] / summary["plain_samples_per_s"])
    assert summary["targets"]["speedup_met"] in (True, False)
    assert result["environment"]["torch"] and result["environment"]["torch_threads"] == 1


@pytest.mark.slow
def test_full_size_benchmark_runs_tiny(tmp_path):
    _run("benchmarks.full_size", "--tiny", "--repeats", "1", "--threads", "1", "--out", str(tmp_path))
    result = json.loads((tmp_path / "full_size.json").read_text())
    variants = result["variants"]
    assert set(variants) == {"frozen_unet", "adapter_unet", "step_cached", "step_vae"}
    for entry in variants.values():
        assert entry["median_s"] > 0 and len(entry["samples_s"]) == 1 and entry["gflop"] > 0
    ratios = result["ratios"]
    assert math.isclose(ratios["adapter_over_frozen"],
                        variants["adapter_unet"]["median_s"] / variants["frozen_unet"]["median_s"], rel_tol=1e-2)
    assert math.isclose(ratios["vae_over_cached"],
                        variants["step_vae"]["median_s"] / variants["step_cached"]["median_s"], rel_tol=1e-2)
    assert ratios["adapter_over_frozen_flops"] > 1 and ratios["vae_over_cached_flops"] > 1
    assert result["environment"]["cpu"] and result["environment"]["torch_threads"] == 1
    assert result["config"]["interleaved"] and result["config"]["resolution"] == 64


def test_interleaved_alternates_the_order():
    calls = []
    variants = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = interleaved(variants, repeats=2, warmup=1)
    assert calls == ["a", "b", "c", "a", "b", "c", "c", "b", "a"]
    assert all(len(t) == 2 and min(t) >= 0 for t in times.values())


def test_peak_tflops_and_summary():
    import torch

    assert gpu.detect_peak_tflops(torch.device("cpu"), 123.0) == (123.0, "--peak-tflops")
    assert gpu.detect_peak_tflops(torch.device("cpu"), None)[0] is None
    runs = lambda *r: [{"batch": b, "samples_per_s": s, "mfu": m} for b, s, m in r]  # noqa: E731
    result = {"config": {"batch": 8}, "variants": {
        "plain": {"runs": runs((8, 50.0, 0.2))},
        "optimized": {"runs": [*runs((8, 120.0, 0.45), (32, 190.0, 0.55)), {"batch": 64, "error": "OOM"}]},
    }}
    summary = gpu.summarize(result)
    assert summary["speedup"] == pytest.approx(2.4) and summary["speedup_best_batch"] == pytest.approx(3.8)
    assert summary["best"]["batch"] == 32
    assert summary["targets"] == {"mfu": 0.5, "speedup": 2.0, "mfu_met": True, "speedup_met": True}
    failed = gpu.summarize({"config": {"batch": 8}, "variants": {"plain": {"runs": [], "error": "boom"},
                                                                "optimized": {"runs": runs((8, 120.0, None))}}})
    assert "speedup" not in failed and failed["targets"]["speedup_met"] is None


def test_batch_search_stops_at_out_of_memory(monkeypatch):
    """The search doubles, bisects after an out-of-memory, and records the failure (no CUDA needed)."""
    import argparse
    from types import SimpleNamespace

    import torch

    def fake_measure(trainer, size, resolution, warmup, steps, deadline):
        if size > 40:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if size == 24:
            raise RuntimeError("some other failure")
        return {"batch": size, "steps": steps, "step_s": size / 100, "samples_per_s": 100.0, "peak_memory_gib": None}

    monkeypatch.setattr(gpu, "measure", fake_measure)
    zeroed = []
    trainer = SimpleNamespace(variant=gpu.optimized(False), compile_s=0.0, device=torch.device("cpu"),
                              optimizer=SimpleNamespace(zero_grad=lambda set_to_none: zeroed.append(True)))
    args = argparse.Namespace(batch=8, max_batch=64, search_warmup=1, search_steps=1, resolution=64)
    runs = [{"batch": 8, "step_s": 0.08, "samples_per_s": 100.0}]
    search = gpu.search_batch(trainer, args, 989.0, 2666.0, deadline=float("inf"), runs=runs)
    assert search == {"tried": [16, 32, 64, 48, 40], "largest_fitting": 40, "smallest_failing": 48,
                      "stopped_by": "out of memory"}
    assert [r["batch"] for r in runs] == [8, 16, 32, 64, 48, 40] and "error" in runs[-2] and zeroed
    assert runs[1]["mfu"] == pytest.approx(2666.0 * 100.0 / 1e3 / 989.0)
    # Another error stops the search; with no time left, nothing is tried.
    runs = [{"batch": 12, "step_s": 0.12, "samples_per_s": 100.0}]
    args.batch = 12
    assert gpu.search_batch(trainer, args, None, 1.0, deadline=float("inf"), runs=runs)["stopped_by"] == "error"
    assert runs[-1] == {"batch": 24, "error": "RuntimeError: some other failure"}
    assert gpu.search_batch(trainer, args, None, 1.0, deadline=0.0, runs=runs[:1])["stopped_by"].startswith("time")
