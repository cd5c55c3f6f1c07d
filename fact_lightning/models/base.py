"""The frozen Stable Diffusion 1.5 parts: loaded from a folder or hub id, or built tiny for tests and demos."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


log = logging.getLogger(__name__)

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


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


class MissingWeightsError(FileNotFoundError):
    """Weights are not where the user said they are (a missing local path, an unreachable hub id)."""


# A name ending like a weights file is a local file, never a hub repository id.
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class WeightsSource:
    """Where ``from_pretrained`` reads weights: ``location`` is a local path (``local``) or a hub id."""

    location: str
    local: bool


def resolve_source(source: str | Path, what: str) -> WeightsSource:
    """Decides, in one place for every loader, whether ``source`` is a local path or a hub id.

    An existing path (``~`` expanded) is local. Otherwise a valid hub repository id (``owner/name`` or
    ``name``, checked by ``huggingface_hub.utils.validate_repo_id``) that does not end like a weights file
    is a hub id; it is fetched only if the network and ``local_files_only`` allow. Anything else is a
    local path that does not exist: :class:`MissingWeightsError` naming ``what`` and the path.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(source)
    local = Path(text).expanduser()
    if text and local.exists():
        return WeightsSource(str(local), True)
    if not text.lower().endswith(_FILE_SUFFIXES):
        try:
            validate_repo_id(text)
            return WeightsSource(text, False)
        except HFValidationError:
            pass
    raise MissingWeightsError(f"{what} {local} does not exist (neither a local path nor a hub id)")


def load_base_model(
    source: str | Path,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool = False,
) -> BaseModel:
    """Loads an SD1.5-style model (diffusers layout) from a local folder or a hub id, frozen.

    A local folder must hold ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/``;
    anything missing is named in the error. A hub id is fetched by huggingface_hub only if the network
    allows (and ``local_files_only`` is False).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    resolved = resolve_source(source, "base model folder")
    source = resolved.location
    if resolved.local:
        missing = [f"{sub}/" for sub in SUBFOLDERS if not (Path(source) / sub).is_dir()]
        if missing:
            raise MissingWeightsError(f"base model folder {source} is missing {', '.join(missing)}")

    common = {"revision": revision, "local_files_only": local_files_only}
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
