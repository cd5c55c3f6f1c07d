"""What a generator is made of, where its weights come from, and one function that loads it all.

Shared by ``python -m fact_lightning.inference`` and the evaluation command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fact_lightning.models.base import MissingWeightsError

from .generator import FacePortraitGenerator
from .pipelines import DEFAULT_SCHEDULER

log = logging.getLogger(__name__)

TINY = "tiny"


@dataclass
class GeneratorSources:
    """Weights and options of a generator. ``tiny`` builds seeded random CPU parts instead (tests, demos).

    base: SD1.5-style diffusers folder or hub id (an inpainting model for ``mode="inpaint"``);
    adapter: our ``.safetensors`` export or the official FACT torch file; face_encoder: the official
    TransFace file (``ms1mv2_model_TransFace_S.pt``); controlnet: a diffusers folder or hub id ("tiny" with
    ``tiny``); loras: (path, weight) pairs.
    """

    base: str | None = None
    adapter: str | None = None
    face_encoder: str | None = None
    face_encoder_variant: str = "S"
    mode: str = "txt2img"
    controlnet: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    scheduler: str = DEFAULT_SCHEDULER
    detector: str = "mediapipe"
    detector_weights: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    local_files_only: bool = False
    tiny: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode == "controlnet" and not self.controlnet:
            raise ValueError("ControlNet mode needs a ControlNet (--controlnet)")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if not self.tiny:
            missing = [name for name in ("base", "adapter", "face_encoder") if not getattr(self, name)]
            if missing:
                raise MissingWeightsError(
                    f"no {', '.join(missing)} given: pass --base (SD1.5 diffusers folder or hub id), --adapter "
                    "(.safetensors export or official FACT file) and --face-encoder (ms1mv2_model_TransFace_S.pt); "
                    "or --tiny for random CPU components (tests and demos only)")

    def to_dict(self) -> dict:
        return {k: (list(map(list, v)) if k == "loras" else v) for k, v in self.__dict__.items()}


def load_detector(src: GeneratorSources):
    """The face detector of ``src``, started (``start_detector``): its start-up (native threads and what they
    log) is over when this returns. Cheap next to the models: commands check the reference photos with it
    before loading anything else."""
    from fact_lightning.faces.detectors import start_detector

    return start_detector(src.detector, Path(src.detector_weights) if src.detector_weights else None,
                          device=src.device)


def load_generator(src: GeneratorSources, detector=None) -> FacePortraitGenerator:
    """Loads (or, with ``tiny``, builds) every part and returns the generator. Nothing is downloaded unless
    a hub id was given and ``local_files_only`` is off. ``detector``: one made by :func:`load_detector`."""
    from fact_lightning.models.adapter_io import load_adapter
    from fact_lightning.interop.official import load_encoder
    from fact_lightning.models.base import load_base_model
    from fact_lightning.tiny import random_tiny_adapter, tiny_base_model, tiny_controlnet, tiny_inpaint_unet

    from .pipelines import load_controlnet

    dtype = getattr(torch, src.dtype)
    if src.tiny:
        base = tiny_base_model(src.seed)
        if src.mode == "inpaint":
            base.unet = tiny_inpaint_unet(base, src.seed)
        encoder, _ = load_encoder("tiny", None, allow_random=True)
    else:
        base = load_base_model(src.base, dtype=dtype, local_files_only=src.local_files_only)
        weights = Path(src.face_encoder).expanduser()
        if not weights.is_file():
            raise MissingWeightsError(f"TransFace weights not found: {weights} (the official ms1mv2_model_TransFace_S.pt)")
        encoder, _ = load_encoder(src.face_encoder_variant, weights, allow_random=False)

    if src.adapter:
        path = Path(src.adapter).expanduser()
        if not path.is_file():
            what = "is a directory, not an adapter file" if path.is_dir() else "not found"
            raise MissingWeightsError(f"adapter file {what}: {path} (our .safetensors export or the official FACT file)")
        adapter = load_adapter(path, base.unet)  # refuses non-finite weights
    else:  # tiny without an adapter file: a seeded random one, gates opened so that it acts
        adapter = random_tiny_adapter(base.unet, src.seed)

    controlnet = None
    if src.mode == "controlnet":
        controlnet = tiny_controlnet(base.unet, src.seed) if src.tiny and src.controlnet == TINY \
            else load_controlnet(src.controlnet, dtype=dtype, local_files_only=src.local_files_only)

    generator = FacePortraitGenerator.from_components(base, adapter, encoder, mode=src.mode, controlnet=controlnet,
                                                      scheduler=src.scheduler,
                                                      detector=detector or load_detector(src))
    for i, (path, weight) in enumerate(src.loras):
        generator.load_lora(path, weight=weight, adapter_name=f"lora{i}")
    pipe = generator.pipeline
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, controlnet, adapter):
        if module is not None:
            # nn.Module.to, not diffusers' ModelMixin.to: that one warns about an empty list of fp32
            # modules on every dtype cast. Weights loaded from disk are in ``dtype`` already.
            torch.nn.Module.to(module, device=src.device, dtype=dtype)
    encoder.to(src.device)
    return generator
