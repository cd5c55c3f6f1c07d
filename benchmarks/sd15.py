"""Random SD1.5-size components and synthetic batches for the speed benchmarks (no weights are downloaded).

``SD15RandomBase`` is a ``BaseModelSpec``: ``FactModule(SD15RandomBase(...))`` trains on a UNet, VAE and CLIP
text encoder with SD1.5's exact configs and seeded random weights, built directly on the target device
(on a GPU the default initialisation takes well under a second). ``SD15RandomBase(tiny=True)`` gives the
tiny CPU components of ``fact_lightning.tiny`` instead, for tests of the benchmark scripts themselves.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
from pathlib import Path

import torch

from fact_lightning.models.base import BaseModel
from fact_lightning.models.resampler import TINY_RESAMPLER, ResamplerConfig
from fact_lightning.tiny import SD15_SCHEDULE, tiny_base_model
from fact_lightning.training.base_spec import BaseModelSpec

# runwayml/stable-diffusion-v1-5 unet/config.json, vae/config.json, text_encoder/config.json (sizes only).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TOKEN_COUNT, TOKEN_DIM = 144, 512  # TransFace-S tokens per face


class SD15RandomBase(BaseModelSpec):
    """SD1.5's UNet, VAE and text encoder with seeded random weights (or the tiny ones with ``tiny=True``).

    Args:
        device: where the weights are created (building on the GPU is much faster than on the CPU).
        frozen_dtype: the frozen parts' dtype (float32 or bfloat16).
    """

    def __init__(self, seed: int = 0, device: str = "cpu", frozen_dtype: str = "float32", tiny: bool = False):
        self.seed, self.device, self.frozen_dtype, self.tiny = seed, device, frozen_dtype, tiny

    def build(self) -> BaseModel:
        dtype = getattr(torch, self.frozen_dtype)
        if self.tiny:
            base = tiny_base_model(seed=self.seed)
        else:
            base = sd15_random_base_model(self.seed, torch.device(self.device))
        for module in base.frozen_modules():
            module.to(self.device, dtype)
        return base

    def describe(self) -> str:
        return f"{'tiny' if self.tiny else 'sd15'}-random(seed={self.seed})"


def sd15_random_base_model(seed: int = 0, device: torch.device | str = "cpu") -> BaseModel:
    """SD1.5-size frozen components with seeded random weights, created on ``device`` in float32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fact_lightning.models.tokenizer import clip_tokenizer_from_open_clip

    device = torch.device(device)
    tokenizer = clip_tokenizer_from_open_clip()
    text_config = CLIPTextConfig(**SD15_TEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(text_config)
    return BaseModel(unet, vae, text_encoder, tokenizer, DDPMScheduler(**SD15_SCHEDULE)).freeze()


def projection_config(tiny: bool) -> ResamplerConfig:
    """The official Prj (512-wide TransFace-S tokens -> 768) or the tiny one (64 -> 32)."""
    return dataclasses.replace(TINY_RESAMPLER, output_dim=32) if tiny else ResamplerConfig()


def synthetic_batch(batch: int, resolution: int, token_dim: int, *, device: torch.device | str = "cpu",
                    cached_latents: bool = False, seed: int = 0) -> dict:
    """A training batch as ``FactDataModule`` delivers it (random pixels, a central face mask, random tokens).

    ``cached_latents`` adds ``latent_mean``/``latent_std`` (B, 4, H/8, W/8), which make ``compute_losses``
    skip the VAE, as shards with cached latents do.
    """
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 1, resolution, resolution)
    lo, hi = resolution // 4, 3 * resolution // 4
    mask[:, :, lo:hi, lo:hi] = 1.0
    out = {
        "key": [f"bench-{i:06d}" for i in range(batch)],
        "pixels": torch.rand(batch, 3, resolution, resolution, generator=g) * 2 - 1,
        "mask": mask,
        "tokens": torch.randn(batch, TOKEN_COUNT, token_dim, generator=g),
        "shuffled_tokens": torch.randn(batch, TOKEN_COUNT, token_dim, generator=g),
        "shuffle_available": torch.ones(batch, dtype=torch.bool),
        "caption": ["a photo of a person, best quality"] * batch,
    }
    if cached_latents:
        latent = resolution // 8
        out["latent_mean"] = torch.randn(batch, 4, latent, latent, generator=g)
        out["latent_std"] = torch.rand(batch, 4, latent, latent, generator=g) * 0.1 + 0.01
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def environment() -> dict:
    """What a benchmark's numbers depend on, for its JSON."""
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        env["load_avg_1min"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env
