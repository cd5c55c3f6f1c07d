"""An exponential moving average (EMA) of the adapter's trainable weights, kept beside the raw ones.

After every optimizer step ``average = d * average + (1 - d) * weights``, with the decay warmed up as in
diffusers' ``EMAModel`` and timm: ``d_n = min(decay, (1 + n) / (10 + n))`` at the n-th update (n from 0), so
early in a run the average follows the weights instead of staying near the zero-gated initial adapter.

The average is kept for the adapter's trainable parameters only (Prj and the SFAGS blocks), in float32 (float64
for a float64 adapter), on the parameters' device, and shard-local under FSDP2: each rank averages the local
shards of its DTensor parameters, with no communication per step. Only a checkpoint (:meth:`AdapterEMA.state_dict`,
full tensors on every rank's CPU, gathered there) and an export (:func:`averaged_weights` around the module's
``full_adapter_state``) gather.

Used by :class:`~fact_lightning.callbacks.export.AdapterExport` (``adapter_ema.safetensors`` beside
``adapter.safetensors``, ``fact_adapter_ema.bin`` at the end) and by the previews (:func:`averaged_weights`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch

from ..checks import Range
from ..training import resume

log = logging.getLogger(__name__)

STATE_FORMAT = resume.AVERAGING_FORMAT  # marks this callback's state among a checkpoint's callback states
STATE_VERSION = 1


def warmed_up_decay(decay: float, warmup: bool, updates: int) -> float:
    """The decay of update number ``updates`` (0 for the first): ``min(decay, (1 + n) / (10 + n))`` with warm-up."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def _local(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: the local shard of an FSDP2 (DTensor) parameter, else the parameter."""
    return param.to_local() if hasattr(param, "to_local") else param


class AdapterEMA(pl.Callback):
    """EMA of the adapter's trainable weights, saved in checkpoints and restored exactly on resume.

    Not Lightning's ``EMAWeightAveraging`` (2.6), because it (``callbacks/weight_averaging.py``):

    * deep-copies the whole LightningModule into an ``AveragedModel``: at SD1.5 size ~1.07B frozen parameters
      (UNet, VAE, text encoder) duplicated on every GPU, and averaged at every step (it iterates over all of
      ``pl_module.parameters()``, frozen or not), to average 255.5M trainable ones;
    * calls ``configure_model`` itself in ``setup``, outside the strategy's context, and then copies the module:
      with ModelParallelStrategy the average is a copy of a module built before (or without) FSDP2's sharding,
      not a shard-local average (its own docstring: "sharded models do not work with weight averaging");
    * stores the module's whole raw state in every checkpoint (``current_model_state``: seen on the tiny model,
      900 frozen UNet/VAE/text-encoder tensors beside the adapter's 301, 55.8 MB against 31.9 MB with this
      callback; at SD1.5 size the whole frozen model again), and moves the average into ``state_dict``, where
      the module's resume checks expect the raw adapter;
    * writes the average into the live model at ``on_train_end``: which weights an export at the end sees then
      depends on the callbacks' order;
    * has a fixed decay (``get_ema_avg_fn``), no warm-up.

    Args:
        decay: the largest decay d (the average's horizon is about ``1 / (1 - decay)`` steps).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at the n-th update; False: ``decay`` from the first update.

    A resume with another ``decay`` or ``warmup`` continues the saved average with the new settings; a resume of a
    checkpoint without an average starts one from the resumed weights; both are logged (``training/resume.py``).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = True):
        Range(float, 0.0, 1.0).check(decay, "AdapterEMA decay")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0  # updates done: the warm-up's n
        self.step = 0  # the optimizer step the average is at
        self._names: list[str] = []
        self._params: list[torch.Tensor] = []
        self._average: list[torch.Tensor] | None = None
        self._pending: dict | None = None  # a loaded state, placed once the parameters are final (sharded)
        self._trainer: pl.Trainer | None = None
        self._module: pl.LightningModule | None = None

    def settings(self) -> dict:
        """The options a resume compares (``resume.averaging_changes``)."""
        return {"decay": self.decay, "warmup": self.warmup}

    # -- Lightning hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._trainer, self._module = trainer, pl_module
            self._average, self._params, self._names = None, [], []
            self.updates = self.step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start(pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self.catch_up(trainer, pl_module)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.state_key not in (checkpoint.get("callbacks") or {}) and trainer.is_global_zero:
            log.warning("resuming at step %s with changed options, applied from here on: %s; the average starts "
                        "from the resumed weights", checkpoint.get("global_step"),
                        resume.describe(resume.averaging_changes(None, self.settings())))

    def state_dict(self) -> dict:
        if self._trainer is not None and self._module is not None and self._trainer.training:
            self.catch_up(self._trainer, self._module)  # a save before this step's update (a signal's save)
        if self._average is None:
            return {}
        return {"format": STATE_FORMAT, "version": STATE_VERSION, **self.settings(), "updates": self.updates,
                "step": self.step, "average": self.full_average()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT or state.get("version", 0) > STATE_VERSION:
            raise resume.CheckpointMismatch(f"the checkpoint's EMA state is not one this fact-lightning reads "
                                            f"(format {state.get('format')!r}, version {state.get('version')!r})")
        changes = resume.averaging_changes(resume.averaging_settings(state), self.settings())
        if changes and (self._trainer is None or self._trainer.is_global_zero):
            log.warning("resuming with changed options, applied from here on: %s; the saved average continues "
                        "with them", resume.describe(changes))
        self._pending = state
        self._average = None

    # -- the average ------------------------------------------------------------------------------------------
    def start(self, pl_module: pl.LightningModule, step: int = 0) -> None:
        """Takes the adapter's trainable parameters (as trained: sharded under FSDP2); the average starts at a
        loaded checkpoint's, else at the current weights. Idempotent."""
        if self._average is not None:
            return
        named = [(n, p) for n, p in pl_module.adapter.named_parameters() if p.requires_grad]
        self._names, self._params = [n for n, _ in named], [p for _, p in named]
        with torch.no_grad():
            if self._pending is None:
                self._average = [_local(p).detach().to(self._dtype(p), copy=True) for p in self._params]
                self.updates, self.step = 0, step
                return
            pending, self._pending = self._pending, None
            saved = pending["average"]
            missing, unexpected = sorted(set(self._names) - set(saved)), sorted(set(saved) - set(self._names))
            if missing or unexpected:
                raise resume.CheckpointMismatch(f"the checkpoint's EMA does not match the adapter: missing "
                                                f"{missing[:5]}, unexpected {unexpected[:5]}")
            self._average = [self._shard_of(p, saved[n]) for n, p in zip(self._names, self._params)]
            self.updates, self.step = int(pending["updates"]), int(pending["step"])

    def catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One update per optimizer step taken since the last (gradient accumulation calls this per batch)."""
        self.start(pl_module, trainer.global_step)
        if trainer.global_step > self.step:
            self.update()
            self.step = trainer.global_step

    @torch.no_grad()
    def update(self) -> None:
        """``average = d * average + (1 - d) * weights`` (local shards only), d from :func:`warmed_up_decay`."""
        d = warmed_up_decay(self.decay, self.warmup, self.updates)
        weights = [_local(p).detach().to(a.dtype) for p, a in zip(self._params, self._average)]
        torch._foreach_lerp_(self._average, weights, 1.0 - d)
        self.updates += 1

    @staticmethod
    def _dtype(param: torch.Tensor) -> torch.dtype:
        return torch.promote_types(param.dtype, torch.float32)

    def _shard_of(self, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full saved tensor, laid out as ``param`` (every rank read the whole file)."""
        full = full.to(_local(param).device, self._dtype(param))
        if hasattr(param, "to_local"):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        return full.clone()

    def full_average(self) -> dict[str, torch.Tensor]:
        """The whole average on the CPU, by the adapter's parameter names (a collective under FSDP2)."""
        out = {}
        for name, param, average in zip(self._names, self._params, self._average or []):
            if hasattr(param, "to_local"):
                from torch.distributed.tensor import DTensor

                average = DTensor.from_local(average, param.device_mesh, param.placements, shape=param.shape,
                                             stride=param.stride()).full_tensor()
            out[name] = average.detach().to("cpu", copy=True)
        return out

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the adapter's parameters for the duration; the raw weights back, bit for bit, after."""
        with torch.no_grad():
            raw = [_local(p).detach().clone() for p in self._params]
            for param, average in zip(self._params, self._average):
                _local(param).copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self._params, raw):
                    _local(param).copy_(saved)


def find_ema(trainer: pl.Trainer | None) -> AdapterEMA | None:
    """The trainer's :class:`AdapterEMA`, or None when EMA is off."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, AdapterEMA):
            return callback
    return None


@contextmanager
def averaged_weights(trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> Iterator[AdapterEMA | None]:
    """The adapter runs with the EMA weights inside the block (brought up to the current step first), and with its
    raw weights again after it; a no-op yielding None when the trainer has no :class:`AdapterEMA`. Local to each
    rank: under FSDP2 call it on every rank (each swaps its own shards)."""
    ema = find_ema(trainer)
    if ema is None:
        yield None
        return
    ema.catch_up(trainer, pl_module)
    with ema.swapped_in():
        yield ema
