"""Inference: FACT portraits through diffusers pipelines (text-to-image, inpainting, ControlNet, LoRA)."""

from .generator import DEFAULT_GUIDANCE, DEFAULT_SCALE, DEFAULT_STEPS, FacePortraitGenerator, IdentityCondition

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_SCALE", "DEFAULT_STEPS", "FacePortraitGenerator", "IdentityCondition"]
