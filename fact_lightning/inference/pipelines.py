"""diffusers pipelines built from a ``BaseModel``: text-to-image, inpainting, ControlNet; plus tiny CPU parts.

Nothing here downloads: ControlNet and LoRA weights come from a local path, or from a hub id only when the
user gives one and the network allows it. Missing files raise ``MissingWeightsError`` naming them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fact_lightning.models.base import BaseModel
from fact_lightning.weights import MissingWeightsError, resolve_source

from .recipe import DEFAULT_SCHEDULER, SCHEDULERS

log = logging.getLogger(__name__)

MODES = ("txt2img", "inpaint", "controlnet")


def inference_scheduler(base: BaseModel, name: str = DEFAULT_SCHEDULER):
    """A sampling scheduler sharing the base model's noise schedule (PNDM as configured in SD1.5)."""
    import diffusers

    classes = {
        "ddim": diffusers.DDIMScheduler,
        "dpmsolver": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "pndm": diffusers.PNDMScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {SCHEDULERS}")
    config = {k: v for k, v in base.noise_scheduler.config.items() if k != "_use_default_values"}
    config["steps_offset"] = 1  # SD1.5's sampling offset
    if name == "pndm":  # SD1.5's scheduler_config.json: PLMS steps only, no Runge-Kutta warm-up
        config.update(skip_prk_steps=True, set_alpha_to_one=False)
    return classes[name].from_config(config)


def build_pipeline(base: BaseModel, mode: str = "txt2img", *, controlnet: nn.Module | None = None,
                   scheduler: str = DEFAULT_SCHEDULER):
    """The diffusers pipeline for ``mode`` over the base model's components (no safety checker)."""
    import diffusers

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                 scheduler=inference_scheduler(base, scheduler), safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    if mode == "controlnet":
        if controlnet is None:
            raise ValueError("mode 'controlnet' needs a ControlNet model")
        return diffusers.StableDiffusionControlNetPipeline(controlnet=controlnet, **parts)
    if controlnet is not None:
        raise ValueError(f"a ControlNet was given but mode is {mode!r}")
    if mode == "inpaint":
        if base.unet.config.in_channels not in (4, 9):
            raise ValueError(f"inpainting needs a UNet with 4 or 9 input channels, got {base.unet.config.in_channels}")
        return diffusers.StableDiffusionInpaintPipeline(**parts)
    if base.unet.config.in_channels != 4:
        raise ValueError(f"text-to-image needs a 4-channel UNet; this one has {base.unet.config.in_channels} (an inpainting model?)")
    return diffusers.StableDiffusionPipeline(**parts)


def load_controlnet(source: str | Path, *, dtype: torch.dtype | None = None, local_files_only: bool = False):
    """A ControlNet (e.g. OpenPose for SD1.5) from a local diffusers folder or a hub id."""
    from diffusers import ControlNetModel

    resolved = resolve_source(source, "ControlNet folder")
    if resolved.local and not (Path(resolved.location) / "config.json").is_file():
        raise MissingWeightsError(f"ControlNet folder {resolved.location} has no config.json")
    try:
        return ControlNetModel.from_pretrained(resolved.location, torch_dtype=dtype,
                                               local_files_only=local_files_only).eval()
    except (OSError, ValueError) as err:
        raise MissingWeightsError(f"could not load the ControlNet from {str(source)!r}: {err}") from err


def load_lora(pipeline, source: str | Path, *, adapter_name: str = "lora", weight: float = 1.0) -> str:
    """Loads a LoRA (diffusers/kohya safetensors, file or folder, or hub id) into the pipeline's UNet and
    text encoder through diffusers' PEFT backend, active at ``weight``. Returns the adapter name."""
    resolved = resolve_source(source, "LoRA file")
    local = Path(resolved.location)
    try:
        if resolved.local and local.is_file():
            pipeline.load_lora_weights(str(local.parent), weight_name=local.name, adapter_name=adapter_name)
        else:
            pipeline.load_lora_weights(resolved.location, adapter_name=adapter_name)
    except (OSError, ValueError) as err:
        raise MissingWeightsError(f"could not load the LoRA from {str(source)!r}: {err}") from err
    pipeline.set_adapters([adapter_name], adapter_weights=[weight])
    log.info("LoRA %s loaded as %r at weight %.2f", source, adapter_name, weight)
    return adapter_name
