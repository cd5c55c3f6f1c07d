"""The training step that ``benchmarks.gpu`` times: its variants (which speed-ups are switched on), the trainer
that runs one variant, and the timing of a variant alone (``measure``, used by the batch search)."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, replace

import torch

from benchmarks.sd15 import SD15RandomBase, projection_config, synthetic_batch
from benchmarks.timing import synchronize
from fact_lightning.training.module import FactModule

GRAD_CLIP = 1.0  # the diffusers examples' max_grad_norm (configs/sd15*.yaml do not clip, as the paper)
SWITCHES = ("cached_latents", "fused_adam", "channels_last", "cudnn_benchmark", "compile")


@dataclass(frozen=True)
class Variant:
    name: str
    cached_latents: bool = False
    channels_last: bool = False
    fused_adam: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False


PLAIN = Variant("plain")


def optimized(compile_unet: bool) -> Variant:
    return Variant("optimized", cached_latents=True, channels_last=True, fused_adam=True, compile=compile_unet,
                   cudnn_benchmark=True)


def single_switches(compile_unet: bool) -> list[Variant]:
    """The ablation: the plain loop with one switch on (compile only with ``--compile``)."""
    return [replace(PLAIN, name=s, **{s: True}) for s in SWITCHES if s != "compile" or compile_unet]


class Trainer:
    """One variant's module and optimizer, and its training step (what Lightning's loop does, minus logging)."""

    def __init__(self, variant: Variant, device: torch.device, tiny: bool, seed: int, precision: str = "bf16-mixed"):
        self.variant, self.device = variant, device
        self.mixed = precision == "bf16-mixed"
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
        self.bench_batch: dict | None = None

    def batch(self, size: int, resolution: int) -> dict:
        return synthetic_batch(size, resolution, self.token_dim, device=self.device,
                               cached_latents=self.variant.cached_latents, seed=size)

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


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
