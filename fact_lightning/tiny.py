"""Seeded random stand-ins with the real topologies: the ``--tiny`` mode of every command, the demo, the tests.

Nothing here loads weights. Each builder forks the RNG, so building one never moves the caller's random stream.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from .models.base import BaseModel
from .models.tokenizer import clip_tokenizer_from_open_clip

log = logging.getLogger(__name__)

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


def tiny_inpaint_unet(base: BaseModel, seed: int = 0) -> nn.Module:
    """A seeded random 9-channel inpainting UNet with the tiny base UNet's topology."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
    config["in_channels"] = 9
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config)
    return unet.requires_grad_(False).eval()


def tiny_controlnet(unet: nn.Module, seed: int = 0, *, trained_like: bool = True) -> nn.Module:
    """A ControlNet copied from ``unet`` (``ControlNetModel.from_unet``).

    A fresh ControlNet has zero output convolutions and leaves the UNet unchanged; ``trained_like`` fills
    them with small seeded weights so that, like a trained one, it steers the image.
    """
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64, 64))
    if trained_like:
        g = torch.Generator().manual_seed(seed)
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]
        with torch.no_grad():
            for conv in zero_convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
    return controlnet.requires_grad_(False).eval()


def random_tiny_adapter(unet, seed: int = 0, sites: str = "block"):
    """A seeded random tiny adapter (64-wide face tokens) with non-zero gates, attached to ``unet`` (the tiny
    SD1.5 or SDXL stand-in: the projection's output width is the UNet's; ``sites="stack"`` for SDXL's)."""
    from .models.injection import FaceAdapter
    from .models.resampler import TINY_RESAMPLER

    log.warning("no adapter file given: using a RANDOM tiny adapter (demo only)")
    cross = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = FaceAdapter.for_unet(unet, dataclasses.replace(TINY_RESAMPLER, output_dim=cross), sites=sites)
        with torch.no_grad():
            for block in adapter.blocks.values():
                block.alpha_attn.fill_(1.0)
                block.alpha_dense.fill_(1.0)
    return adapter.eval()


def tiny_clip(seed: int = 0, image_size: int = 32):
    """A seeded random CLIP (32-wide) with SD1.5's tokenizer, for tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .evaluation.clip import ClipScorer

    tokenizer = clip_tokenizer_from_open_clip()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    return ClipScorer(model, processor)
