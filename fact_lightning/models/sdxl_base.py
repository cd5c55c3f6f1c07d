"""The frozen SDXL base parts: UNet, VAE, both CLIP text encoders, their tokenizers and the training noise schedule.

Loaded from a diffusers folder or hub id with the same checks as SD1.5 (:mod:`.base`): every file is looked for
first and anything missing is named in one error. :meth:`SDXLBaseModel.encode_prompt` and :func:`add_time_ids`
give what an SDXL UNet call takes besides the latents: the 2048-wide token states (the penultimate hidden states
of CLIP ViT-L and OpenCLIP bigG, side by side), bigG's pooled projection, and the micro-conditioning
(original size, crop top-left, target size) of SDXL's paper, as diffusers' SDXL pipelines compute them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..weights import MissingWeightsError, Needed
from .base import base_model_files, locate_base_folder

TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)
# The folders SDXL adds to SD1.5's layout: a second text encoder and tokenizer, laid out as the first.
_SECOND = {"text_encoder/": "text_encoder_2/", "tokenizer/": "tokenizer_2/"}


@dataclass
class PromptEmbeddings:
    """The text conditions of an SDXL UNet call.

    tokens: (B, 77, text_encoder width + text_encoder_2 width), 2048 on SDXL: ``encoder_hidden_states``.
    pooled: (B, text_encoder_2 projection width), 1280 on SDXL: ``added_cond_kwargs["text_embeds"]``.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor

    def added_cond_kwargs(self, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The UNet's ``added_cond_kwargs`` for these prompts and ``time_ids`` (B, 6) (:func:`add_time_ids`)."""
        if time_ids.shape[0] not in (1, self.pooled.shape[0]):
            raise ValueError(f"time_ids have batch {time_ids.shape[0]}, the prompts {self.pooled.shape[0]}")
        time_ids = time_ids.to(self.pooled.device, self.pooled.dtype).expand(self.pooled.shape[0], -1)
        return {"text_embeds": self.pooled, "time_ids": time_ids}


def add_time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL's micro-conditioning as the UNet takes it: (B, 6) float32, ``[orig_h, orig_w, top, left, target_h,
    target_w]``.

    Each argument is an (h, w) / (top, left) pair for the whole batch, or a (B, 2) tensor per sample; pairs
    broadcast over the batch of the others. Pixels of the source photo, as diffusers' SDXL pipelines take them.
    """
    values = (("original_size", original_size), ("crop_top_left", crop_top_left), ("target_size", target_size))
    # On the device of a tensor argument (a batch's, in training): no copy back to the host.
    device = next((v.device for _, v in values if isinstance(v, torch.Tensor)), None)
    parts = []
    for name, value in values:
        t = torch.as_tensor(value, dtype=torch.float32, device=device)
        t = t.unsqueeze(0) if t.dim() == 1 else t
        if t.dim() != 2 or t.shape[1] != 2:
            raise ValueError(f"{name} must be a pair or a (B, 2) tensor, got shape {tuple(t.shape)}")
        parts.append(t)
    batch = max(p.shape[0] for p in parts)
    if any(p.shape[0] not in (1, batch) for p in parts):
        raise ValueError(f"time ids of different batch sizes: {[p.shape[0] for p in parts]}")
    return torch.cat([p.expand(batch, -1) for p in parts], dim=1)


@dataclass
class SDXLBaseModel:
    """UNet, VAE, text encoders, tokenizers and the training noise schedule of an SDXL base model."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module  # CLIPTextModel (ViT-L: 768 wide on SDXL)
    text_encoder_2: nn.Module  # CLIPTextModelWithProjection (bigG: 1280 wide, 1280-wide projection)
    tokenizer: object
    tokenizer_2: object
    noise_scheduler: object

    def frozen_modules(self) -> tuple[nn.Module, ...]:
        return self.unet, self.vae, self.text_encoder, self.text_encoder_2

    def freeze(self) -> SDXLBaseModel:
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()
        return self

    def save_pretrained(self, folder: str | Path) -> None:
        """Writes the diffusers folder layout that :func:`load_sdxl_base_model` reads."""
        folder = Path(folder)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            getattr(self, name).save_pretrained(folder / name)
        self.noise_scheduler.save_pretrained(folder / "scheduler")

    @property
    def cross_attention_dim(self) -> int:
        """The width of the token states (2048 on SDXL): the identity tokens of Prj must have it too."""
        return self.unet.config.cross_attention_dim

    def check(self, source: str = "the base model") -> SDXLBaseModel:
        """Refuses parts that do not make an SDXL base (an SD1.5 UNet, a refiner, encoders of other widths)."""
        cfg = self.unet.config
        if cfg.addition_embed_type != "text_time":
            raise ValueError(f"{source} is not an SDXL base model: its UNet's addition_embed_type is "
                             f"{cfg.addition_embed_type!r}, SDXL's is 'text_time'")
        widths = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        if widths != cfg.cross_attention_dim:
            raise ValueError(f"{source}: the text encoders give {widths}-wide token states, its UNet's "
                             f"cross_attention_dim is {cfg.cross_attention_dim}")
        expected = cfg.addition_time_embed_dim * TIME_IDS + self.text_encoder_2.config.projection_dim
        if expected != cfg.projection_class_embeddings_input_dim:
            raise ValueError(f"{source}: text_encoder_2's projection and {TIME_IDS} time ids make {expected} inputs, "
                             f"its UNet's text-time embedding takes {cfg.projection_class_embeddings_input_dim}")
        return self

    @torch.no_grad()
    def encode_prompt(self, prompts: str | Sequence[str], to_device=None) -> PromptEmbeddings:
        """Token states and the pooled embedding of ``prompts``, as diffusers' SDXL pipelines compute them.

        Each tokenizer pads or truncates to its 77 tokens; each encoder's penultimate hidden states are
        concatenated (ViT-L first); the pooled embedding is text_encoder_2's projected end token. An empty
        prompt is encoded as any other (the text-drop condition of training); note that the stock SDXL
        pipeline uses zeros instead when no negative prompt is given (``force_zeros_for_empty_prompt``).
        ``to_device``: how the token ids reach the encoders' device (training passes its pinned, non-blocking copy).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        states = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(to_device(ids) if to_device else ids.to(next(encoder.parameters()).device),
                          output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return PromptEmbeddings(torch.cat(states, dim=-1), out.text_embeds)


def sdxl_base_model_files(variant: str | None = None) -> list[Needed]:
    """Every file :func:`load_sdxl_base_model` reads from an SDXL diffusers folder: SD1.5's (:func:`base_model_files`,
    the same alternatives) and a second text encoder and tokenizer in ``text_encoder_2/`` and ``tokenizer_2/``."""
    needed = base_model_files(variant)
    second = []
    for need in needed:
        for first, other in _SECOND.items():
            if need.name.startswith(first):
                alternatives = tuple(a.replace(first, other, 1) for a in need.alternatives)
                second.append(Needed(need.name.replace(first, other, 1), alternatives))
    return needed + second


def load_sdxl_base_model(
    source: str | Path,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool = False,
    option: str | None = None,
    config: str | Path | None = None,
) -> SDXLBaseModel:
    """Loads an SDXL base model from a local diffusers folder, a hub id or a single ``.safetensors`` file, frozen
    and checked.

    A single file (``sd_xl_base_1.0.safetensors`` or a fine-tune in its original SGM layout) loads offline with
    the component configs of ``config``, a folder, by default SDXL base 1.0's that ship in the package
    (:mod:`.single_file_sdxl`); its problems are one :class:`~.single_file.SingleFileError`.

    As :func:`.base.load_base_model`: every file it reads is checked first (:func:`sdxl_base_model_files`) and
    anything missing is named in one :class:`MissingWeightsError`, with ``option`` (the command's option for the
    base model) as the place to give a local folder; a hub id is fetched only if a download is possible.
    Components that do not make an SDXL base (an SD1.5 UNet beside SDXL's encoders) are one ``ValueError``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .single_file import is_single_file
    from .single_file_sdxl import load_sdxl_single_file

    if is_single_file(source):
        base = SDXLBaseModel(*load_sdxl_single_file(source, config, dtype=dtype, option=option))
        return base.check(repr(str(source))).freeze()
    if config is not None:
        raise ValueError(f"a config folder ({config}) goes with a single-file base; {source} is a folder or hub id, "
                         "whose own configs are used")
    source, common = locate_base_folder(source, "SDXL base model folder", sdxl_base_model_files(variant),
                                        revision=revision, local_files_only=local_files_only, option=option)
    weights = {"variant": variant, "torch_dtype": dtype, **common}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", **weights)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
        tokenizer_2 = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common)
        # SDXL ships an Euler sampler config; training draws noise with DDPM over the same betas.
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    except (OSError, ValueError) as err:
        message = " ".join(str(err).split())
        raise MissingWeightsError(
            f"could not load the SDXL base model from {source!r}: {message}. Give a local diffusers folder "
            "(unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/) or a hub id "
            "reachable from this machine."
        ) from err
    base = SDXLBaseModel(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler)
    return base.check(repr(str(source))).freeze()
