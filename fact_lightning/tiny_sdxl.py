"""A seeded random stand-in with SDXL's topology, small enough for a CPU: the SDXL counterpart of :mod:`.tiny`.

What it keeps of SDXL base 1.0: three UNet levels, the first without attention and the other two with
transformer stacks deeper than one block (2 and 3 here, SDXL's 2 and 10), so "one adapter per stack" and
"one per block" differ; linear projections in and out of the stacks; the text-time embedding fed by the pooled
projection of the second text encoder and six time ids; token states that concatenate a CLIPTextModel and a
CLIPTextModelWithProjection of different widths (32 + 64 here, SDXL's 768 + 1280); the second tokenizer padding
with ``!``; a VAE with SDXL's scaling factor. Nothing here loads weights; each builder forks the RNG.
"""

from __future__ import annotations

import dataclasses

import torch

from .models.resampler import TINY_RESAMPLER
from .models.sdxl_base import TIME_IDS, SDXLBaseModel
from .models.tokenizer import clip_tokenizer_from_open_clip, sdxl_second_tokenizer

# SDXL base 1.0's training noise schedule (its scheduler config, read by DDPM).
SDXL_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, steps_offset=1, timestep_spacing="leading")
SDXL_VAE_SCALING_FACTOR = 0.13025

TEXT_WIDTH, TEXT_2_WIDTH = 32, 64  # SDXL: 768 (ViT-L), 1280 (bigG)
TINY_SDXL_CROSS_ATTENTION_DIM = TEXT_WIDTH + TEXT_2_WIDTH
TIME_EMBED_DIM = 8  # SDXL: 256 per time id
# Sizes per UNet level; SDXL: widths (320, 640, 1280), stack depths (1, 2, 10), heads (5, 10, 20).
BLOCK_OUT_CHANNELS = (32, 32, 64)
TRANSFORMER_DEPTHS = (1, 2, 3)  # the first level has no attention, its entry unused as in SDXL
HEADS = (2, 2, 4)
# The tiny projection (64-wide tiny TransFace tokens) with the tiny SDXL's token width.
TINY_SDXL_RESAMPLER = dataclasses.replace(TINY_RESAMPLER, output_dim=TINY_SDXL_CROSS_ATTENTION_DIM)


def tiny_sdxl_unet(seed: int = 0):
    """A seeded random UNet with SDXL's topology: 11 transformer stacks, 28 transformer blocks."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            block_out_channels=BLOCK_OUT_CHANNELS,
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=TRANSFORMER_DEPTHS,
            attention_head_dim=HEADS,  # diffusers' (and SDXL's config's) name for the heads per level
            cross_attention_dim=TINY_SDXL_CROSS_ATTENTION_DIM,
            use_linear_projection=True,
            norm_num_groups=32,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=TEXT_2_WIDTH + TIME_IDS * TIME_EMBED_DIM,
        )
    return unet.requires_grad_(False).eval()


def tiny_sdxl_base_model(seed: int = 0) -> SDXLBaseModel:
    """Seeded random components with SDXL's topology (UNet, VAE, two text encoders and tokenizers), frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer_from_open_clip()
    tokenizer_2 = sdxl_second_tokenizer(tokenizer)

    def text_config(width: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                              hidden_act=act, projection_dim=width, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    unet = tiny_sdxl_unet(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=128,
            scaling_factor=SDXL_VAE_SCALING_FACTOR,
            force_upcast=True,
        )
        # ViT-L uses quick_gelu, bigG gelu, as in SDXL's text encoder configs.
        text_encoder = CLIPTextModel(text_config(TEXT_WIDTH, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(TEXT_2_WIDTH, "gelu"))
    base = SDXLBaseModel(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                         DDPMScheduler(**SDXL_SCHEDULE))
    return base.check("the tiny SDXL stand-in").freeze()
