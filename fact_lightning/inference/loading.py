"""What a generator is made of, where its weights come from, and one function that loads it all.

Shared by ``python -m fact_lightning.inference`` and the evaluation command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fact_lightning.models.base import base_model_files
from fact_lightning.models.single_file import is_single_file, single_file_problems
from fact_lightning.weights import MissingWeightsError
from fact_lightning.weights import Needed, check_source, raise_if_missing

from .generator import FacePortraitGenerator
from .recipe import DEFAULT_SCHEDULER

log = logging.getLogger(__name__)

TINY = "tiny"


@dataclass
class GeneratorSources:
    """Weights and options of a generator. ``tiny`` builds seeded random CPU parts instead (tests, demos).

    base: SD1.5-style diffusers folder, hub id or single ``.safetensors`` file (an inpainting model for
    ``mode="inpaint"``); base_config: with a single file, a folder of diffusers configs describing it (default:
    SD1.5's, shipped in the package);
    adapter: our ``.safetensors`` export or the official FACT torch file; face_encoder: the official
    TransFace file (``ms1mv2_model_TransFace_S.pt``); controlnet: a diffusers folder or hub id ("tiny" with
    ``tiny``); loras: (path, weight) pairs.
    """

    base: str | None = None
    base_config: str | None = None
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
                    f"no {', '.join(missing)} given: pass --base (SD1.5 diffusers folder, hub id or .safetensors "
                    "file), --adapter (.safetensors export or official FACT file) and --face-encoder "
                    "(ms1mv2_model_TransFace_S.pt); "
                    "or --tiny for random CPU components (tests and demos only)")

    def to_dict(self) -> dict:
        return {k: (list(map(list, v)) if k == "loras" else v) for k, v in self.__dict__.items()}


CONTROLNET_FILES = (Needed("config.json"), Needed("diffusion_pytorch_model.safetensors",
                                                   ("diffusion_pytorch_model.bin",)))


def weight_problems(src: GeneratorSources) -> list[str]:
    """What :func:`load_generator` would not find, each named with its option, checked without loading anything:
    the base model's files (for a hub id: in the local cache, or whether a download is possible now; a single file:
    from its header, against its configs), the TransFace file, the adapter file, the ControlNet's files and each LoRA."""
    problems = []
    if not src.tiny and is_single_file(src.base):
        problems += single_file_problems(src.base, src.base_config, option="--base")
    elif not src.tiny:
        base = check_source(src.base, "base model folder", base_model_files(), local_files_only=src.local_files_only,
                            option="--base")
        problems += [base.problem] if base.problem else []
        if src.base_config is not None:
            problems.append(f"--base-config {src.base_config} goes with a single-file --base; {src.base} is a "
                            "folder or hub id, whose own configs are used")
    if not src.tiny:
        weights = Path(src.face_encoder).expanduser()
        if not weights.is_file():
            problems.append(f"TransFace weights not found: {weights} (--face-encoder, the official "
                            "ms1mv2_model_TransFace_S.pt)")
    if src.adapter:
        path = Path(src.adapter).expanduser()
        if not path.is_file():
            what = "is a directory, not an adapter file" if path.is_dir() else "not found"
            problems.append(f"adapter file {what}: {path} (--adapter: our .safetensors export or the official FACT file)")
    if src.mode == "controlnet" and not (src.tiny and src.controlnet == TINY):
        controlnet = check_source(src.controlnet, "ControlNet folder", CONTROLNET_FILES,
                                  local_files_only=src.local_files_only, option="--controlnet")
        problems += [controlnet.problem] if controlnet.problem else []
    for path, _ in src.loras:
        lora = check_source(path, "LoRA file")  # a file, a folder or a hub id: its files are the loader's to find
        problems += [lora.problem] if lora.problem else []
    return problems


def load_detector(src: GeneratorSources):
    """The face detector of ``src``, started (``start_detector``): its start-up (native threads and what they
    log) is over when this returns. Cheap next to the models: commands check the reference photos with it
    before loading anything else."""
    from fact_lightning.faces.detectors import start_detector

    return start_detector(src.detector, Path(src.detector_weights) if src.detector_weights else None,
                          device=src.device)


def load_generator(src: GeneratorSources, detector=None) -> FacePortraitGenerator:
    """Loads (or, with ``tiny``, builds) every part and returns the generator. Nothing is downloaded unless
    a hub id was given and a download is possible. Every weight file is checked first (:func:`weight_problems`):
    one error names all that are missing. ``detector``: one made by :func:`load_detector`."""
    from fact_lightning.models.adapter_io import load_adapter
    from fact_lightning.interop.official import load_encoder
    from fact_lightning.models.base import load_base_model
    from fact_lightning.tiny import random_tiny_adapter, tiny_base_model, tiny_controlnet, tiny_inpaint_unet

    from .pipelines import load_controlnet

    raise_if_missing(weight_problems(src))
    dtype = getattr(torch, src.dtype)
    if src.tiny:
        base = tiny_base_model(src.seed)
        if src.mode == "inpaint":
            base.unet = tiny_inpaint_unet(base, src.seed)
        encoder, _ = load_encoder("tiny", None, allow_random=True)
    else:
        base = load_base_model(src.base, dtype=dtype, local_files_only=src.local_files_only, option="--base",
                               config=src.base_config)
        encoder, _ = load_encoder(src.face_encoder_variant, Path(src.face_encoder).expanduser(), allow_random=False)

    if src.adapter:
        adapter = load_adapter(Path(src.adapter).expanduser(), base.unet)  # refuses non-finite weights
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
