"""Inference: FACT portraits through diffusers pipelines (text-to-image, inpainting, ControlNet, LoRA).

The official apps' settings come from ``recipe`` (no model library imported); the generator, which imports
torch and diffusers, loads on first use of its names, so that a console script checks its inputs first.
"""

from __future__ import annotations

import importlib

from .recipe import (DEFAULT_GUIDANCE, DEFAULT_NEGATIVE_PROMPT, DEFAULT_STEPS, INFERENCE_ADAPTER_SCALE,
                     INPAINT_ADAPTER_SCALE, INPAINT_GUIDANCE, INPAINT_STRENGTH, recipe_defaults)

_FROM_GENERATOR = ("FacePortraitGenerator", "IdentityCondition")

__all__ = ["DEFAULT_GUIDANCE", "DEFAULT_NEGATIVE_PROMPT", "DEFAULT_STEPS", "INFERENCE_ADAPTER_SCALE",
           "INPAINT_ADAPTER_SCALE", "INPAINT_GUIDANCE", "INPAINT_STRENGTH", "recipe_defaults", *_FROM_GENERATOR]


def __getattr__(name: str):
    if name in _FROM_GENERATOR:
        return getattr(importlib.import_module(".generator", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
