"""The frozen Stable Diffusion 1.5 parts: loaded from a folder or hub id, or built tiny for tests and demos."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .tokenizer import clip_tokenizer_from_open_clip

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
    """The base model's files are not where the user said they are."""


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

    source = str(source)
    local = Path(source).expanduser()
    if local.exists():
        missing = [f"{sub}/" for sub in SUBFOLDERS if not (local / sub).is_dir()]
        if missing:
            raise MissingWeightsError(f"base model folder {local} is missing {', '.join(missing)}")
        source = str(local)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise MissingWeightsError(f"base model folder {local} does not exist")

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


# SD1.5's training noise schedule.
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


def tiny_base_model(seed: int = 0, cross_attention_dim: int = 32) -> BaseModel:
    """Seeded random components with SD1.5's topology (16 adapted blocks, 8x VAE), small enough for a CPU."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer_from_open_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=2,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=128,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=cross_attention_dim,
                intermediate_size=4 * cross_attention_dim,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return BaseModel(unet, vae, text_encoder, tokenizer, DDPMScheduler(**SD15_SCHEDULE)).freeze()
