"""Seeded per-sample condition decisions: paired, shuffled or dropped face; kept or dropped text.

Every random draw of a training sample comes from its own generator, seeded from (run seed, global step,
sample key). The draws therefore do not depend on how a global batch is split over processes or on
the resume point, which makes DDP/FSDP runs reproduce a single-process run and lets a resumed run
continue the same random stream. Nothing here keeps state across steps.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Literal

import torch


class FaceChoice(IntEnum):
    PAIRED = 0    # the target image's own reference face
    SHUFFLED = 1  # another image of the same identity ("paired identity, unpaired face")
    DROPPED = 2   # no face: Prj(zeros)


def sample_seed(seed: int, step: int, key: str) -> int:
    """A 63-bit seed from (run seed, global step, sample key); stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{seed}:{step}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generators(seed: int, step: int, keys: list[str]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by :func:`sample_seed`."""
    return [torch.Generator().manual_seed(sample_seed(seed, step, key)) for key in keys]


@dataclass(frozen=True)
class ShuffleSchedule:
    """The face-shuffle curriculum (paper 3.3): p_shuffle as a function of the optimizer step.

    ``start`` until ``warmup_steps``, then a ``linear`` or ``cosine`` (half-cosine ease-in-out) ramp over
    ``ramp_steps`` to ``end``, held after. ``ramp_steps=None`` (the default) ends the ramp with the run: the
    module sets it to the run's length less the warmup when training starts (:meth:`resolve`), so changing
    ``trainer.max_steps`` stretches the curriculum with it; an explicit value is kept as given. The module
    evaluates it at every step; the resolved schedule is saved with the run.
    """

    start: float = 0.2
    end: float = 0.6
    ramp_steps: int | None = None
    warmup_steps: int = 0
    shape: Literal["linear", "cosine"] = "linear"

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"shuffle schedule {name} must be a probability, got {getattr(self, name)}")
        if (self.ramp_steps is not None and self.ramp_steps < 0) or self.warmup_steps < 0:
            raise ValueError("shuffle schedule ramp_steps and warmup_steps must be >= 0")
        if self.shape not in ("linear", "cosine"):
            raise ValueError(f"shuffle schedule shape must be linear or cosine, got {self.shape!r}")

    def resolve(self, total_steps: int) -> ShuffleSchedule:
        """This schedule for a run of ``total_steps`` optimizer steps: an unset ramp ends at the run's end."""
        if self.ramp_steps is not None:
            return self
        return replace(self, ramp_steps=max(int(total_steps) - self.warmup_steps, 0))

    @property
    def ramp_end(self) -> int | None:
        """The step at which p_shuffle reaches ``end`` (None until resolved)."""
        return None if self.ramp_steps is None else self.warmup_steps + self.ramp_steps

    def value(self, step: int) -> float:
        ramp = self.ramp_steps
        if ramp is None:
            if step > self.warmup_steps:
                raise ValueError("the shuffle ramp follows the run's length: resolve(max_steps) the schedule first")
            ramp = 1  # up to the ramp's start its length does not matter (validation before training)
        if ramp == 0:
            frac = 1.0 if step >= self.warmup_steps else 0.0
        else:
            frac = min(max((step - self.warmup_steps) / ramp, 0.0), 1.0)
        if self.shape == "cosine":
            frac = 0.5 - 0.5 * math.cos(math.pi * frac)
        return self.start + (self.end - self.start) * frac


@dataclass(frozen=True)
class ConditionProbabilities:
    """Per-sample condition probabilities (paper 3.3; 0.1 each for face and text drop).

    ``p_shuffle`` applies to the faces that are kept: a face is dropped with ``face_drop``, else shuffled
    with ``p_shuffle``, else paired. So the expected fractions are dropped = face_drop, shuffled =
    (1 - face_drop) * p_shuffle, paired = the rest. Text is dropped independently with ``text_drop``.
    """

    p_shuffle: float = 0.2
    face_drop: float = 0.1
    text_drop: float = 0.1
    mask_loss: float = 0.5  # M_r(p): probability of the face-masked diffusion loss
    joint_drop: float = 0.0  # extra probability of dropping face and text together (IP-Adapter style)

    def __post_init__(self) -> None:
        for name in ("p_shuffle", "face_drop", "text_drop", "mask_loss", "joint_drop"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


VALIDATION_STEP = -1  # the step validation draws are keyed by: training steps are >= 0, so they never coincide


def validation_probabilities(mask_loss: float) -> ConditionProbabilities:
    """What validation measures: every sample with its paired face and its caption (no drop, no shuffle, so no
    draw decides them); the masked-loss choice M_r(p) stays a per-sample draw, fixed by the sample's key, so the
    validation loss is Eq. 4 as training computes it, on the same noise and timesteps every time."""
    return ConditionProbabilities(p_shuffle=0.0, face_drop=0.0, text_drop=0.0, mask_loss=mask_loss, joint_drop=0.0)


@dataclass
class Decisions:
    """A batch's decisions, each (B,): ``face`` holds FaceChoice values (on the batch's device); the others are
    bool, on the CPU."""

    face: torch.Tensor
    drop_text: torch.Tensor
    use_mask: torch.Tensor

    def fractions(self) -> dict[str, float]:
        n = max(len(self.face), 1)
        return {
            "paired": (self.face == FaceChoice.PAIRED).sum().item() / n,
            "shuffled": (self.face == FaceChoice.SHUFFLED).sum().item() / n,
            "dropped": (self.face == FaceChoice.DROPPED).sum().item() / n,
            "text_dropped": self.drop_text.float().mean().item() if n else 0.0,
        }


def decide(
    generators: list[torch.Generator], probs: ConditionProbabilities, shuffle_available: torch.Tensor | None = None
) -> Decisions:
    """Draws each sample's decisions from its generator (four uniforms, always in the same order).

    ``shuffle_available`` (B,) bool marks samples whose identity has another image; a shuffle drawn for a
    sample without one falls back to its paired face (and is reported as paired). With ``joint_drop`` > 0 a
    fifth uniform drops face and text together (Eq. 5's unconditional branch); at 0 it is not drawn, so the
    random stream is the same as without the option.
    """
    width = 5 if probs.joint_drop > 0 else 4
    draws = torch.stack([torch.rand(width, generator=g) for g in generators]) if generators else torch.zeros(0, width)
    joint = draws[:, 4] < probs.joint_drop if width == 5 else torch.zeros(len(generators), dtype=torch.bool)
    dropped = (draws[:, 0] < probs.face_drop) | joint
    shuffled = draws[:, 1] < probs.p_shuffle
    if shuffle_available is not None:  # on its own device: no copy back to the host (a sync on a GPU)
        shuffled = shuffled.to(shuffle_available.device, non_blocking=True) & shuffle_available.bool()
        dropped = dropped.to(shuffle_available.device, non_blocking=True)
    face = torch.where(dropped, int(FaceChoice.DROPPED), torch.where(shuffled, int(FaceChoice.SHUFFLED),
                                                                     int(FaceChoice.PAIRED)))
    drop_text = (draws[:, 2] < probs.text_drop) | joint
    return Decisions(face=face, drop_text=drop_text, use_mask=draws[:, 3] < probs.mask_loss)


def draw_normal(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) standard normal noise, sample b from generator b (on CPU; move it where needed)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def draw_timesteps(generators: list[torch.Generator], num_train_timesteps: int) -> torch.Tensor:
    """(B,) uniform training timesteps in [0, num_train_timesteps)."""
    return torch.cat([torch.randint(0, num_train_timesteps, (1,), generator=g) for g in generators])
