"""The speed benchmarks run end to end on tiny components and write well-formed JSON (no timing is asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import batch_search, gpu, gpu_report, peaks
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
        assert variant["gflop_per_sample"] > 0 and variant["flop_count"] == {"batch": 2, "recompute_counted": False}
        run = variant["runs"][0]  # the equal batch, interleaved with every other variant
        assert run["batch"] == 2 and run["interleaved"] and run["samples_per_s"] > 0 and run["steps"] == 1
        assert run["mfu"] is None  # no peak known for a CPU without --peak-tflops
        # each variant searched its own batch (tiny: up to 4) and reports its best
        assert variant["search"]["tried"] in ([], [4]) and variant["largest_batch"] >= 2
        assert variant["best"]["samples_per_s"] == max(r["samples_per_s"] for r in variant["runs"] if "error" not in r)
    # The cached-latents step skips the VAE encoder: fewer FLOPs per sample.
    assert opt["gflop_per_sample"] < plain["gflop_per_sample"]

    summary = result["summary"]
    assert "speedup" not in summary and "speedup_best_batch" not in summary  # no more unequal comparisons
    assert summary["plain_samples_per_s"] == plain["runs"][0]["samples_per_s"]
    assert summary["optimized_samples_per_s"] == opt["runs"][0]["samples_per_s"]
    assert math.isclose(summary["speedup_equal_batch"],
                        summary["optimized_samples_per_s"] / summary["plain_samples_per_s"])
    assert summary["plain_best"] == plain["best"] and summary["optimized_best"] == opt["best"]
    assert math.isclose(summary["speedup_best_vs_best"], opt["best"]["samples_per_s"] / plain["best"]["samples_per_s"])
    assert math.isclose(summary["speedup_by_batch"]["2"], summary["speedup_equal_batch"])
    assert summary["targets"]["speedup_met"] in (True, False) and summary["targets"]["mfu_met"] is None

    # The ablation: every switch alone against plain, from the same interleaved loop.
    ablation = result["ablation"]
    assert ablation["batch"] == 2 and ablation["interleaved"]
    switches = ablation["switches"]
    assert set(switches) == {"optimized", "cached_latents", "fused_adam", "channels_last", "cudnn_benchmark"}
    for name, row in switches.items():
        assert row["speedup_vs_plain"] > 0 and row["repeats"] == 1
        assert math.isclose(row["speedup_vs_plain"], row["samples_per_s"] / summary["plain_samples_per_s"])
        assert row["settings_on"] == ([name] if name != "optimized" else
                                      ["cached_latents", "fused_adam", "channels_last", "cudnn_benchmark"])
    assert summary["ablation_speedup_vs_plain"]["fused_adam"] == switches["fused_adam"]["speedup_vs_plain"]

    # The data path: the real data module over shards with cached latents.
    data = result["data_path"]
    assert data["reader"]["samples_per_s"] > 0 and data["step_from_loader"]["samples_per_s"] > 0
    sizes = data["bytes_per_sample"]
    assert sizes["total"] > sizes["read_by_step"] > 0
    assert {"latent_mean", "latent_std", "tokens", "mask"} <= set(sizes["keys_read_by_step"])
    assert "pixels" in sizes["keys_not_read"]  # cached latents: the crops travel but the step never reads them
    assert summary["data_path"]["reader_samples_per_s"] == data["reader"]["samples_per_s"]
    assert summary["data_path"]["bytes_per_sample"] == sizes["total"]

    # The budget counts from the start of the process and nothing was skipped.
    budget = result["budget"]
    assert budget["clock_starts_at"].startswith("process start") and budget["skipped"] == []
    assert budget["spent_s"]["start-up (imports)"] > 0 and budget["elapsed_s"] <= budget["seconds"]
    assert result["wall_s"] >= sum(budget["spent_s"].values()) - 0.5
    assert result["peak_tflops"] is None and result["mfu_unavailable"] and result["device_name"].startswith("cpu")
    copies = result["step_host_copies"]
    assert copies["host_reads"] == 0 and copies["blocking_host_to_device"] >= 0
    assert result["environment"]["torch"] and result["environment"]["torch_threads"] == 1


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_tiny_sdxl(tmp_path):
    """``--base sdxl``: the tiny SDXL stand-in, one SFAGS per stack, gradient checkpointing in every variant."""
    out = tmp_path / "gpu_sdxl.json"
    _run("benchmarks.gpu", "--device", "cpu", "--tiny", "--base", "sdxl", "--out", str(out), "--threads", "1",
         "--steps", "1", "--no-search")  # the search does not depend on the base (the SD1.5 run above has it)
    result = json.loads(out.read_text())
    assert "error" not in result and result["budget"]["skipped"] == []
    config, summary, model = result["config"], result["summary"], result["model"]
    assert config["base"] == summary["base"] == model["base_type"] == "sdxl"
    assert config["resolution"] == 64 and config["gradient_checkpointing"] and config["time_budget"] == 170.0
    assert model["base"] == "tiny_sdxl-random(seed=0)" and model["sites"] == "stack" and model["adapter_sites"] == 11
    assert model["projection"]["output_dim"] == 96 and model["params_trainable"] > 0 and model["params_frozen"] > 0
    plain, opt = result["variants"]["plain"], result["variants"]["optimized"]
    for variant in (plain, opt):
        assert "error" not in variant and variant["settings"]["gradient_checkpointing"]
        # model FLOPs: counted on one sample with checkpointing off, the recomputed forward left out
        assert variant["flop_count"] == {"batch": 1, "recompute_counted": False} and variant["gflop_per_sample"] > 0
        assert variant["runs"][0]["batch"] == 2 and variant["runs"][0]["samples_per_s"] > 0
    assert opt["gflop_per_sample"] < plain["gflop_per_sample"]  # no VAE with cached latents
    assert summary["speedup_equal_batch"] > 0 and "search" not in opt
    switches = result["ablation"]["switches"]
    assert set(switches) == {"optimized", "cached_latents", "fused_adam", "channels_last", "cudnn_benchmark",
                             "no_gradient_checkpointing"}
    assert switches["no_gradient_checkpointing"]["settings_on"] == []
    assert [n for n, row in switches.items() if not row["gradient_checkpointing"]] == ["no_gradient_checkpointing"]
    assert all(row["speedup_vs_plain"] > 0 for row in switches.values())
    # The loader's batches carry SDXL's micro-conditioning and the step reads it (its time ids).
    read = set(result["data_path"]["bytes_per_sample"]["keys_read_by_step"])
    assert {"original_size", "crop_top_left", "micro_conditioning", "latent_mean"} <= read


def test_sdxl_random_base_has_sdxl_base_1_0_sizes():
    """The full-size SDXL parts, built on the meta device: the published parameter counts of SDXL base 1.0's
    UNet, VAE and text encoders, and the conditions that tie them together (``SDXLBaseModel.check``)."""
    from benchmarks import sdxl
    from fact_lightning.base_types import SDXL

    base = sdxl.sdxl_random_base_model(seed=0, device="meta")
    counts = {name: sum(p.numel() for p in getattr(base, name).parameters())
              for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                      "text_encoder_2": 694_659_840}
    assert base.cross_attention_dim == 2048 and base.text_encoder_2.config.projection_dim == 1280
    assert base.vae.config.scaling_factor == 0.13025 and base.vae.config.force_upcast
    assert base.tokenizer_2.pad_token == "!" and base.tokenizer.pad_token != "!"
    assert all(not p.requires_grad for m in base.frozen_modules() for p in m.parameters())
    assert sdxl.projection_config(tiny=False).output_dim == 2048 and sdxl.SITES == "stack"
    assert sdxl.SDXLRandomBase().base_type == SDXL
    args = gpu.parse_args(["--device", "cpu", "--base", "sdxl"])
    assert (args.resolution, args.batch, args.max_batch, args.gradient_checkpointing, args.time_budget) == (
        1024, 4, 32, True, 480.0)
    args = gpu.parse_args(["--device", "cpu"])  # SD1.5: the defaults as they were
    assert (args.base, args.resolution, args.batch, args.max_batch, args.gradient_checkpointing,
            args.time_budget) == ("sd15", 512, 8, 64, False, 170.0)


def test_model_flops_leave_out_the_recompute_of_gradient_checkpointing(monkeypatch):
    import torch

    from benchmarks import gpu_step
    from benchmarks.gpu_step import Trainer, plain_variant
    from benchmarks.timing import count_flops

    trainer = Trainer(plain_variant(True), torch.device("cpu"), tiny=True, seed=0, precision="32", base="sdxl")
    flops, how = trainer.flops_per_sample(trainer.batch(2, 64))
    assert how == {"batch": 1, "recompute_counted": False}
    assert trainer.module.unet.is_gradient_checkpointing  # switched back on after the count
    one = trainer.batch(1, 64)
    as_run = count_flops(lambda: trainer.step(one))  # the UNet's forward recomputed in backward counted too
    trainer.module.unet.disable_gradient_checkpointing()
    model = count_flops(lambda: trainer.step(one))
    assert flops == model and as_run > 1.1 * model

    # Where even one sample does not fit without checkpointing, the step is counted as it runs, and says so.
    def one_sample_out_of_memory(fn):
        if not trainer.module.unet.is_gradient_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return count_flops(fn)

    trainer.module.unet.enable_gradient_checkpointing()
    monkeypatch.setattr(gpu_step, "count_flops", one_sample_out_of_memory)
    counted, how = trainer.flops_per_sample(one)
    assert how == {"batch": 1, "recompute_counted": True} and counted == as_run
    assert trainer.module.unet.is_gradient_checkpointing


def test_an_ablation_variant_that_would_not_fit_beside_the_others_is_skipped(monkeypatch):
    import time

    import torch

    from benchmarks import gpu_step
    from benchmarks.budget import Budget

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * gib)
    cuda = torch.device("cuda")
    assert gpu_step.memory_room(cuda, 8.0) == (True, "")  # 8 free + 2 cached by the allocator, unused
    assert gpu_step.memory_room(cuda, 9.0) == (False, "device memory: needs ~9.0 GiB, 10.0 GiB free")  # margin
    assert gpu_step.memory_room(torch.device("cpu"), 1e9) == (True, "")

    budget = Budget(seconds=100.0, start=time.monotonic())
    args = gpu.parse_args(["--device", "cpu", "--tiny", "--base", "sdxl"])
    entry: dict = {}
    estimates = {"build_s": 0.0, "resident_gib": 7.0, "step_extra_gib": 3.0}
    variant = gpu.single_switches(False, checkpointing=True)[-1]
    assert variant == gpu.Variant("no_gradient_checkpointing")
    assert gpu.prepare(variant, entry, args, cuda, budget, estimates, flops=False) is None  # nothing built
    assert entry["skipped"] == "device memory: needs ~10.0 GiB, 10.0 GiB free"
    assert budget.skipped[-1]["phase"] == "no_gradient_checkpointing: build"


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
    # the whole step around the adapted UNet: losses, text encoder, Adam on top of its forward + backward
    assert math.isclose(ratios["step_over_adapter_unet"],
                        variants["step_cached"]["median_s"] / variants["adapter_unet"]["median_s"], rel_tol=1e-2)
    assert ratios["step_over_adapter_unet_flops"] > 1 and ratios["step_over_adapter_unet_min"] > 0
    assert result["environment"]["cpu"] and result["environment"]["torch_threads"] == 1
    assert result["config"]["interleaved"] and result["config"]["resolution"] == 64


def test_attention_on_the_cpu_counts_as_on_the_meta_device():
    """torch's counter has no formula for the CPU attention kernel (it counted SFAGS at 13.4 GFLOPs on the CPU
    against 35.0 on meta); count_flops adds it, so CPU and meta agree on the forward pass."""
    import torch

    from benchmarks.timing import count_flops

    b, h, length, d = 2, 4, 96, 32
    cpu = torch.randn(b, h, length, d)
    counted = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(cpu, cpu, cpu))
    meta = torch.empty(b, h, length, d, device="meta")
    on_meta = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(meta, meta, meta))
    assert counted == on_meta == 4 * b * h * length * length * d  # Q K^T and P V, a multiply-add as 2


def test_interleaved_alternates_the_order():
    calls = []
    variants = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = interleaved(variants, repeats=2, warmup=1)
    assert calls == ["a", "b", "c", "a", "b", "c", "c", "b", "a"]
    assert all(len(t) == 2 and min(t) >= 0 for t in times.values())


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H200 NVL", 835.5), ("NVIDIA H200", 989.5), ("NVIDIA H100 80GB HBM3", 989.5),
    ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5), ("NVIDIA GH200 480GB", 989.5),
    ("NVIDIA L40S", 362.05), ("NVIDIA L40", 181.05), ("NVIDIA L4", 121.0), ("NVIDIA H800", 989.5),
    ("NVIDIA H800 PCIe", 756.5), ("NVIDIA H20", 148.0), ("NVIDIA B200", 2250.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
])
def test_peak_table_matches_whole_names_most_specific_first(name, peak):
    found, source = peaks.peak_for_name(name)
    assert found == peak and name in source


@pytest.mark.parametrize("name", ["NVIDIA A100-SXM4-80GB MIG 1g.10gb", "NVIDIA H100 80GB HBM3 MIG 3g.40gb",
                                  "NVIDIA GeForce RTX 4090", "NVIDIA H1000", "Tesla V100-SXM2-16GB"])
def test_peak_table_refuses_to_guess(name):
    found, reason = peaks.peak_for_name(name)
    assert found is None and "--peak-tflops" in reason
    assert ("MIG" in reason) == ("MIG" in name)


def test_peak_override_and_cpu():
    import torch

    assert gpu.detect_peak_tflops(torch.device("cpu"), 123.0) == (123.0, "--peak-tflops")
    assert gpu.detect_peak_tflops(torch.device("cpu"), None)[0] is None


@pytest.mark.parametrize(("message", "oom"), [
    ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", True),
    ("RuntimeError: CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported", True),
    ("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("RuntimeError: cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", True),
    ("RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory", True),
    ("RuntimeError: CUDA error: an illegal memory access was encountered", False),
    ("RuntimeError: cuDNN error: CUDNN_STATUS_BAD_PARAM", False),
    ("RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x320 and 768x320)", False),
])
def test_allocation_failures_count_as_out_of_memory(message, oom):
    assert batch_search.is_oom(message) is oom


def test_summary_compares_at_equal_batch_and_each_best():
    runs = lambda *r: [{"batch": b, "samples_per_s": s, "mfu": m} for b, s, m in r]  # noqa: E731
    result = {"config": {"batch": 8}, "variants": {
        "plain": {"runs": [*runs((8, 50.0, 0.2), (16, 60.0, 0.25)), {"batch": 32, "error": "OOM"}]},
        "optimized": {"runs": [*runs((8, 120.0, 0.45), (16, 150.0, 0.5), (32, 190.0, 0.55)),
                               {"batch": 64, "error": "OOM"}]},
    }, "ablation": {"switches": {"fused_adam": {"speedup_vs_plain": 0.9}, "compile": {"skipped": "time budget"}}},
        "data_path": {"reader": {"samples_per_s": 480.0}, "step_from_loader": {"samples_per_s": 110.0},
                      "bytes_per_sample": {"total": 5e6, "read_by_step": 1.8e6}}}
    summary = gpu_report.summarize(result)
    assert summary["speedup_equal_batch"] == pytest.approx(2.4)  # both at batch 8
    assert summary["plain_best"]["batch"] == 16 and summary["optimized_best"]["batch"] == 32
    assert summary["speedup_best_vs_best"] == pytest.approx(190.0 / 60.0)
    assert summary["speedup_by_batch"] == {"8": pytest.approx(2.4), "16": pytest.approx(2.5)}
    assert summary["ablation_speedup_vs_plain"] == {"fused_adam": 0.9, "compile": None}
    assert summary["data_path"]["reader_over_step"] == pytest.approx(4.0)
    assert summary["targets"] == {"mfu": 0.5, "speedup": 2.0, "speedup_measured_at": "equal batch",
                                  "mfu_met": True, "speedup_met": True}
    failed = gpu_report.summarize({"config": {"batch": 8}, "variants": {"plain": {"runs": [], "error": "boom"},
                                                                "optimized": {"runs": runs((8, 120.0, None))}}})
    assert "speedup_equal_batch" not in failed and failed["targets"]["speedup_met"] is None


def test_ablation_table_is_plain_over_each_variant():
    settings = lambda *on: {"settings": {s: s in on for s in gpu_report.SWITCHES}}  # noqa: E731
    entries = {"plain": settings(), "optimized": settings("cached_latents", "fused_adam"),
               "fused_adam": settings("fused_adam"), "channels_last": {**settings("channels_last"), "error": "boom"},
               "cudnn_benchmark": {**settings("cudnn_benchmark"), "skipped": "time budget"}}
    times = {"plain": [1.0, 1.2, 1.1], "optimized": [0.5, 0.55, 0.6], "fused_adam": [1.3, 1.2, 1.25]}
    table = gpu_report.ablation_table(times, entries, batch=8)
    rows = table["switches"]
    assert rows["optimized"]["speedup_vs_plain"] == pytest.approx(1.1 / 0.55)
    assert rows["fused_adam"]["speedup_vs_plain"] == pytest.approx(1.1 / 1.25)
    assert rows["fused_adam"]["speedup_vs_plain_fastest"] == pytest.approx(1.0 / 1.2)
    assert rows["fused_adam"]["samples_per_s"] == pytest.approx(8 / 1.25)
    assert rows["channels_last"]["error"] == "boom" and rows["cudnn_benchmark"]["skipped"] == "time budget"
    assert table["slower_than_plain"] == ["fused_adam"]
    assert [v.name for v in gpu.single_switches(False)] == ["cached_latents", "fused_adam", "channels_last",
                                                            "cudnn_benchmark"]
    assert gpu.single_switches(True)[-1] == gpu.Variant("compile", compile=True)


def test_the_budget_counts_from_process_start_and_records_skips():
    import time

    import torch

    from benchmarks.budget import Budget, process_start

    now = time.monotonic()
    start, clock = process_start(now)
    assert start <= now
    if clock.startswith("process start"):  # pytest started well before this test ran
        assert now - start > 0.5
    budget = Budget(seconds=1.0, start=time.monotonic() - 5.0)
    assert not budget.allows("plain: build", 0.0) and budget.left() < 0
    assert budget.skipped[0]["phase"] == "plain: build" and budget.skipped[0]["reason"].startswith("time budget")
    # With the budget spent (here: before anything ran), run_all builds nothing and says what it skipped.
    args = gpu.parse_args(["--device", "cpu", "--tiny"])
    result: dict = {"config": vars(args)}
    gpu.run_all(args, torch.device("cpu"), budget, None, result)
    phases = [s["phase"] for s in budget.skipped]
    assert "optimized: build" in phases and "cached_latents: build" in phases
    assert result["variants"]["plain"]["skipped"] == "time budget" and result["variants"]["plain"]["runs"] == []
    summary = gpu_report.summarize(result)
    assert "speedup_equal_batch" not in summary and gpu_report.failed({**result, "summary": summary})


@pytest.mark.parametrize("oom", [
    "cuda", "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
])
def test_batch_search_stops_at_out_of_memory(monkeypatch, oom):
    """The search doubles, bisects after an out-of-memory (cuBLAS/cuDNN allocation failures too), and records
    the failure (no CUDA needed)."""
    import argparse
    from types import SimpleNamespace

    import torch

    def fake_measure(trainer, size, resolution, warmup, steps, deadline):
        if size > 40:
            if oom == "cuda":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise RuntimeError(oom)
        if size == 24:
            raise RuntimeError("some other failure")
        return {"batch": size, "steps": steps, "step_s": size / 100, "samples_per_s": 100.0, "peak_memory_gib": None}

    monkeypatch.setattr(batch_search, "measure", fake_measure)
    zeroed = []
    trainer = SimpleNamespace(variant=gpu.optimized(False), compile_s=0.0, device=torch.device("cpu"),
                              optimizer=SimpleNamespace(zero_grad=lambda set_to_none: zeroed.append(True)))
    args = argparse.Namespace(batch=8, max_batch=64, search_warmup=1, search_steps=1, resolution=64)
    runs = [{"batch": 8, "step_s": 0.08, "samples_per_s": 100.0}]
    search = batch_search.search_batch(trainer, args, 989.0, 2666.0, deadline=float("inf"), runs=runs)
    assert search == {"tried": [16, 32, 64, 48, 40], "largest_fitting": 40, "smallest_failing": 48,
                      "stopped_by": "out of memory"}
    assert [r["batch"] for r in runs] == [8, 16, 32, 64, 48, 40] and "error" in runs[-2] and zeroed
    assert runs[1]["mfu"] == pytest.approx(2666.0 * 100.0 / 1e3 / 989.0)
    # Another error stops the search; with no time left, nothing is tried.
    runs = [{"batch": 12, "step_s": 0.12, "samples_per_s": 100.0}]
    args.batch = 12
    search = batch_search.search_batch
    assert search(trainer, args, None, 1.0, deadline=float("inf"), runs=runs)["stopped_by"] == "error"
    assert runs[-1] == {"batch": 24, "error": "RuntimeError: some other failure"}
    assert search(trainer, args, None, 1.0, deadline=0.0, runs=runs[:1])["stopped_by"].startswith("time")


def test_data_path_counts_the_bytes_a_sample_ships_and_the_step_reads():
    import torch

    from benchmarks.data_path import ReadKeys, bytes_per_sample

    batch = {"key": ["a", "b"], "caption": ["x", "y"], "pixels": torch.zeros(2, 3, 4, 4),
             "tokens": torch.zeros(2, 5, dtype=torch.float16), "shuffle_available": torch.ones(2, dtype=torch.bool)}
    recorded = ReadKeys(batch)
    _ = recorded["tokens"], recorded["key"], recorded.get("shuffle_available"), recorded.get("latent_mean")
    assert "pixels" in recorded and recorded.read == {"tokens", "key", "shuffle_available"}
    sizes = bytes_per_sample(batch, recorded.read)
    assert sizes["total"] == 3 * 4 * 4 * 4 + 5 * 2 + 1 and sizes["read_by_step"] == 5 * 2 + 1
    assert sizes["by_key"] == {"pixels": 192, "tokens": 10, "shuffle_available": 1}
    assert sizes["keys_not_read"] == ["pixels"]


def test_the_budget_stops_a_phase_that_runs_past_it():
    """A phase that cannot be estimated (the first compilation) is interrupted when the budget runs out."""
    import time

    from benchmarks.budget import Budget, BudgetExceeded

    budget = Budget(seconds=0.3, start=time.monotonic())
    with pytest.raises(BudgetExceeded, match="plain: warm-up"):
        with budget.enforced(), budget.phase("warm-up", "plain: warm-up"):
            try:
                time.sleep(5)
            except Exception:  # a part's own error handling does not swallow it
                pytest.fail("BudgetExceeded was caught as an Exception")
    assert budget.current is None and 0.2 < budget.spent["warm-up"] < 2.0
