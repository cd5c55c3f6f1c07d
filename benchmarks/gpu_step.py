"""The training step that ``benchmarks.gpu`` times: its variants (which speed-ups are switched on), the trainer
that runs one variant on an SD1.5- or SDXL-size random base, and the timing of a variant alone (``measure``, used by
the batch search)."""

from __future__ import annotations

import contextlib
import gc
import math
import time
from dataclasses import dataclass, replace

import torch

from benchmarks import sd15, sdxl
from benchmarks.step_copies import HostCopyCounter
from benchmarks.timing import count_flops, synchronize
from fact_lightning.base_types import SD15, SDXL
from fact_lightning.training.module import FactModule

GRAD_CLIP = 1.0  # the diffusers examples' max_grad_norm (configs/sd15*.yaml do not clip, as the paper)
SWITCHES = ("cached_latents", "fused_adam", "channels_last", "cudnn_benchmark", "compile")
MEMORY_MARGIN = 1.15  # over a variant's measured memory before another is built beside it (fragmentation)
NO_CHECKPOINTING = "no_gradient_checkpointing"  # the ablation's variant without it, when the baseline has it
# Per base: the random frozen parts, Prj, the adapter sites and the synthetic batch.
BASES = {SD15: (sd15.SD15RandomBase, sd15.projection_config, "block", sd15.synthetic_batch),
         SDXL: (sdxl.SDXLRandomBase, sdxl.projection_config, sdxl.SITES, sdxl.synthetic_batch)}


@dataclass(frozen=True)
class Variant:
    name: str
    cached_latents: bool = False
    channels_last: bool = False
    fused_adam: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    # Not a speed switch: memory for time. When on, it is on in every variant but the ablation's NO_CHECKPOINTING.
    gradient_checkpointing: bool = False


PLAIN = Variant("plain")


def plain_variant(checkpointing: bool = False) -> Variant:
    return replace(PLAIN, gradient_checkpointing=checkpointing)


def optimized(compile_unet: bool, checkpointing: bool = False) -> Variant:
    return Variant("optimized", cached_latents=True, channels_last=True, fused_adam=True, compile=compile_unet,
                   cudnn_benchmark=True, gradient_checkpointing=checkpointing)


def single_switches(compile_unet: bool, checkpointing: bool = False) -> list[Variant]:
    """The ablation: the plain loop with one switch on (compile only with ``--compile``); with ``checkpointing``
    (on in the plain loop too) also the plain loop without it, to show what it costs, or that it is needed."""
    baseline = plain_variant(checkpointing)
    variants = [replace(baseline, name=s, **{s: True}) for s in SWITCHES if s != "compile" or compile_unet]
    if checkpointing:
        variants.append(replace(PLAIN, name=NO_CHECKPOINTING))
    return variants


class Trainer:
    """One variant's module and optimizer, and its training step (what Lightning's loop does, minus logging)."""

    def __init__(self, variant: Variant, device: torch.device, tiny: bool, seed: int, precision: str = "bf16-mixed",
                 base: str = SD15):
        self.variant, self.device = variant, device
        self.mixed = precision == "bf16-mixed"
        frozen = "bfloat16" if self.mixed else "float32"
        spec, projection, sites, self._synthetic_batch = BASES[base]
        self.module = FactModule(spec(seed=seed, device=str(device), frozen_dtype=frozen, tiny=tiny),
                                 projection(tiny), sites=sites, channels_last=variant.channels_last,
                                 gradient_checkpointing=variant.gradient_checkpointing)
        self.module.configure_model()  # compile is applied after counting FLOPs (see compile_unet)
        self.module.to(device).train()
        self.params = [p for p in self.module.adapter.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-4, fused=True if variant.fused_adam else None)
        self.token_dim = self.module.projection_config.token_dim
        self.steps = 0
        self.compile_s = 0.0  # measured on the first compiled step
        self.bench_batch: dict | None = None

    def batch(self, size: int, resolution: int) -> dict:
        return self._synthetic_batch(size, resolution, self.token_dim, device=self.device,
                                     cached_latents=self.variant.cached_latents, seed=size)

    def flops_per_sample(self, batch: dict) -> tuple[float, dict]:
        """FLOPs per sample of one step on ``batch`` (its step runs), and how they were counted.

        With gradient checkpointing they are the model's FLOPs (MFU's): the step is counted with checkpointing
        off, on one sample of the batch to keep its activations small, since the forward it recomputes in backward
        is not the model's work (Prj(zeros), computed once per step, then counts once per sample: +0.2% at SDXL
        size and batch 4). If even that does not fit, the step as it runs is counted (recompute included)."""
        size = len(batch["key"])
        if not self.variant.gradient_checkpointing:
            return count_flops(lambda: self.step(batch)) / size, {"batch": size, "recompute_counted": False}
        one = {k: v[:1] for k, v in batch.items()}
        self.module.unet.disable_gradient_checkpointing()
        try:
            return count_flops(lambda: self.step(one)), {"batch": 1, "recompute_counted": False}
        except torch.OutOfMemoryError:
            pass  # memory freed below, once the error and its frames are gone
        finally:
            self.module.unet.enable_gradient_checkpointing()
        self.optimizer.zero_grad(set_to_none=True)
        free_memory(self.device)
        return count_flops(lambda: self.step(batch)) / size, {"batch": size, "recompute_counted": True}

    def describe(self) -> dict:
        """The model this trainer trains: the base, the adapter sites and the parameter counts."""
        module = self.module
        # The UNet holds the adapter's blocks (in its GLIGEN slots): its trainable parameters are the adapter's.
        frozen = sum(p.numel() for m in module.base_model.frozen_modules() for p in m.parameters()
                     if not p.requires_grad)
        return {"base": module.base_spec.describe(), "base_type": module.base_spec.base_type,
                "sites": module.hparams.sites, "adapter_sites": len(module.adapter.sites),
                "params_trainable": sum(p.numel() for p in self.params), "params_frozen": frozen,
                "projection": module.projection_config.to_dict()}

    def step(self, batch: dict) -> None:
        if self.device.type == "cuda":  # a process-wide flag: set for each variant's step (they alternate)
            torch.backends.cudnn.benchmark = self.variant.cudnn_benchmark
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

    def device_tensors(self) -> list:
        """Everything of this trainer that lives on the device (for ``HostCopyCounter``)."""
        return [*self.module.parameters(), *self.module.buffers(), list(self.optimizer.state.values())]

    def release(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        del self.module, self.optimizer, self.params, self.bench_batch


def count_step_copies(trainer: Trainer) -> dict:
    """Two steps of ``trainer`` under ``HostCopyCounter``; the second's host-to-device copies and host reads (the
    first also pays one-time moves, e.g. the noise schedule's table on its first use)."""
    counter = HostCopyCounter(trainer.device, [trainer.device_tensors(), trainer.bench_batch])
    # A compiled UNet runs eagerly here: the mode would otherwise be a new guard, and a recompilation.
    eager = torch.compiler.set_stance("force_eager") if trainer.variant.compile else contextlib.nullcontext()
    with eager:
        for step in (0, 1):
            with counter.at_step(step):
                trainer.step(trainer.bench_batch)
    copies, reads = [e for e in counter.copies if e.step == 1], [e for e in counter.syncs if e.step == 1]
    blocking = [e for e in copies if not e.non_blocking]
    return {"counted_step": "the second of two", "blocking_host_to_device": len(blocking),
            "non_blocking_host_to_device": len(copies) - len(blocking), "host_reads": len(reads),
            "events": [str(e) for e in copies + reads]}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_room(device: torch.device, needed_gib: float) -> tuple[bool, str]:
    """Whether ``needed_gib`` more fits on the device (free memory and the allocator's unused cache, with a margin
    for fragmentation), and if not, why."""
    if device.type != "cuda":
        return True, ""
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if free / 2**30 >= MEMORY_MARGIN * needed_gib:
        return True, ""
    return False, f"device memory: needs ~{needed_gib:.1f} GiB, {free / 2**30:.1f} GiB free"


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed_steps(trainer: Trainer, batch: dict, n: int) -> list[float]:
    times = []
    for _ in range(n):
        synchronize(trainer.device)
        start = time.perf_counter()
        trainer.step(batch)
        synchronize(trainer.device)
        times.append(time.perf_counter() - start)
    return times


def measure(trainer: Trainer, batch_size: int, resolution: int, warmup: int, steps: int, deadline: float) -> dict:
    """One variant alone (the batch search): warm-up steps, then ``steps`` timed steps (fewer if the time budget,
    a ``time.monotonic()`` deadline, runs short): samples/s."""
    device = trainer.device
    batch = trainer.batch(batch_size, resolution)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm = timed_steps(trainer, batch, max(warmup, 1))
    left = deadline - time.monotonic()
    n = max(1, min(steps, math.floor(0.5 * left / warm[-1]))) if left > 0 else 1
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        trainer.step(batch)
    synchronize(device)
    elapsed = time.perf_counter() - start
    return {"batch": batch_size, "steps": n, "step_s": elapsed / n, "samples_per_s": batch_size * n / elapsed,
            "warmup_steps": len(warm), "warmup_s": sum(warm), "first_step_s": warm[0],
            "peak_memory_gib": peak_gib(device)}


def add_mfu(run: dict, gflop_per_sample: float | None, peak_tflops: float | None) -> dict:
    if gflop_per_sample is not None:
        run["tflop_per_s"] = gflop_per_sample * run["samples_per_s"] / 1e3
        run["mfu"] = run["tflop_per_s"] / peak_tflops if peak_tflops else None
    return run


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
