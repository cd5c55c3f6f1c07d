"""Which frozen SD1.5 parts to train on, as small typed objects that LightningCLI builds from ``class_path``.

A spec only describes; ``build()`` loads or creates the weights (in ``configure_model``, never at import
or in a constructor).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..models.base import BaseModel, load_base_model
from ..tiny import tiny_base_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
FrozenDtype = Literal["float32", "bfloat16", "float16"]


class BaseModelSpec:
    """Interface: ``build() -> BaseModel`` (frozen) and ``describe() -> str`` for adapter metadata."""

    def build(self) -> BaseModel:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class PretrainedBase(BaseModelSpec):
    """An SD1.5-style model from a local diffusers folder or a hub id.

    Args:
        source: a folder holding unet/, vae/, text_encoder/, tokenizer/, scheduler/, or a hub id.
        frozen_dtype: dtype of the frozen weights (bfloat16 halves their memory; the adapter stays float32).
    """

    def __init__(
        self,
        source: str,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool = False,
        frozen_dtype: FrozenDtype = "float32",
    ):
        self.source = source
        self.revision = revision
        self.variant = variant
        self.local_files_only = local_files_only
        self.frozen_dtype = frozen_dtype

    def build(self) -> BaseModel:
        return load_base_model(
            self.source, revision=self.revision, variant=self.variant, dtype=_DTYPES[self.frozen_dtype],
            local_files_only=self.local_files_only,
        )

    def describe(self) -> str:
        return self.source if self.revision is None else f"{self.source}@{self.revision}"


class TinyBase(BaseModelSpec):
    """Seeded random components with SD1.5's topology (16 adapted blocks), for CPU tests and demos.

    ``dtype="float64"`` serves numerical comparisons (e.g. distributed vs. single-process runs).
    """

    def __init__(self, seed: int = 0, cross_attention_dim: int = 32,
                 dtype: Literal["float32", "bfloat16", "float64"] = "float32"):
        self.seed = seed
        self.cross_attention_dim = cross_attention_dim
        self.dtype = dtype

    def build(self) -> BaseModel:
        base = tiny_base_model(seed=self.seed, cross_attention_dim=self.cross_attention_dim)
        for module in base.frozen_modules():
            module.to(_DTYPES[self.dtype])
        return base

    def describe(self) -> str:
        return f"tiny(seed={self.seed}, cross_attention_dim={self.cross_attention_dim})"
