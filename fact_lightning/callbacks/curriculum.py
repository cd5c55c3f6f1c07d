"""The face-shuffle curriculum (paper 3.3): p_shuffle ramps from 0.2 to 0.6 over training."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl

log = logging.getLogger(__name__)


class ShuffleCurriculum(pl.Callback):
    """Sets ``pl_module.p_shuffle`` before every training batch from the global step.

    Args:
        start, end: the probability before ``warmup_steps`` and after ``warmup_steps + ramp_steps``.
        ramp_steps: length of the ramp in optimizer steps.
        warmup_steps: steps held at ``start`` before the ramp begins.
        schedule: ``linear`` or ``cosine`` (half-cosine ease-in-out) between start and end.

    Its state (the last step and value) is saved in checkpoints; a resumed run continues the ramp where it
    stopped and warns if the ramp's settings changed in between.
    """

    def __init__(self, start: float = 0.2, end: float = 0.6, ramp_steps: int = 10_000, warmup_steps: int = 0,
                 schedule: Literal["linear", "cosine"] = "linear"):
        for name, p in (("start", start), ("end", end)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, got {p}")
        if ramp_steps < 0 or warmup_steps < 0:
            raise ValueError("ramp_steps and warmup_steps must be >= 0")
        self.start, self.end = start, end
        self.ramp_steps, self.warmup_steps, self.schedule = ramp_steps, warmup_steps, schedule
        self.step = 0
        self.p_shuffle = start

    def value(self, step: int) -> float:
        if self.ramp_steps == 0:
            frac = 1.0 if step >= self.warmup_steps else 0.0
        else:
            frac = min(max((step - self.warmup_steps) / self.ramp_steps, 0.0), 1.0)
        if self.schedule == "cosine":
            frac = 0.5 - 0.5 * math.cos(math.pi * frac)
        return self.start + (self.end - self.start) * frac

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step
        self.p_shuffle = self.value(self.step)
        pl_module.p_shuffle = self.p_shuffle

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._apply(trainer, pl_module)

    def _settings(self) -> dict:
        return {"start": self.start, "end": self.end, "ramp_steps": self.ramp_steps,
                "warmup_steps": self.warmup_steps, "schedule": self.schedule}

    def state_dict(self) -> dict[str, Any]:
        return {**self._settings(), "step": self.step, "p_shuffle": self.p_shuffle}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {k: state_dict[k] for k in self._settings() if k in state_dict}
        if saved != self._settings():
            log.warning("the shuffle curriculum changed since the checkpoint (%s -> %s); continuing with the new one",
                        saved, self._settings())
        self.step = int(state_dict.get("step", 0))
        self.p_shuffle = float(state_dict.get("p_shuffle", self.value(self.step)))
