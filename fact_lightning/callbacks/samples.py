"""Image grids in TensorBoard every N steps: reference face, target with its mask, samples with and without adapter."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger


log = logging.getLogger(__name__)


def mask_overlay(pixels: torch.Tensor, mask: torch.Tensor, alpha: float = 0.4) -> torch.Tensor:
    """Crops (B, 3, R, R) in [-1, 1] with the face mask (B, 1, R, R) tinted red; returns [0, 1]."""
    image = (pixels.float() + 1) / 2
    red = torch.tensor([1.0, 0.0, 0.0], device=image.device).view(1, 3, 1, 1)
    return (image * (1 - alpha * mask) + red * alpha * mask).clamp(0, 1)


def image_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows of (B, 3, R, R) images in [0, 1] -> one (3, rows*R, B*R) image."""
    return torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)


class SampleImages(pl.Callback):
    """Logs a grid every ``every_n_steps`` training steps, from the current batch's first ``num_samples`` items.

    Rows: reference face, target crop with its mask, fixed-seed sample with the adapter (inference scale),
    the same seed without the adapter. Generated on rank 0 (on every rank when the adapter is sharded,
    since its weights must be gathered), logged on rank 0.
    """

    def __init__(self, every_n_steps: int = 500, num_samples: int = 2, prompt: str = "a photo of a person",
                 inference_steps: int = 20, guidance: float = 5.0, adapter_scale: float = 0.5, seed: int = 0):
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.prompt = prompt
        self.inference_steps = inference_steps
        self.guidance = guidance
        self.adapter_scale = adapter_scale
        self.seed = seed

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps or not trainer.loggers:
            return
        sharded = pl_module.device_mesh is not None
        if not (trainer.is_global_zero or sharded):
            return
        n = min(self.num_samples, len(batch["key"]))
        resolution = batch["pixels"].shape[-1]
        was_training = pl_module.training
        pl_module.eval()
        try:
            with_adapter = self._generate(pl_module, batch["tokens"][:n], resolution, self.adapter_scale)
            without = self._generate(pl_module, batch["tokens"][:n], resolution, 0.0)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        faces = F.interpolate(batch["face"][:n].float(), size=(resolution, resolution), mode="bilinear")
        targets = mask_overlay(batch["pixels"][:n], batch["mask"][:n])
        grid = image_grid([faces.cpu(), targets.cpu(), with_adapter.cpu(), without.cpu()])
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/face_target_adapter_base", grid, step)

    def _generate(self, module: pl.LightningModule, tokens: torch.Tensor, resolution: int, scale: float) -> torch.Tensor:
        """One fixed-seed image per sample's cached face tokens, through the inference generator: (B, 3, R, R)."""
        from ..inference.generator import FacePortraitGenerator, IdentityCondition
        from ..models.base import BaseModel

        base = BaseModel(module.unet, module.vae, module.text_encoder, module.tokenizer, module.noise_scheduler)
        generator = FacePortraitGenerator.from_components(base, module.adapter)
        images = [
            generator(self.prompt, IdentityCondition(face.unsqueeze(0).float()), scale=scale,
                      guidance_scale=self.guidance, num_inference_steps=self.inference_steps, seed=self.seed,
                      height=resolution, width=resolution, output_type="np")[0]
            for face in tokens
        ]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
