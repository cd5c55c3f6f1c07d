"""The official FACT apps' sampling settings (facechain ``inference_fact.py`` and ``inference_inpaint_fact.py``).

Kept apart from the generator, which imports torch and diffusers, so that the console scripts can read their
defaults and check every input before a model library loads.
"""

from __future__ import annotations

# The adapter scale a of Eq. 2 at inference (the official apps; training uses 1.0, models.sfags).
INFERENCE_ADAPTER_SCALE = 0.5
DEFAULT_GUIDANCE = 7.0  # text-to-image (and ControlNet): the paper's "CFG 7.0", passed as guidance_scale
INPAINT_GUIDANCE = 5.0  # the inpainting app
INPAINT_ADAPTER_SCALE = 0.55  # the inpainting app's inpainting stage (its pose stage uses 0.5)
INPAINT_STRENGTH = 0.6  # the inpainting app's inpainting pass (its refinement passes use 0.1 and 0.025)
DEFAULT_STEPS = 50
SCHEDULERS = ("pndm", "ddim", "dpmsolver", "euler")
DEFAULT_SCHEDULER = "pndm"  # SD1.5's own scheduler, the one the official FACT apps sample with
# Not the apps' negative prompt: it is the fallback of the official FaceAdapter_v1.generate when a caller gives
# none. The text-to-image app passes an empty one by default, the web app a long list of its own (with A1111
# "(word:1.4)" weights that stock diffusers does not parse). We keep the fallback as our default.
DEFAULT_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"


def recipe_defaults(inpaint: bool) -> dict:
    """The official app's adapter scale, guidance and (inpainting only) strength for a mode."""
    if inpaint:
        return {"adapter_scale": INPAINT_ADAPTER_SCALE, "guidance_scale": INPAINT_GUIDANCE,
                "strength": INPAINT_STRENGTH}
    return {"adapter_scale": INFERENCE_ADAPTER_SCALE, "guidance_scale": DEFAULT_GUIDANCE, "strength": None}
