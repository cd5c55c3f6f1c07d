"""Random SDXL-size components and synthetic batches for the speed benchmarks (no weights are downloaded).

``SDXLRandomBase`` is a ``BaseModelSpec``, the SDXL counterpart of ``benchmarks.sd15.SD15RandomBase``:
``FactModule(SDXLRandomBase(...), projection_config(False), sites=SITES)`` trains on SDXL base 1.0's UNet, VAE
and both text encoders (CLIP ViT-L and OpenCLIP bigG) at their exact configs with seeded random weights, built
directly on the target device. ``SDXLRandomBase(tiny=True)`` gives the tiny SDXL stand-in of
``fact_lightning.tiny_sdxl`` instead, for tests of the benchmark scripts themselves.
"""

from __future__ import annotations


import torch

from benchmarks.sd15 import SD15_TEXT, SD15_VAE
from benchmarks.sd15 import synthetic_batch as sd15_synthetic_batch
from fact_lightning.base_types import SDXL
from fact_lightning.models.resampler import ResamplerConfig
from fact_lightning.models.sdxl_base import SDXLBaseModel
from fact_lightning.tiny_sdxl import SDXL_SCHEDULE, SDXL_VAE_SCALING_FACTOR, TINY_SDXL_RESAMPLER, tiny_sdxl_base_model
from fact_lightning.training.base_spec import BaseModelSpec

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (every field that sets a size or a block type).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    upcast_attention=False,
)
# vae/config.json: SD1.5's VAE layout with SDXL's scaling factor; it overflows in float16 (force_upcast).
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": SDXL_VAE_SCALING_FACTOR, "force_upcast": True}
# text_encoder/config.json is CLIP ViT-L, SD1.5's text encoder; text_encoder_2/config.json is OpenCLIP bigG.
SDXL_TEXT = SD15_TEXT
SDXL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
POOLED_DIM = SDXL_TEXT_2["projection_dim"]  # text_embeds of the text-time embedding
SDXL_RESAMPLER = ResamplerConfig(output_dim=SDXL_UNET["cross_attention_dim"])  # the official Prj, SDXL's width
SITES = "stack"  # one SFAGS per transformer stack (11 sites), configs/sdxl.yaml's choice
RESOLUTION = 1024


class SDXLRandomBase(BaseModelSpec):
    """SDXL base 1.0's UNet, VAE and two text encoders with seeded random weights (or the tiny SDXL stand-in with
    ``tiny=True``).

    Args:
        device: where the weights are created (building on the GPU is much faster than on the CPU: the full-size
            parts are 3.5B parameters, 14 GB in float32 before the cast to ``frozen_dtype``).
        frozen_dtype: the frozen parts' dtype (float32 or bfloat16).
    """

    base_type = SDXL

    def __init__(self, seed: int = 0, device: str = "cpu", frozen_dtype: str = "float32", tiny: bool = False):
        self.seed, self.device, self.frozen_dtype, self.tiny = seed, device, frozen_dtype, tiny

    def build(self) -> SDXLBaseModel:
        dtype = getattr(torch, self.frozen_dtype)
        if self.tiny:
            base = tiny_sdxl_base_model(seed=self.seed)
        else:
            base = sdxl_random_base_model(self.seed, torch.device(self.device))
        for module in base.frozen_modules():
            torch.nn.Module.to(module, self.device, dtype)  # diffusers' own .to warns about an empty fp32 list
        return base

    def describe(self) -> str:
        return f"{'tiny_sdxl' if self.tiny else 'sdxl'}-random(seed={self.seed})"


def sdxl_random_base_model(seed: int = 0, device: torch.device | str = "cpu") -> SDXLBaseModel:
    """SDXL-size frozen components with seeded random weights, created on ``device`` in float32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fact_lightning.models.tokenizer import clip_tokenizer_from_open_clip, sdxl_second_tokenizer

    device = torch.device(device)
    tokenizer = clip_tokenizer_from_open_clip()
    tokenizer_2 = sdxl_second_tokenizer(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT, **ids))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2, **ids))
    base = SDXLBaseModel(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2,
                         DDPMScheduler(**SDXL_SCHEDULE))
    return base.check("the SDXL-size random base").freeze()


def projection_config(tiny: bool) -> ResamplerConfig:
    """The official Prj with SDXL's 2048-wide output (512-wide TransFace-S tokens), or the tiny SDXL one."""
    return TINY_SDXL_RESAMPLER if tiny else SDXL_RESAMPLER


def synthetic_batch(batch: int, resolution: int, token_dim: int, *, device: torch.device | str = "cpu",
                    cached_latents: bool = False, seed: int = 0) -> dict:
    """``benchmarks.sd15.synthetic_batch`` plus SDXL's micro-conditioning as ``FactDataModule`` delivers it:
    each crop taken whole from a photo of its own size (``original_size`` = the crop's, ``crop_top_left`` = 0),
    recorded (``micro_conditioning`` true), so the step builds its time ids from the batch as in training."""
    out = sd15_synthetic_batch(batch, resolution, token_dim, cached_latents=cached_latents, seed=seed)
    out["original_size"] = torch.full((batch, 2), float(resolution))
    out["crop_top_left"] = torch.zeros(batch, 2)
    out["micro_conditioning"] = torch.ones(batch, dtype=torch.bool)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
