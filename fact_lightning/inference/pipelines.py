"""diffusers pipelines built from a base model: text-to-image, inpainting, ControlNet; SD1.5's or SDXL's.

The base's type (:func:`.bases.base_type`) picks the family: ``StableDiffusion{,Inpaint,ControlNet}Pipeline`` for
an SD1.5-style ``BaseModel``, ``StableDiffusionXL{,Inpaint,ControlNet}Pipeline`` for an ``SDXLBaseModel``. The SDXL
pipelines are built with ``force_zeros_for_empty_prompt=False``: stock SDXL guides against all-zero text
embeddings when no negative prompt is given, but FACT's unconditional branch is the condition training drops to
(the empty prompt *encoded*, beside Prj(zeros)), so a missing negative prompt is encoded as "" on both bases, as
SD1.5's pipeline does. No invisible watermark is added (it would change the pixels the tests compare).

Nothing here downloads: ControlNet and LoRA weights come from a local path, or from a hub id only when the
user gives one and the network allows it. Missing files raise ``MissingWeightsError`` naming them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fact_lightning.weights import MissingWeightsError, resolve_source

from .bases import OWN_SCHEDULER, SDXL, base_type
from .recipe import SCHEDULERS

log = logging.getLogger(__name__)

MODES = ("txt2img", "inpaint", "controlnet")


def inference_scheduler(base, name: str | None = None):
    """A sampling scheduler sharing the base model's noise schedule; ``name`` None: the base's own (PNDM as
    configured in SD1.5, Euler for SDXL; both with SD's ``steps_offset`` 1)."""
    import diffusers

    classes = {
        "ddim": diffusers.DDIMScheduler,
        "dpmsolver": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "pndm": diffusers.PNDMScheduler,
    }
    name = OWN_SCHEDULER[base_type(base)] if name is None else name
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {SCHEDULERS}")
    config = {k: v for k, v in base.noise_scheduler.config.items() if k != "_use_default_values"}
    config["steps_offset"] = 1  # SD1.5's and SDXL's sampling offset
    if name == "pndm":  # SD1.5's scheduler_config.json: PLMS steps only, no Runge-Kutta warm-up
        config.update(skip_prk_steps=True, set_alpha_to_one=False)
    return classes[name].from_config(config)


def build_pipeline(base, mode: str = "txt2img", *, controlnet: nn.Module | None = None,
                   scheduler: str | None = None):
    """The diffusers pipeline for ``mode`` over the base model's components (no safety checker, no watermark).

    ``base``: an SD1.5-style ``BaseModel`` or an ``SDXLBaseModel``; ``scheduler`` None is the base's own.
    """
    import diffusers

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if mode == "controlnet" and controlnet is None:
        raise ValueError("mode 'controlnet' needs a ControlNet model")
    if mode != "controlnet" and controlnet is not None:
        raise ValueError(f"a ControlNet was given but mode is {mode!r}")
    channels = base.unet.config.in_channels
    if mode == "inpaint" and channels not in (4, 9):
        raise ValueError(f"inpainting needs a UNet with 4 or 9 input channels, got {channels}")
    if mode != "inpaint" and channels != 4:
        raise ValueError(f"text-to-image needs a 4-channel UNet; this one has {channels} (an inpainting model?)")
    parts = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                 scheduler=inference_scheduler(base, scheduler))
    if base_type(base) == SDXL:
        parts.update(text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                     force_zeros_for_empty_prompt=False, add_watermarker=False)
        family = {"txt2img": diffusers.StableDiffusionXLPipeline, "inpaint": diffusers.StableDiffusionXLInpaintPipeline,
                  "controlnet": diffusers.StableDiffusionXLControlNetPipeline}
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        family = {"txt2img": diffusers.StableDiffusionPipeline, "inpaint": diffusers.StableDiffusionInpaintPipeline,
                  "controlnet": diffusers.StableDiffusionControlNetPipeline}
    if mode == "controlnet":
        parts["controlnet"] = controlnet
    return family[mode](**parts)


def load_controlnet(source: str | Path, *, dtype: torch.dtype | None = None, local_files_only: bool = False):
    """A ControlNet (e.g. OpenPose for SD1.5 or SDXL) from a local diffusers folder or a hub id."""
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
