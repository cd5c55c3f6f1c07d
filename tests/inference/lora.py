"""A tiny seeded LoRA in diffusers' file format, for the LoRA tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def tiny_lora_state_dict(unet: nn.Module, seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """A seeded random LoRA for ``unet``'s attention projections, as diffusers' PEFT state dict.

    ``unet`` is left as it was (the LoRA is added to a copy).
    """
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(unet)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in state.items()}


def save_tiny_lora(unet: nn.Module, folder: str | Path, seed: int = 0) -> Path:
    """Writes a tiny random LoRA file in diffusers' format (``pytorch_lora_weights.safetensors``)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=tiny_lora_state_dict(unet, seed))
    return folder / "pytorch_lora_weights.safetensors"
