"""Training throughput and MFU at full SD1.5 size on one GPU, against a plain diffusers-style loop.

    python -m benchmarks.gpu [--out bench_results/gpu.json] [--compile] [--peak-tflops 989]
    python -m benchmarks.gpu --device cpu --tiny --out tmp/gpu.json     # checks the script in seconds

SD1.5-size random weights (``benchmarks.sd15``), 512 px, the frozen parts in bf16 under bf16 autocast
(``--precision bf16-mixed``, the default on CUDA; ``32``, all float32, is the CPU default), the official Prj and
16 SFAGS in float32. A step is ``FactModule.compute_losses`` + ``loss.backward()`` + gradient clipping (1.0,
the diffusers examples'; configs/sd15*.yaml do not clip, so this slightly overstates their step) + Adam. Two
variants in the same run, at the same batch size (``--batch``, 8):

- ``plain``: the loop as the diffusers training examples write it: VAE and text encoder every step,
  bf16 autocast with float32 trainable weights, non-fused Adam, no compile, no channels-last;
- ``optimized``: cached latents (``latent_mean``/``latent_std`` in the batch, no VAE), bf16 autocast with
  float32 master weights, fused Adam (non-finite steps skipped on the device), channels-last UNet, cuDNN
  autotuning, and with ``--compile`` a ``torch.compile``d UNet (compile time excluded from the timing, reported).

Then the optimized variant at growing batch sizes (doubling up to ``--max-batch``, then bisecting in steps
of 8 after an out-of-memory) for the largest batch that fits. Each run reports samples/s, MFU (FLOPs of one
step counted by ``FlopCounterMode`` over the peak: H100 SXM/H200 989, H100 PCIe 756, A100 312 dense bf16
TFLOP/s, or ``--peak-tflops``) and peak memory. ``--time-budget`` bounds the whole run (warm-up and measured steps shrink, batch sizes are skipped).
One JSON is written at the end even when a variant fails (its error is recorded; the exit status is then 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.sd15 import SD15RandomBase, environment, projection_config, synthetic_batch
from benchmarks.timing import count_flops, synchronize
from fact_lightning.training.module import FactModule

log = logging.getLogger("benchmarks.gpu")

TARGET_MFU, TARGET_SPEEDUP = 0.5, 2.0
GRAD_CLIP = 1.0  # the diffusers examples' max_grad_norm (configs/sd15*.yaml do not clip, as the paper)
# Dense bf16 tensor-core peaks (TFLOP/s), matched against torch.cuda.get_device_name() in this order.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("A100", 312.0))


@dataclass(frozen=True)
class Variant:
    name: str
    cached_latents: bool
    channels_last: bool
    fused_adam: bool
    compile: bool
    cudnn_benchmark: bool


PLAIN = Variant("plain", cached_latents=False, channels_last=False, fused_adam=False, compile=False,
                cudnn_benchmark=False)


def optimized(compile_unet: bool) -> Variant:
    return Variant("optimized", cached_latents=True, channels_last=True, fused_adam=True, compile=compile_unet,
                   cudnn_benchmark=True)


def detect_peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The device's dense bf16 peak and where it came from."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for this device (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS:
        if key in name:
            return peak, f"detected from {name!r}"
    return None, f"unknown for {name!r} (give --peak-tflops)"


class Trainer:
    """One variant's module and optimizer, and its training step (what Lightning's loop does, minus logging)."""

    def __init__(self, variant: Variant, device: torch.device, tiny: bool, seed: int, precision: str = "bf16-mixed"):
        self.variant, self.device = variant, device
        self.mixed = precision == "bf16-mixed"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = variant.cudnn_benchmark
        frozen = "bfloat16" if self.mixed else "float32"
        self.module = FactModule(SD15RandomBase(seed=seed, device=str(device), frozen_dtype=frozen, tiny=tiny),
                                 projection_config(tiny), channels_last=variant.channels_last)
        self.module.configure_model()  # compile is applied after counting FLOPs (see compile_unet)
        self.module.to(device).train()
        self.params = [p for p in self.module.adapter.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-4, fused=True if variant.fused_adam else None)
        self.token_dim = self.module.projection_config.token_dim
        self.steps = 0
        self.compile_s = 0.0  # measured on the first compiled step

    def batch(self, size: int, resolution: int) -> dict:
        return synthetic_batch(size, resolution, self.token_dim, device=self.device,
                               cached_latents=self.variant.cached_latents, seed=size)

    def step(self, batch: dict) -> None:
        self.steps += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed):
            loss = self.module.compute_losses(batch, self.steps)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        if self.variant.fused_adam:  # as FactModule.training_step: a non-finite step is skipped on the device
            self.optimizer.found_inf = 1.0 - torch.isfinite(loss.detach()).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def compile_unet(self) -> None:
        """What ``FactModule(compile=True)`` does in ``configure_model``: the UNet compiled in place."""
        self.module.unet.compile()

    def release(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        del self.module, self.optimizer, self.params


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(trainer: Trainer, batch_size: int, resolution: int, warmup: int, steps: int, deadline: float) -> dict:
    """Warm-up steps, then ``steps`` timed steps (fewer if the time budget runs short): samples/s."""
    device = trainer.device
    batch = trainer.batch(batch_size, resolution)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = []
    for _ in range(max(warmup, 1)):
        synchronize(device)
        start = time.perf_counter()
        trainer.step(batch)
        synchronize(device)
        warm.append(time.perf_counter() - start)
    left = deadline - time.perf_counter()
    n = max(1, min(steps, math.floor(0.5 * left / warm[-1]))) if left > 0 else 1
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        trainer.step(batch)
    synchronize(device)
    elapsed = time.perf_counter() - start
    run = {"batch": batch_size, "steps": n, "step_s": elapsed / n, "samples_per_s": batch_size * n / elapsed,
           "warmup_steps": len(warm), "warmup_s": sum(warm), "first_step_s": warm[0]}
    run["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return run


def add_mfu(run: dict, gflop_per_sample: float | None, peak_tflops: float | None) -> dict:
    if gflop_per_sample is not None:
        run["tflop_per_s"] = gflop_per_sample * run["samples_per_s"] / 1e3
        run["mfu"] = run["tflop_per_s"] / peak_tflops if peak_tflops else None
    return run


def run_variant(variant: Variant, args: argparse.Namespace, device: torch.device, peak: float | None,
                deadline: float, search: bool) -> dict:
    """Builds the variant, counts one step's FLOPs, measures it at ``args.batch`` and, with ``search``,
    at growing batch sizes. Errors end up in the returned dict, never raised."""
    out: dict = {"settings": asdict(variant), "runs": []}
    trainer = None
    try:
        log.info("[%s] building (%s)", variant.name, "tiny" if args.tiny else "SD1.5 size")
        start = time.perf_counter()
        trainer = Trainer(variant, device, args.tiny, args.seed, args.precision)
        out["build_s"] = time.perf_counter() - start
        log.info("[%s] counting the FLOPs of one step at batch %d", variant.name, args.batch)
        flops_batch = trainer.batch(args.batch, args.resolution)
        out["gflop_per_sample"] = count_flops(lambda: trainer.step(flops_batch)) / 1e9 / args.batch
        del flops_batch
        if variant.compile:
            trainer.compile_unet()
        run = measure(trainer, args.batch, args.resolution, args.warmup, args.steps, deadline)
        if variant.compile:  # the first call traces and compiles; each new batch size recompiles
            out["compile_s"] = trainer.compile_s = run["first_step_s"] - run["step_s"]
        out["runs"].append(add_mfu(run, out["gflop_per_sample"], peak))
        log.info("[%s] batch %d: %.2f samples/s, MFU %s, peak memory %s GiB", variant.name, args.batch,
                 run["samples_per_s"], _fmt(run.get("mfu")), _fmt(run["peak_memory_gib"]))
    except Exception as err:  # a CLI benchmark: record the failure, still write the JSON
        out["error"] = _error(err)
        log.exception("[%s] failed", variant.name)
    if search and "error" not in out:
        try:
            out["search"] = search_batch(trainer, args, peak, out["gflop_per_sample"], deadline, out["runs"])
        except Exception as err:  # keep the runs measured so far
            out["search"] = {"error": _error(err)}
            log.exception("[%s] batch search failed", variant.name)
        fits = [r for r in out["runs"] if "error" not in r]
        out["largest_batch"] = max(fits, key=lambda r: r["batch"])["batch"]
    if trainer is not None:
        trainer.release()
    del trainer
    free_memory(device)
    return out


def search_batch(trainer: Trainer, args: argparse.Namespace, peak: float | None, gflop_per_sample: float,
                 deadline: float, runs: list[dict]) -> dict:
    """Doubles the batch from ``args.batch`` up to ``args.max_batch``; after an out-of-memory, bisects between
    the largest batch that fitted and the smallest that did not, in multiples of 8 (a few tries at most)."""
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
        if time.perf_counter() + needed > deadline:
            stop = f"time budget: batch {size} skipped"
            break
        tried.append(size)
        try:
            run = measure(trainer, size, args.resolution, args.search_warmup, args.search_steps, deadline)
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one; the CPU allocator raises a plain one
            error = _error(err)
            run = None
        if run is None:
            trainer.optimizer.zero_grad(set_to_none=True)
            free_memory(trainer.device)
            runs.append({"batch": size, "error": error})
            log.info("[%s] batch %d: %s", trainer.variant.name, size, error.splitlines()[0][:160])
            if not _is_oom(error):
                stop = "error"
                break
            failed, stop = size, "out of memory"
        else:
            runs.append(add_mfu(run, gflop_per_sample, peak))
            last_ok = size
            log.info("[%s] batch %d: %.2f samples/s, MFU %s, peak memory %s GiB", trainer.variant.name, size,
                     run["samples_per_s"], _fmt(run.get("mfu")), _fmt(run["peak_memory_gib"]))
        if failed is not None:  # bisect between the largest fitting and the smallest failing batch
            mid = (last_ok + failed) // 2 // 8 * 8
            candidates = [mid] if failed - last_ok > 8 and mid > last_ok and mid not in tried else []
    return {"tried": tried, "largest_fitting": last_ok, "smallest_failing": failed, "stopped_by": stop}


def summarize(result: dict) -> dict:
    """Headline numbers: both variants at the same batch, the speedup, the best optimized run, the targets."""
    plain, opt = result["variants"].get("plain", {}), result["variants"].get("optimized", {})
    ok = lambda v: [r for r in v.get("runs", []) if "error" not in r]  # noqa: E731
    summary: dict = {"batch": result["config"]["batch"]}
    if ok(plain):
        summary["plain_samples_per_s"] = ok(plain)[0]["samples_per_s"]
        summary["plain_mfu"] = ok(plain)[0].get("mfu")
    if ok(opt):
        summary["optimized_samples_per_s"] = ok(opt)[0]["samples_per_s"]
        summary["optimized_mfu"] = ok(opt)[0].get("mfu")
        best = max(ok(opt), key=lambda r: r["samples_per_s"])
        summary["best"] = {k: best.get(k) for k in ("batch", "samples_per_s", "mfu", "peak_memory_gib")}
    if ok(plain) and ok(opt):
        summary["speedup"] = summary["optimized_samples_per_s"] / summary["plain_samples_per_s"]
        summary["speedup_best_batch"] = summary["best"]["samples_per_s"] / summary["plain_samples_per_s"]
    best_mfu, best_speedup = summary.get("best", {}).get("mfu"), summary.get("speedup_best_batch")
    summary["targets"] = {"mfu": TARGET_MFU, "speedup": TARGET_SPEEDUP,
                          "mfu_met": None if best_mfu is None else best_mfu >= TARGET_MFU,
                          "speedup_met": None if best_speedup is None else best_speedup >= TARGET_SPEEDUP}
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny components (with --device cpu: the CI check)")
    parser.add_argument("--out", type=Path, default=Path("bench_results") / "gpu.json")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (512; 64 with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="batch of the plain/optimized comparison (8; 2 tiny)")
    parser.add_argument("--max-batch", type=int, default=None, help="bound of the batch search (64; 4 tiny)")
    parser.add_argument("--no-search", dest="search", action="store_false", help="skip the largest-batch search")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per run (5; 1 tiny)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run, at most (20; 2 tiny)")
    parser.add_argument("--search-warmup", type=int, default=2)
    parser.add_argument("--search-steps", type=int, default=None, help="measured steps per searched batch (8; 2 tiny)")
    parser.add_argument("--time-budget", type=float, default=170.0,
                        help="seconds for the whole benchmark after start-up (measured steps shrink to fit)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet in the optimized variant")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak (default: detected from the GPU's name)")
    parser.add_argument("--precision", choices=("bf16-mixed", "32"), default=None,
                        help="bf16-mixed: frozen parts in bf16, autocast, float32 adapter (default on CUDA); "
                             "32: everything float32 (default on the CPU, where bf16 is slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = {"resolution": 64 if tiny else 512, "batch": 2 if tiny else 8, "max_batch": 4 if tiny else 64,
                "warmup": 1 if tiny else 5, "steps": 2 if tiny else 20, "search_steps": 2 if tiny else 8}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16-mixed" if torch.device(args.device).type == "cuda" else "32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fact_lightning").setLevel(logging.WARNING)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every cast
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    deadline = start + args.time_budget
    device = torch.device(args.device)
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "environment": environment(), "variants": {}}
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device")
        peak, source = detect_peak_tflops(device, args.peak_tflops)
        result["peak_tflops"], result["peak_source"] = peak, source
        log.info("device %s, peak %s TFLOP/s (%s), budget %.0f s", device, peak, source, args.time_budget)
        result["variants"]["plain"] = run_variant(PLAIN, args, device, peak, deadline, search=False)
        result["variants"]["optimized"] = run_variant(optimized(args.compile), args, device, peak, deadline,
                                                      search=args.search)
    except Exception as err:  # e.g. no CUDA: still one JSON, with the error
        result["error"] = _error(err)
        log.exception("benchmark failed")
    result["summary"] = summarize(result)
    result["wall_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")
    failed = "error" in result or any("error" in v for v in result["variants"].values())
    return 1 if failed or len(result["variants"]) < 2 else 0


def _is_oom(error: str) -> bool:
    return "OutOfMemoryError" in error or "out of memory" in error or "can't allocate memory" in error


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
