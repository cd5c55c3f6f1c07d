"""The VAE alone of a single-file checkpoint, SD1.5 or SDXL by its keys: what ``fact-data --vae FILE`` caches
latents with (named by :func:`.single_file.single_file_vae_name`, as training names the base's VAE)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..base_types import SDXL
from .single_file import VAE_PREFIX, SingleFileError, config_folder, file_base_type, single_file_problems
from .single_file_sdxl import sdxl_config_folder, sdxl_single_file_problems


def load_single_file_vae(path: str | Path, config: str | Path | None = None, *, option: str | None = None):
    """The VAE of a single-file checkpoint alone, float32, reading only its VAE tensors (for ``fact-data``'s cached
    latents: name them with :func:`single_file_vae_name`). An SDXL file (by its keys) is checked and configured as
    SDXL (its VAE's scaling factor is not SD1.5's)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors import SafetensorError, safe_open

    sdxl = file_base_type(path) == SDXL
    problems = (sdxl_single_file_problems if sdxl else single_file_problems)(path, config, option)
    if problems:
        raise SingleFileError("; ".join(problems))
    path, folder = Path(path).expanduser(), (sdxl_config_folder if sdxl else config_folder)(config)
    try:
        with safe_open(str(path), framework="pt") as file:
            checkpoint = {key: file.get_tensor(key) for key in file.keys() if key.startswith(VAE_PREFIX)}
    except (SafetensorError, OSError) as err:
        raise SingleFileError(f"base model file {path} cannot be read: {err}") from None
    weights = convert_ldm_vae_checkpoint(checkpoint, AutoencoderKL.load_config(folder, subfolder="vae",
                                                                               local_files_only=True))
    vae = AutoencoderKL.from_single_file(weights, config=str(folder), subfolder="vae", local_files_only=True)
    return torch.nn.Module.to(vae, torch.float32).requires_grad_(False).eval()
