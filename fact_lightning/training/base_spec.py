"""Which frozen SD1.5 or SDXL parts to train on, as small typed objects that LightningCLI builds from ``class_path``.

A spec only describes; ``build()`` loads or creates the weights (in ``configure_model``, never at import
or in a constructor); ``weight_problems()`` says, without loading anything, what ``build()`` would miss.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..base_types import SD15, SDXL
from ..models.base import BaseModel, base_model_files, load_base_model
from ..models.sdxl_base import SDXLBaseModel, load_sdxl_base_model, sdxl_base_model_files
from ..models.single_file import is_single_file, single_file_problems, single_file_vae_name
from ..models.single_file_sdxl import sdxl_single_file_problems
from ..tiny import tiny_base_model
from ..tiny_sdxl import tiny_sdxl_base_model
from ..weights import check_source

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
FrozenDtype = Literal["float32", "bfloat16", "float16"]


class BaseModelSpec:
    """Interface: ``build() -> BaseModel`` (frozen), ``describe() -> str`` for adapter metadata,
    ``describe_vae() -> str``: the VAE's name as ``fact-data --vae`` records it (``manifest["vae"]["name"]``),
    which training compares with the shards' cached latents, and ``weight_problems() -> list[str]``: what
    ``build()`` would not find (``fact-train`` names them all before anything loads). ``base_type``: the
    family (``base_types.SD15`` or ``SDXL``) that exports record in an adapter's metadata."""

    base_type = SD15

    def build(self) -> BaseModel:
        raise NotImplementedError

    def weight_problems(self) -> list[str]:
        return []

    def describe(self) -> str:
        raise NotImplementedError

    def describe_vae(self) -> str:
        return self.describe()


class _WeightsFolderBase(BaseModelSpec):
    """What the pretrained specs share: a source (diffusers folder, hub id or single file) with its revision,
    variant and config folder, the dtype of the frozen weights, the weight checks and the VAE's name. A family
    gives its folder's file list and its single-file check."""

    OPTION = "model.base.init_args.source"  # where fact-train's config names the source
    FOLDER = "base model folder"  # how messages name a folder source

    def __init__(self, source: str, revision: str | None = None, variant: str | None = None,
                 local_files_only: bool = False, frozen_dtype: FrozenDtype = "float32", config: str | None = None):
        self.source = source
        self.revision = revision
        self.variant = variant
        self.local_files_only = local_files_only
        self.frozen_dtype = frozen_dtype
        self.config = config

    def folder_files(self) -> list:
        raise NotImplementedError

    def file_problems(self) -> list[str]:
        raise NotImplementedError

    def weight_problems(self) -> list[str]:
        """The files of ``source`` that loading would miss (a local folder's, or a hub id's that is neither cached
        nor downloadable now), as one sentence; no weights are read. A single file is checked from its header:
        complete, safetensors, and holding every weight of the configured model at its shape (a file of the other
        family is named as such)."""
        if is_single_file(self.source):
            return self.file_problems()
        if self.config is not None:
            return [f"model.base.init_args.config ({self.config}) goes with a single-file source; {self.source} is "
                    "a folder or hub id, whose own configs are used"]
        located = check_source(self.source, self.FOLDER, self.folder_files(), revision=self.revision,
                               local_files_only=self.local_files_only, option=self.OPTION)
        return [] if located.problem is None else [located.problem]

    def describe(self) -> str:
        # The source alone (a file's configs only describe its layout): what the model card's load lines take.
        return self.source if self.revision is None else f"{self.source}@{self.revision}"

    def describe_vae(self) -> str:
        """The base model's folder or hub id (+ ``@revision``): its ``vae/`` is the VAE, as ``fact-data --vae``
        names it when given the same folder (or its ``vae/``). For a single file: its name and the sha256 of its
        VAE tensors (``single_file_vae_name``)."""
        if is_single_file(self.source):
            return single_file_vae_name(self.source)
        return vae_name(self.source, self.revision)


class PretrainedBase(_WeightsFolderBase):
    """An SD1.5-style model from a local diffusers folder, a hub id or a single-file checkpoint.

    Args:
        source: a folder holding unet/, vae/, text_encoder/, tokenizer/, scheduler/, a hub id, or one
            ``.safetensors`` file in the original LDM layout (a community SD1.5 fine-tune such as majicMIX
            realistic), loaded offline.
        frozen_dtype: dtype of the frozen weights (bfloat16 halves their memory; the adapter stays float32).
        config: with a single file only: a folder of diffusers component configs that describe it (unet/, vae/,
            text_encoder/, scheduler/; tokenizer/ optional); default: SD1.5's, shipped in the package.
    """

    def __init__(
        self,
        source: str,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool = False,
        frozen_dtype: FrozenDtype = "float32",
        config: str | None = None,
    ):
        super().__init__(source, revision, variant, local_files_only, frozen_dtype, config)

    def build(self) -> BaseModel:
        return load_base_model(
            self.source, revision=self.revision, variant=self.variant, dtype=_DTYPES[self.frozen_dtype],
            local_files_only=self.local_files_only, option=self.OPTION, config=self.config,
        )

    def folder_files(self) -> list:
        return base_model_files(self.variant)

    def file_problems(self) -> list[str]:
        return single_file_problems(self.source, self.config, option=self.OPTION)


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
            nn.Module.to(module, _DTYPES[self.dtype])  # diffusers' .to warns about an empty fp32 list
        return base

    def describe(self) -> str:
        return f"tiny(seed={self.seed}, cross_attention_dim={self.cross_attention_dim})"

    def describe_vae(self) -> str:
        return tiny_vae_name(self.seed)  # the VAE does not depend on cross_attention_dim


class PretrainedSDXLBase(_WeightsFolderBase):
    """SDXL base 1.0 (or a fine-tune in its layout) from a local diffusers folder, a hub id or a single file.

    Args:
        source: a folder holding unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/,
            scheduler/, a hub id (``stabilityai/stable-diffusion-xl-base-1.0``), loaded offline when cached, or one
            ``.safetensors`` file in the original SGM layout (``sd_xl_base_1.0.safetensors``, a community SDXL
            fine-tune), loaded offline.
        revision, variant: as ``from_pretrained`` takes them (``variant: fp16`` for the half-size files).
        frozen_dtype: dtype of the frozen weights (bfloat16 halves their memory; the adapter stays float32).
            SDXL's VAE overflows in float16 (its config says ``force_upcast``): with ``float16`` it stays float32.
        config: with a single file only: a folder of diffusers component configs that describe it (unet/, vae/,
            text_encoder/, text_encoder_2/, scheduler/; tokenizer/, tokenizer_2/ optional); default: SDXL base
            1.0's, shipped in the package.
    """

    base_type = SDXL
    FOLDER = "SDXL base model folder"

    def __init__(
        self,
        source: str,
        revision: str | None = None,
        variant: str | None = None,
        local_files_only: bool = False,
        frozen_dtype: FrozenDtype = "float32",
        config: str | None = None,
    ):
        super().__init__(source, revision, variant, local_files_only, frozen_dtype, config)

    def build(self) -> SDXLBaseModel:
        base = load_sdxl_base_model(self.source, revision=self.revision, variant=self.variant,
                                    dtype=_DTYPES[self.frozen_dtype], local_files_only=self.local_files_only,
                                    option=self.OPTION, config=self.config)
        if self.frozen_dtype == "float16" and getattr(base.vae.config, "force_upcast", False):
            nn.Module.to(base.vae, _DTYPES["float32"])  # NaN latents otherwise (SDXL's VAE in float16)
        return base

    def folder_files(self) -> list:
        return sdxl_base_model_files(self.variant)

    def file_problems(self) -> list[str]:
        return sdxl_single_file_problems(self.source, self.config, option=self.OPTION)


class TinySDXLBase(BaseModelSpec):
    """Seeded random components with SDXL's topology (:mod:`fact_lightning.tiny_sdxl`), for CPU tests and demos.

    ``dtype="float64"`` serves numerical comparisons (e.g. distributed vs. single-process runs).
    """

    base_type = SDXL

    def __init__(self, seed: int = 0, dtype: Literal["float32", "bfloat16", "float64"] = "float32"):
        self.seed = seed
        self.dtype = dtype

    def build(self) -> SDXLBaseModel:
        base = tiny_sdxl_base_model(seed=self.seed)
        for module in base.frozen_modules():
            nn.Module.to(module, _DTYPES[self.dtype])  # diffusers' .to warns about an empty fp32 list
        return base

    def describe(self) -> str:
        return f"tiny_sdxl(seed={self.seed})"

    def describe_vae(self) -> str:
        return tiny_sdxl_vae_name(self.seed)


def tiny_sdxl_vae_name(seed: int) -> str:
    """The name of the tiny seeded VAE of ``tiny_sdxl_base_model(seed)`` (not the SD1.5 stand-in's VAE)."""
    return f"tiny_sdxl(seed={seed})"


def tiny_vae_name(seed: int) -> str:
    """The name of the tiny seeded VAE of ``tiny_base_model(seed)``."""
    return f"tiny(seed={seed})"


def vae_name(source: str, revision: str | None = None) -> str:
    """The name of the VAE of an SD model folder or hub id, or of its ``vae/`` subfolder (the same VAE)."""
    text = str(source).rstrip("/")
    if text.endswith("/vae"):
        text = text[: -len("/vae")]
    return text if revision is None else f"{text}@{revision}"


def spec_vae_name(base) -> str | None:
    """``describe_vae()`` of a spec, or of the ``class_path``/``init_args`` that LightningCLI parsed for one
    (``fact-train`` links ``model.base`` to ``data.vae`` through this; building a spec loads nothing)."""
    if base is None:
        return None
    if isinstance(base, BaseModelSpec):
        return base.describe_vae()
    import importlib

    from jsonargparse import Namespace

    if isinstance(base, Namespace) and base.get("class_path"):
        init = base.get("init_args")
        kwargs = init.as_dict() if isinstance(init, Namespace) else dict(init or {})
        module, _, name = base["class_path"].rpartition(".")
        return getattr(importlib.import_module(module), name)(**kwargs).describe_vae()
    return None
