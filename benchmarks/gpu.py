"""Training throughput and MFU at full SD1.5 or SDXL size on one GPU, against a plain diffusers-style loop.

    python -m benchmarks.gpu [--out bench_results/gpu.json] [--compile] [--peak-tflops 989.5]
    python -m benchmarks.gpu --base sdxl --out bench_results/gpu_sdxl.json     # SDXL base 1.0 size, 1024 px
    python -m benchmarks.gpu --device cpu --tiny [--base sdxl] --out tmp/gpu.json   # checks the script on a CPU

``--base sd15`` (the default): SD1.5-size random weights (``benchmarks.sd15``), 512 px, the official Prj and 16
SFAGS. ``--base sdxl``: SDXL base 1.0-size random weights (``benchmarks.sdxl``: UNet, VAE, CLIP ViT-L and
OpenCLIP bigG), 1024 px (128x128 latents), Prj with a 2048-wide output and one SFAGS per transformer stack
(``sites: stack``, 11), time ids from the batch's micro-conditioning, and gradient checkpointing in every variant
as configs/sdxl.yaml has it (``--no-gradient-checkpointing`` drops it). The frozen parts in bf16 under bf16
autocast (``--precision bf16-mixed``, the default on CUDA; ``32``, all float32, is the CPU default), Prj and SFAGS
in float32. A step is ``FactModule.compute_losses`` + ``loss.backward()`` + gradient clipping (1.0, the diffusers
examples'; configs/sd15*.yaml do not clip, so this slightly overstates their step) + Adam.

- ``plain``: the loop as the diffusers training examples write it: VAE and text encoder(s) every step, bf16
  autocast with float32 trainable weights, non-fused Adam, no compile, no channels-last;
- ``optimized``: every switch on: cached latents (``latent_mean``/``latent_std`` in the batch, no VAE), fused
  Adam (non-finite steps skipped on the device), channels-last UNet and VAE, cuDNN autotuning, and with
  ``--compile`` a ``torch.compile``d UNet;
- the ablation: plain with ONE switch on, for each switch, so that a switch that hurts shows; with gradient
  checkpointing also plain without it (``no_gradient_checkpointing``: what it costs, or the out-of-memory that
  says the step needs it).

All of them run at the same batch (``--batch``, 8; sdxl 4), alternating step by step in one loop
(``timing.interleaved``, medians): the headline ``speedup_equal_batch`` and the ``ablation`` ratios compare equal
work under equal load. All stay resident for that loop: on a GPU an ablation variant is built only if the memory
that one variant held (measured) and the most a step added still fit, else it is skipped (``device memory``).
Then ``plain`` and ``optimized`` each search their own largest batch (doubling up to ``--max-batch``, 64; sdxl
32; bisecting in steps of 8 after an out-of-memory, cuBLAS/cuDNN allocation failures included), and each reports
its best batch; ``speedup_best_vs_best`` compares the two at their own best batches. The data path runs the
optimized step from ``FactDataModule`` over synthetic shards with cached latents (``benchmarks.data_path``): the
reader's samples/s alone and the bytes per sample shipped to the device. One optimized step runs under
``benchmarks.step_copies.HostCopyCounter``: its host-to-device copies and host reads.

MFU: model FLOPs of one step (``FlopCounterMode``; with gradient checkpointing counted on one sample with it off,
since the forward it recomputes is not the model's work: ``flop_count`` says how) over the dense bf16 peak of the
GPU (``benchmarks.peaks``, read from the device's name; a name not in the table or a MIG slice gives no MFU, with
the reason) or ``--peak-tflops``. ``--time-budget`` (170 s; full-size sdxl 480 s) bounds the whole run from the
start of the process: imports, building, FLOP counts, compilation, warm-up and measured steps all spend it; each
phase checks what is left first, what did not fit is listed under ``budget.skipped``, and a phase still running
when the budget ends (a first compilation has no estimate) is interrupted. One JSON is written at the end even
when a part fails or is cut short (its error is recorded; the exit status is then 1, as when the equal-batch
speedup is missing); ``config.base``, ``summary.base`` and ``model`` (the base, the adapter sites, trainable and
frozen parameters) say what was trained.
"""

from __future__ import annotations

import time

_IMPORTED = time.monotonic()  # before the heavy imports: the clock's start where the OS does not record it

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from benchmarks import data_path  # noqa: E402
from benchmarks.batch_search import is_oom, run_search  # noqa: E402
from benchmarks.budget import Budget, BudgetExceeded, process_start  # noqa: E402
from benchmarks.gpu_step import (BASES, Trainer, Variant, add_mfu, error_text, fmt,  # noqa: E402
                                 count_step_copies, free_memory, memory_room, optimized, peak_gib, plain_variant,
                                 single_switches, timed_steps)
from benchmarks.gpu_report import ablation_table, failed, summarize  # noqa: E402
from benchmarks.peaks import detect_peak_tflops, device_name  # noqa: E402,F401  (detect_peak_tflops: API)
from benchmarks.sd15 import environment  # noqa: E402
from benchmarks.timing import interleaved  # noqa: E402

log = logging.getLogger("benchmarks.gpu")

EQUAL_BATCH_SHARE = 0.5  # of the time left when the equal-batch timing starts, if later phases follow


def prepare(variant: Variant, entry: dict, args: argparse.Namespace, device: torch.device, budget: Budget,
            estimates: dict, flops: bool) -> Trainer | None:
    """Builds a variant, counts one step's FLOPs (with ``flops``), compiles it and warms it up at ``args.batch``,
    each phase only if the budget allows it; returns the trainer, or None. What it measured, and its errors,
    go into ``entry``: never raised."""
    name, trainer = variant.name, None
    try:
        if not budget.allows(f"{name}: build", estimates.get("build_s", 0.0)):
            entry["skipped"] = "time budget"
            return None
        if name not in ("plain", "optimized") and "resident_gib" in estimates:
            # Every variant stays resident for the interleaved timing: one more must leave room for any one step.
            fits, reason = memory_room(device, estimates["resident_gib"] + estimates["step_extra_gib"])
            if not fits:
                entry["skipped"] = reason
                budget.skip(f"{name}: build", reason)
                return None
        log.info("[%s] building (%s)", name, f"tiny {args.base}" if args.tiny else f"{args.base} size")
        allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with budget.phase("build", f"{name}: build"):
            start = time.monotonic()
            trainer = Trainer(variant, device, args.tiny, args.seed, args.precision, args.base)
            entry["build_s"] = estimates["build_s"] = time.monotonic() - start
        batch = trainer.batch(args.batch, args.resolution)
        if flops:
            entry["gflop_per_sample"] = None
            if budget.allows(f"{name}: FLOP count", estimates.get("step_s", 0.0)):
                log.info("[%s] counting the FLOPs of one step", name)
                with budget.phase("flop count", f"{name}: FLOP count"):
                    start = time.monotonic()
                    flop, entry["flop_count"] = trainer.flops_per_sample(batch)
                    entry["gflop_per_sample"] = flop / 1e9
                    estimates.setdefault("step_s", time.monotonic() - start)
        needed = estimates.get("step_s", 0.0) * max(args.warmup, 1)
        if variant.compile:  # compiled on the first warm-up step: as long as the last compilation, if any
            trainer.compile_unet()
            needed += estimates.get("compile_s", 0.0)
        if not budget.allows(f"{name}: warm-up", needed):
            entry["skipped"] = "time budget"
            trainer.release()
            return None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
        with budget.phase("warm-up (compilation included)", f"{name}: warm-up"):
            warm = timed_steps(trainer, batch, max(args.warmup, 1))
        entry["warmup"] = {"steps": len(warm), "seconds": sum(warm), "first_step_s": warm[0], "last_step_s": warm[-1],
                           "peak_memory_gib": peak_gib(device), "resident_gib_before": resident}
        if device.type == "cuda":  # what one more trainer holds, and the most any step adds on top
            estimates["resident_gib"] = (torch.cuda.memory_allocated(device) - allocated) / 2**30
            estimates["step_extra_gib"] = max(estimates.get("step_extra_gib", 0.0), peak_gib(device) - resident)
        estimates["step_s"] = warm[-1]
        if variant.compile:
            estimates["compile_s"] = max(warm[0] - warm[-1], 0.0)
        trainer.bench_batch = batch
        return trainer
    except Exception as err:  # a CLI benchmark: record the failure, still write the JSON
        entry["error" if not is_oom(error_text(err)) or name in ("plain", "optimized") else "skipped"] = error_text(err)
        log.exception("[%s] failed", name)
        if trainer is not None:
            trainer.release()
        free_memory(device)
        return None


def equal_batch(trainers: dict[str, Trainer], entries: dict[str, dict], args: argparse.Namespace,
                budget: Budget, peak: float | None) -> dict[str, list[float]]:
    """Every ready variant at ``args.batch``, alternating step by step in one loop: seconds per step of each.

    Takes at most a share of the time left (all of it when nothing follows); drops the ablation variants first
    when even one round of all of them does not fit."""
    later = args.search or args.data_path
    share = EQUAL_BATCH_SHARE if later else 0.9
    names = list(trainers)
    round_s = lambda ns: sum(entries[n]["warmup"]["last_step_s"] for n in ns)  # noqa: E731
    left = budget.left()
    if share * left < round_s(names) and len(names) > 2:
        for n in names[2:]:
            budget.skip(f"{n}: equal-batch timing", "time budget: one round of every variant does not fit")
            entries[n]["skipped"] = "time budget"
        names = names[:2]
    repeats = min(args.steps, math.floor(share * left / round_s(names))) if round_s(names) > 0 else args.steps
    if repeats < 1:
        if not budget.allows("equal-batch timing", round_s(names)):
            return {}
        repeats = 1
    log.info("equal batch %d: %s, %d interleaved rounds", args.batch, ", ".join(names), repeats)
    with budget.phase("equal-batch timing"):
        times = interleaved({n: partial(trainers[n].step, trainers[n].bench_batch) for n in names}, repeats,
                            warmup=0, device=trainers[names[0]].device)
    for name, seconds in times.items():
        entry, median = entries[name], statistics.median(seconds)
        run = {"batch": args.batch, "steps": len(seconds), "interleaved": True, "step_s": median,
               "step_s_min": min(seconds), "samples_per_s": args.batch / median,
               "warmup_steps": entry["warmup"]["steps"], "warmup_s": entry["warmup"]["seconds"],
               "first_step_s": entry["warmup"]["first_step_s"], "peak_memory_gib": entry["warmup"]["peak_memory_gib"]}
        if trainers[name].variant.compile:  # the first call traces and compiles; each new batch size recompiles
            entry["compile_s"] = trainers[name].compile_s = max(run["first_step_s"] - median, 0.0)
        entry["runs"].append(add_mfu(run, entry.get("gflop_per_sample"), peak))
        log.info("[%s] batch %d: %.2f samples/s, MFU %s", name, args.batch, run["samples_per_s"], fmt(run.get("mfu")))
    return times


def run_all(args: argparse.Namespace, device: torch.device, budget: Budget, peak: float | None, result: dict) -> None:
    """The phases in order, each within what is left of the budget (see the module doc)."""
    checkpointing = args.gradient_checkpointing
    variants = [plain_variant(checkpointing), optimized(args.compile, checkpointing)]
    variants += single_switches(args.compile, checkpointing) if args.ablation else []
    trainers: dict[str, Trainer] = {}
    entries: dict[str, dict] = {}
    estimates: dict = {}
    result["variants"] = {}
    try:
        for variant in variants:
            entries[variant.name] = entry = {"settings": asdict(variant), "runs": []}
            if variant.name in ("plain", "optimized"):
                result["variants"][variant.name] = entry
            trainer = prepare(variant, entry, args, device, budget, estimates,
                              flops=variant.name in ("plain", "optimized"))
            if trainer is not None:
                trainers[variant.name] = trainer
                result.setdefault("model", trainer.describe())
        times = equal_batch(trainers, entries, args, budget, peak) if trainers else {}
        if args.ablation:
            result["ablation"] = ablation_table(times, entries, args.batch)
        opt, plain = trainers.get("optimized"), trainers.get("plain")
        if opt is not None and budget.allows("host-copy count", 6 * estimates.get("step_s", 0.0)):
            with budget.phase("host-copy count"):
                try:
                    result["step_host_copies"] = count_step_copies(opt)
                except Exception as err:
                    result["step_host_copies"] = {"error": error_text(err)}
                    log.exception("[host-copy count] failed")
        if args.data_path and opt is not None:
            needed = 4 * estimates.get("step_s", 0.0) + 2.0
            if budget.allows("data path", needed):
                seconds = max(0.25 * budget.left() / 2, estimates.get("step_s", 0.0))
                with budget.phase("data path"):
                    try:
                        result["data_path"] = data_path.measure(
                            opt, batch_size=args.batch, resolution=args.resolution, workers=args.data_workers,
                            batches=args.data_batches, seconds=seconds, seed=args.seed)
                    except Exception as err:
                        result["data_path"] = {"error": error_text(err)}
                        log.exception("[data path] failed")
        for name in [n for n in trainers if n not in ("plain", "optimized")]:
            trainers.pop(name).release()
        free_memory(device)
        if args.search:  # each alone on the device but for the other's weights; optimized first, then plain alone
            if opt is not None:
                deadline = budget.deadline if plain is None else time.monotonic() + budget.left() / 2
                run_search(opt, entries["optimized"], args, peak, budget, deadline)
                trainers.pop("optimized").release()
                free_memory(device)
            if plain is not None:
                run_search(plain, entries["plain"], args, peak, budget, budget.deadline)
    finally:
        for trainer in trainers.values():
            trainer.release()
        trainers.clear()
        free_memory(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--base", choices=tuple(BASES), default="sd15",
                        help="the frozen base: SD1.5 (16 SFAGS) or SDXL base 1.0 (Prj to 2048, sites: stack)")
    parser.add_argument("--tiny", action="store_true", help="tiny components (with --device cpu: the CI check)")
    parser.add_argument("--out", type=Path, default=Path("bench_results") / "gpu.json")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (512, sdxl 1024; 64 with --tiny)")
    parser.add_argument("--batch", type=int, default=None,
                        help="the equal batch of every variant (8, sdxl 4; 2 tiny)")
    parser.add_argument("--max-batch", type=int, default=None, help="bound of the batch searches (64, sdxl 32; "
                                                                    "4 tiny)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute the UNet's activations in backward in every variant, the ablation adding "
                             "one without (default: on for sdxl, whose 1024 px step needs it to fit; off for sd15)")
    parser.add_argument("--no-search", dest="search", action="store_false", help="skip the largest-batch searches")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the one-switch variants")
    parser.add_argument("--no-data-path", dest="data_path", action="store_false", help="skip the data-path figure")
    parser.add_argument("--data-workers", type=int, default=None, help="reader processes of the data path (4; 0 tiny)")
    parser.add_argument("--data-batches", type=int, default=None, help="batches read/trained on in the data path "
                                                                       "(20; 3 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (5; 1 tiny)")
    parser.add_argument("--steps", type=int, default=None,
                        help="interleaved rounds at the equal batch, at most (20; 2 tiny)")
    parser.add_argument("--search-warmup", type=int, default=2)
    parser.add_argument("--search-steps", type=int, default=None, help="measured steps per searched batch (8; 2 tiny)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole run from the start of the process (imports, building, FLOP "
                             "counts, compilation, warm-up and measured steps included; 170, full-size sdxl 480)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet in the optimized variant "
                                                                "(and ablate it)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak (default: from the GPU's name; none for unknown GPUs "
                             "and MIG slices)")
    parser.add_argument("--precision", choices=("bf16-mixed", "32"), default=None,
                        help="bf16-mixed: frozen parts in bf16, autocast, float32 adapter (default on CUDA); "
                             "32: everything float32 (default on the CPU, where bf16 is slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tiny, xl = args.tiny, args.base == "sdxl"
    defaults = {"resolution": 64 if tiny else 1024 if xl else 512, "batch": 2 if tiny else 4 if xl else 8,
                "max_batch": 4 if tiny else 32 if xl else 64, "warmup": 1 if tiny else 5, "steps": 2 if tiny else 20,
                "search_steps": 2 if tiny else 8, "data_workers": 0 if tiny else 4, "data_batches": 3 if tiny else 20,
                "gradient_checkpointing": xl, "time_budget": 480.0 if xl and not tiny else 170.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "bf16-mixed" if torch.device(args.device).type == "cuda" else "32"
    return args


def main(argv: list[str] | None = None) -> int:
    start, clock = process_start(_IMPORTED)
    args = parse_args(argv)
    budget = Budget(args.time_budget, start, clock)
    budget.spent["start-up (imports)"] = budget.elapsed()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fact_lightning").setLevel(logging.WARNING)
    logging.getLogger("data_tools").setLevel(logging.WARNING)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every cast
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "environment": environment(), "variants": {}}
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device")
        peak, source = detect_peak_tflops(device, args.peak_tflops)
        result.update(device_name=device_name(device), peak_tflops=peak, peak_source=source)
        if peak is None:
            result["mfu_unavailable"] = source
        log.info("device %s, peak %s TFLOP/s (%s), budget %.0f s from %s (%.1f s spent)", result["device_name"],
                 peak, source, args.time_budget, clock, budget.elapsed())
        with budget.enforced():
            run_all(args, device, budget, peak, result)
    except BudgetExceeded as stop:  # what was measured so far still goes into the JSON
        budget.skip(budget.current or "the rest of the run", str(stop))
        result["stopped_by_budget"] = str(stop)
        log.warning("%s: writing what was measured", stop)
    except Exception as err:  # e.g. no CUDA: still one JSON, with the error
        result["error"] = error_text(err)
        log.exception("benchmark failed")
    result["summary"] = summarize(result)
    result["budget"] = budget.report()
    result["wall_s"] = budget.elapsed()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {args.out}")
    return 1 if failed(result) else 0


if __name__ == "__main__":
    sys.exit(main())
