"""The frozen Stable Diffusion 1.5 parts: loaded from a folder or hub id, or built tiny for tests and demos."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..weights import MissingWeightsError, Needed, check_source

log = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """UNet, VAE, text encoder, tokenizer and the training noise schedule of an SD1.5-style model."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    noise_scheduler: object

    def frozen_modules(self) -> tuple[nn.Module, ...]:
        return self.unet, self.vae, self.text_encoder

    def freeze(self) -> BaseModel:
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()
        return self

    def save_pretrained(self, folder: str | Path) -> None:
        """Writes the diffusers folder layout that ``load_base_model`` reads."""
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.noise_scheduler.save_pretrained(folder / "scheduler")


def base_model_files(variant: str | None = None) -> list[Needed]:
    """Every file :func:`load_base_model` reads from an SD1.5-style diffusers folder (``model_index.json`` and the
    safety checker are not read). A ``.bin`` or a sharded index serves for a ``.safetensors`` file, and a
    ``tokenizer.json`` (what transformers 5 writes) for ``vocab.json`` and ``merges.txt`` (what SD1.5 ships)."""
    v = f".{variant}" if variant else ""

    def diffusers_weights(sub: str) -> Needed:
        stem = f"{sub}/diffusion_pytorch_model"
        return Needed(f"{stem}{v}.safetensors", (f"{stem}{v}.bin", f"{stem}.safetensors.index{v}.json",
                                                 f"{stem}.bin.index{v}.json"))

    text_weights = Needed(f"text_encoder/model{v}.safetensors", (
        f"text_encoder/pytorch_model{v}.bin", f"text_encoder/model.safetensors.index{v}.json",
        f"text_encoder/pytorch_model.bin.index{v}.json"))
    fast = "tokenizer/tokenizer.json"
    return [Needed("unet/config.json"), diffusers_weights("unet"), Needed("vae/config.json"), diffusers_weights("vae"),
            Needed("text_encoder/config.json"), text_weights, Needed("tokenizer/vocab.json", (fast,)),
            Needed("tokenizer/merges.txt", (fast,)), Needed("tokenizer/tokenizer_config.json"),
            Needed("scheduler/scheduler_config.json")]


def locate_base_folder(source: str | Path, what: str, needed: list[Needed], *, revision: str | None,
                       local_files_only: bool, option: str | None) -> tuple[str, dict]:
    """Where a base model's diffusers folder loads from (every file in ``needed`` checked first, or one
    :class:`MissingWeightsError`), and the ``revision``/``local_files_only`` arguments for its ``from_pretrained``
    calls."""
    located = check_source(source, what, needed, revision=revision, local_files_only=local_files_only, option=option)
    if located.source is None:
        raise MissingWeightsError(f"could not load the {what.removesuffix(' folder')}: {located.problem}")
    if located.source.local:
        revision = None  # a folder (or a cached snapshot) is one revision already
    return located.source.location, {"revision": revision, "local_files_only": local_files_only or located.source.local}


def load_base_model(
    source: str | Path,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool = False,
    option: str | None = None,
    config: str | Path | None = None,
) -> BaseModel:
    """Loads an SD1.5-style model from a local diffusers folder, a hub id or a single ``.safetensors`` file, frozen.

    Every file it reads is checked first (:func:`base_model_files`); anything missing is named in one error, with
    ``option`` (the command's option for the base model) as the place to give a local folder. A hub id is fetched
    by huggingface_hub only if a download is possible (the network answers, ``local_files_only`` is False and
    ``HF_HUB_OFFLINE`` unset); fully cached, it loads from the cache when it is not. A single file (a community
    checkpoint in the original LDM layout) loads offline with the component configs of ``config``, a folder, by
    default SD1.5's that ship in the package (:mod:`.single_file`).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .single_file import is_single_file, load_single_file

    if is_single_file(source):
        return BaseModel(*load_single_file(source, config, dtype=dtype, option=option)).freeze()
    if config is not None:
        raise ValueError(f"a config folder ({config}) goes with a single-file base; {source} is a folder or hub id, "
                         "whose own configs are used")
    source, common = locate_base_folder(source, "base model folder", base_model_files(variant), revision=revision,
                                        local_files_only=local_files_only, option=option)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=variant, torch_dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=variant, torch_dtype=dtype, **common)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", variant=variant, torch_dtype=dtype, **common)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    except (OSError, ValueError) as err:
        raise MissingWeightsError(
            f"could not load the base model from {source!r}: {err}. Give a local diffusers folder "
            "(unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a hub id reachable from this machine."
        ) from err
    return BaseModel(unet, vae, text_encoder, tokenizer, scheduler).freeze()
