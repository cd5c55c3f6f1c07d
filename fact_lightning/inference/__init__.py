"""Inference: FACT portraits through diffusers pipelines (text-to-image, inpainting, ControlNet, LoRA)."""

from .generator import (DEFAULT_GUIDANCE, DEFAULT_NEGATIVE_PROMPT, DEFAULT_STEPS, INPAINT_ADAPTER_SCALE,
                        INPAINT_GUIDANCE, INPAINT_STRENGTH, FacePortraitGenerator, IdentityCondition, recipe_defaults)

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_NEGATIVE_PROMPT", "DEFAULT_STEPS", "INPAINT_ADAPTER_SCALE", "INPAINT_GUIDANCE",
           "INPAINT_STRENGTH", "FacePortraitGenerator", "IdentityCondition", "recipe_defaults"]
