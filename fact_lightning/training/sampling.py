"""A small fixed-seed sampler for training previews (paper Eq. 5: CFG over text and face together)."""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(
    module,
    tokens: torch.Tensor,
    prompt: str,
    *,
    resolution: int,
    steps: int = 20,
    guidance: float = 5.0,
    adapter_scale: float = 0.5,
    seed: int = 0,
    negative_prompt: str = "",
) -> torch.Tensor:
    """Images (B, 3, R, R) in [0, 1] from face tokens (B, N, D) with a DDIM sampler.

    Guidance is diffusers' ``uncond + g * (cond - uncond)`` with uncond = (negative text, Prj(zeros)), which is
    Eq. 5 with g = 1 + w. ``adapter_scale=0`` gives the base model's image for the same seed.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(module.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    batch = tokens.shape[0]
    adapter, unet, vae = module.adapter, module.unet, module.vae
    text = module.encode_text([prompt] * batch + [negative_prompt] * batch)
    faces = torch.cat([adapter.project(tokens.to(module.device)), adapter.null_embedding(batch, tokens.shape[1])])
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (batch, unet.config.in_channels, resolution // factor, resolution // factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(module.device)
    latents = latents * scheduler.init_noise_sigma
    kwargs = adapter.condition(faces, adapter_scale)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps = unet(model_in.to(unet.dtype), t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample.float()
        cond, uncond = eps.chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.float()
    return ((images + 1) / 2).clamp(0, 1)
