"""What a generator is made of, where its weights come from, and one function that loads it all.

Shared by ``python -m fact_lightning.inference`` and the evaluation command. The base type (SD1.5 or SDXL) is
settled first, from files alone (:func:`resolve_base_type`): the adapter file's metadata, ``--base-type``, and the
layout of ``--base``; a disagreement is one ``ValueError`` before any model loads. It picks the base's loader,
the files checked, the ``--tiny`` stand-in and the default sampler.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fact_lightning.models.base import base_model_files
from fact_lightning.models.sdxl_base import sdxl_base_model_files
from fact_lightning.models.single_file import (TEXT_PREFIX, XL_TEXT_2_PREFIX, file_base_type, is_single_file,
                                               single_file_problems)
from fact_lightning.models.single_file_sdxl import sdxl_single_file_problems
from fact_lightning.weights import MissingWeightsError, Needed, cached_snapshot, check_source, raise_if_missing
from fact_lightning.weights import resolve_source

from .bases import BASE_TYPES, LABELS, OWN_SCHEDULER, SD15, SDXL, adapter_base_type
from .generator import FacePortraitGenerator
from .recipe import SCHEDULERS

log = logging.getLogger(__name__)

TINY = "tiny"


@dataclass
class GeneratorSources:
    """Weights and options of a generator. ``tiny`` builds seeded random CPU parts instead (tests, demos).

    base: SD1.5 or SDXL diffusers folder or hub id, or a single ``.safetensors`` file in the original layout,
    SD1.5's (an inpainting model for ``mode="inpaint"``) or SDXL's; base_config: with a single file, a folder of
    diffusers configs describing it (default: SD1.5's or SDXL base 1.0's, shipped in the package);
    adapter: our ``.safetensors`` export or the official FACT torch file; face_encoder: the official
    TransFace file (``ms1mv2_model_TransFace_S.pt``); controlnet: a diffusers folder or hub id ("tiny" with
    ``tiny``); loras: (path, weight) pairs.
    base_type: "sd15" or "sdxl"; None: the adapter file's, else the base folder's layout, else SD1.5
    (:func:`resolve_base_type`); with ``tiny`` the stand-in to build. scheduler: None is the base's own (PNDM
    for SD1.5, Euler for SDXL).
    """

    base: str | None = None
    base_config: str | None = None
    adapter: str | None = None
    face_encoder: str | None = None
    face_encoder_variant: str = "S"
    mode: str = "txt2img"
    controlnet: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    scheduler: str | None = None
    detector: str = "mediapipe"
    detector_weights: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    local_files_only: bool = False
    tiny: bool = False
    seed: int = 0
    base_type: str | None = None

    def __post_init__(self) -> None:
        if self.base_type is not None and self.base_type not in BASE_TYPES:
            raise ValueError(f"base type must be one of {', '.join(BASE_TYPES)}, got {self.base_type!r}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.mode == "controlnet" and not self.controlnet:
            raise ValueError("ControlNet mode needs a ControlNet (--controlnet)")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if not self.tiny:
            missing = [name for name in ("base", "adapter", "face_encoder") if not getattr(self, name)]
            if missing:
                raise MissingWeightsError(
                    f"no {', '.join(missing)} given: pass --base (SD1.5 or SDXL diffusers folder or hub id, or a "
                    "single SD1.5 or SDXL .safetensors file), --adapter (.safetensors export or official FACT file) "
                    "and "
                    "--face-encoder (ms1mv2_model_TransFace_S.pt); or --tiny for random CPU components (tests and demos only)")

    def to_dict(self) -> dict:
        return {k: (list(map(list, v)) if k == "loras" else v) for k, v in self.__dict__.items()}


CONTROLNET_FILES = (Needed("config.json"), Needed("diffusion_pytorch_model.safetensors",
                                                   ("diffusion_pytorch_model.bin",)))
UNET_CONFIG = Needed("unet/config.json")


def folder_base_type(folder: str | Path) -> str | None:
    """The base type a diffusers folder holds, read from its files: SDXL when its UNet has the text-time
    embedding or it has a second text encoder (``text_encoder_2/``), SD1.5 when its UNet config says otherwise;
    None when nothing tells (no readable ``unet/config.json``, no ``text_encoder_2/``)."""
    folder = Path(folder)
    try:
        text_time = json.loads((folder / UNET_CONFIG.name).read_text()).get("addition_embed_type") == "text_time"
    except (OSError, ValueError, AttributeError):  # absent, unreadable or not a JSON object: the file check says so
        text_time = None
    if text_time or (folder / "text_encoder_2").is_dir():
        return SDXL
    return SD15 if text_time is False else None


def _base_layout(src: GeneratorSources) -> tuple[str, str] | None:
    """(base type, how ``--base`` shows it) from its files alone, or None when they do not tell: a single file by
    the keys its safetensors header lists (:func:`file_base_type`: SDXL's second text encoder or SD1.5's one); a
    folder, or a hub id's snapshot in the local cache, by :func:`folder_base_type`."""
    if is_single_file(src.base):
        found = file_base_type(src.base)
        if found == SDXL:
            return SDXL, (f"--base {src.base} is a single file, which loads as SDXL (it looks like an SDXL base "
                          f"model: a second text encoder under {XL_TEXT_2_PREFIX}*)")
        if found == SD15:
            return SD15, (f"--base {src.base} is a single file, which loads as SD1.5 (it looks like an SD1.5 base "
                          f"model: its text encoder under {TEXT_PREFIX}*)")
        return None  # unreadable, or neither layout: the file check names it
    try:
        resolved = resolve_source(src.base, "base model folder")
    except MissingWeightsError:
        return None  # the file check names it
    if resolved.local:
        folder, where = Path(resolved.location), "folder"
    else:
        folder, _ = cached_snapshot(resolved.location, [UNET_CONFIG])
        where = "hub id (in the local cache)"
    found = None if folder is None or not folder.is_dir() else folder_base_type(folder)
    if found is None:
        return None
    if found == SDXL:
        sign = "it has text_encoder_2/" if (folder / "text_encoder_2").is_dir() \
            else "its UNet takes SDXL's text-time ids"
    else:
        sign = "no text_encoder_2/, a UNet without SDXL's text-time ids"
    return found, f"--base {src.base} is an {LABELS[found]} {where} ({sign})"


def resolve_base_type(src: GeneratorSources) -> str:
    """The base type ``src`` runs on, settled from files alone: the adapter file's recorded type (the official
    FACT file is SD1.5's), ``src.base_type`` and, with real weights, the layout of ``src.base``. Any two that
    disagree are one ``ValueError`` naming both; when none tells, SD1.5."""
    claims = []
    if src.adapter and Path(src.adapter).expanduser().is_file():  # a missing adapter: weight_problems names it
        path = Path(src.adapter).expanduser()
        recorded = adapter_base_type(path)
        if recorded is not None:
            kind = "its metadata" if path.suffix == ".safetensors" else "the official FACT format"
            claims.append((recorded, f"adapter {path} is for {LABELS[recorded]} ({kind} says so)"))
    if src.base_type is not None:
        claims.append((src.base_type, f"--base-type is {src.base_type}"))
    if not src.tiny and src.base:
        layout = _base_layout(src)
        if layout is not None:
            claims.append(layout)
    for kind, claim in claims[1:]:
        if kind != claims[0][0]:
            raise ValueError(f"{claims[0][1]} but {claim}: give an adapter and a base model of one type "
                             "(SD1.5 or SDXL)")
    return claims[0][0] if claims else SD15


def resolved_sources(src: GeneratorSources) -> GeneratorSources:
    """``src`` with its base type settled (:func:`resolve_base_type`) and its scheduler named (the base's own
    unless given): what a run records in its settings."""
    kind = resolve_base_type(src)
    return dataclasses.replace(src, base_type=kind, scheduler=src.scheduler or OWN_SCHEDULER[kind])


def weight_problems(src: GeneratorSources) -> list[str]:
    """What :func:`load_generator` would not find, each named with its option, checked without loading anything:
    the base model's files (for a hub id: in the local cache, or whether a download is possible now; a single file:
    from its header, against its configs), the TransFace file, the adapter file, the ControlNet's files and each LoRA."""
    problems = []
    kind = resolve_base_type(src)  # a disagreement between adapter and base is refused first
    if not src.tiny and is_single_file(src.base):
        check = sdxl_single_file_problems if kind == SDXL else single_file_problems
        problems += check(src.base, src.base_config, option="--base")
    elif not src.tiny:
        what, files = ("SDXL base model folder", sdxl_base_model_files()) if kind == SDXL \
            else ("base model folder", base_model_files())
        base = check_source(src.base, what, files, local_files_only=src.local_files_only, option="--base")
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
    from fact_lightning.interop.official import load_encoder
    from fact_lightning.models.base import load_base_model
    from fact_lightning.models.sdxl_base import load_sdxl_base_model
    from fact_lightning.tiny import random_tiny_adapter, tiny_base_model, tiny_controlnet, tiny_inpaint_unet
    from fact_lightning.tiny_sdxl import tiny_sdxl_base_model

    from .bases import load_adapter_for
    from .pipelines import load_controlnet

    raise_if_missing(weight_problems(src))
    src = resolved_sources(src)
    dtype = getattr(torch, src.dtype)
    if src.tiny:
        base = tiny_sdxl_base_model(src.seed) if src.base_type == SDXL else tiny_base_model(src.seed)
        if src.mode == "inpaint":
            base.unet = tiny_inpaint_unet(base, src.seed)
        encoder, _ = load_encoder("tiny", None, allow_random=True)
    else:
        if src.base_type == SDXL:
            base = load_sdxl_base_model(src.base, dtype=dtype, local_files_only=src.local_files_only, option="--base",
                                        config=src.base_config)
        else:
            base = load_base_model(src.base, dtype=dtype, local_files_only=src.local_files_only, option="--base",
                                   config=src.base_config)
            if getattr(base.unet.config, "addition_embed_type", None) == "text_time":  # a hub id not in the cache
                    raise ValueError(f"--base {src.base} is an SDXL model (its UNet takes SDXL's text-time ids) but "
                                 f"adapter {src.adapter} is for SD1.5: give an SDXL adapter or an SD1.5 base model")
        encoder, _ = load_encoder(src.face_encoder_variant, Path(src.face_encoder).expanduser(), allow_random=False)

    if src.adapter:  # refuses another base's adapter and non-finite weights
        adapter = load_adapter_for(base, Path(src.adapter).expanduser())
    elif src.base_type == SDXL:  # tiny without an adapter file: a seeded random one, gates opened so that it acts
        adapter = random_tiny_adapter(base.unet, src.seed, sites="stack")
    else:
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
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), controlnet, adapter):
        if module is not None:
            # nn.Module.to, not diffusers' ModelMixin.to: that one warns about an empty list of fp32
            # modules on every dtype cast. Weights loaded from disk are in ``dtype`` already.
            torch.nn.Module.to(module, device=src.device, dtype=dtype)
    encoder.to(src.device)
    return generator
