"""SDXL as one file: ``sd_xl_base_1.0.safetensors`` or a community fine-tune in its original (SGM) key layout,
loaded offline with diffusers' single-file conversion and local configs; the SDXL counterpart of
:mod:`.single_file`, with the same header-first checks.

The SGM layout: the UNet under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` (as SD1.5), CLIP
ViT-L under ``conditioner.embedders.0.transformer.`` (transformers' layout) and OpenCLIP bigG under
``conditioner.embedders.1.model.`` (open_clip's layout: fused attention projections, ``text_projection`` as a
matrix). The configs of SDXL base 1.0's UNet, VAE, both text encoders and scheduler ship in the package
(``model_configs/sdxl``); both tokenizers are rebuilt offline (the second pads with ``!``, as SDXL's does).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch

from ..base_types import SD15, SDXL
from .single_file import (CONFIG_FILES, TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, XL_TEXT_2_PREFIX, XL_TEXT_PREFIX,
                          SingleFileError, described_kind, file_problems, header_base_type, meta_checkpoint,
                          read_checked, read_header, shape_mismatches, unet_and_vae, unet_config)

log = logging.getLogger(__name__)

SDXL_CONFIG = Path(__file__).resolve().parents[1] / "model_configs" / "sdxl"
SDXL_CONFIG_FILES = (*CONFIG_FILES, "text_encoder_2/config.json")
_NAMES = {"unet": f"UNet ({UNET_PREFIX}*)", "vae": f"VAE ({VAE_PREFIX}*)",
          "text_encoder": f"text encoder ({XL_TEXT_PREFIX}*)",
          "text_encoder_2": f"text encoder 2 ({XL_TEXT_2_PREFIX}*)"}


def sdxl_config_folder(config: str | Path | None) -> Path:
    """The folder of component configs: ``config`` when given, else the packaged SDXL base 1.0 one."""
    return SDXL_CONFIG if config is None else Path(config).expanduser()


def sdxl_single_file_problems(path: str | Path, config: str | Path | None = None,
                              option: str | None = None) -> list[str]:
    """What keeps ``path`` (with the configs of ``config``) from loading as SDXL, as sentences; no weight is read."""
    return file_problems(path, sdxl_config_folder(config), SDXL_CONFIG_FILES, check_sdxl_single_file, option, "SDXL ")


def check_sdxl_single_file(path: Path, folder: Path) -> None:
    """Raises :class:`SingleFileError` unless ``path``'s header describes every weight that the SDXL configs in
    ``folder`` need, at their shapes."""
    try:
        header = read_header(path)
        checkpoint = meta_checkpoint(header)
    except OSError as err:
        raise SingleFileError(f"base model file {path} cannot be read: {err}") from None
    except (TypeError, ValueError, RuntimeError):
        raise SingleFileError(f"base model file {path} is not a safetensors file (its header is not "
                              "readable)") from None
    if header_base_type(header) == SD15:
        raise SingleFileError(f"base model file {path} is not an SDXL checkpoint (it looks like an SD1.5 base model: "
                              f"one text encoder, under {TEXT_PREFIX}*): load it as SD1.5")
    try:
        mismatch = sdxl_component_mismatches(checkpoint, folder)
    except (OSError, ValueError, TypeError, KeyError) as err:  # configs that diffusers cannot read or build
        raise SingleFileError(f"SDXL base model config folder {folder} does not describe models diffusers can "
                              f"build: {' '.join(str(err).split())[:300]}") from None
    if mismatch:
        raise SingleFileError(f"base model file {path} is not an SDXL checkpoint of the configs in {folder}"
                              f"{described_kind(header, SDXL)}: {'; '.join(mismatch)}")


def convert_sdxl(checkpoint: dict[str, torch.Tensor], folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file's UNet, VAE and two text encoders in diffusers' key layout (diffusers' own conversion functions;
    text_encoder without transformers' ``text_model.`` level, text_encoder_2 with it, as the models name them)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     convert_open_clip_checkpoint)

    parts = {"unet": {}, "vae": {}, "text_encoder": {}, "text_encoder_2": {}}
    try:  # an unexpected layout (another model family) can break the conversion itself
        if any(key.startswith(UNET_PREFIX) for key in checkpoint):
            parts["unet"] = convert_ldm_unet_checkpoint(checkpoint, unet_config(folder, checkpoint))
        if any(key.startswith(VAE_PREFIX) for key in checkpoint):
            vae_config = AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True)
            parts["vae"] = convert_ldm_vae_checkpoint(checkpoint, vae_config)
        second = {key: value for key, value in checkpoint.items() if key.startswith(XL_TEXT_2_PREFIX)}
        if second:
            converted = convert_open_clip_checkpoint(_open_clip_model_like(folder), second, prefix=XL_TEXT_2_PREFIX)
            parts["text_encoder_2"] = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise SingleFileError(f"its key layout is not SDXL's ({type(err).__name__}: {err})") from None
    # ViT-L is stored in transformers' own layout: only its prefix (and the "text_model." level) goes.
    parts["text_encoder"] = {key[len(XL_TEXT_PREFIX):].removeprefix("text_model."): value
                             for key, value in checkpoint.items()
                             if key.startswith(XL_TEXT_PREFIX) and not key.endswith("position_ids")}
    return parts


def _open_clip_model_like(folder: Path):
    """What ``convert_open_clip_checkpoint`` takes as its model: it reads only ``config.hidden_size``, the width
    that splits the fused q/k/v projections when the file has no ``text_projection`` (whose rows give it)."""
    from types import SimpleNamespace

    from transformers import CLIPTextConfig

    config = CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2", local_files_only=True)
    return SimpleNamespace(config=SimpleNamespace(hidden_size=config.hidden_size))


@functools.cache
def _expected_sdxl_shapes(folder: str, unet_json: str) -> dict[str, dict[str, tuple]]:
    """Every weight name and shape of the models that ``folder``'s SDXL configs describe (built on the meta
    device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text(model) -> dict[str, tuple]:
        return {key: tuple(value.shape) for key, value in model.state_dict().items()
                if not key.endswith("position_ids")}

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(unet_json))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True))
        first = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True))
        second = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2",
                                                                            local_files_only=True))
    return {"unet": text(unet), "vae": text(vae),
            "text_encoder": {k.removeprefix("text_model."): v for k, v in text(first).items()},
            "text_encoder_2": text(second)}


def sdxl_component_mismatches(checkpoint: dict[str, torch.Tensor], folder: Path) -> list[str]:
    """Per component, what the converted ``checkpoint`` lacks, has too many of or has at another shape than the
    SDXL models of ``folder``'s configs; empty when it loads strictly."""
    try:
        parts = convert_sdxl(checkpoint, folder)
    except SingleFileError as err:
        return [str(err)]
    expected = _expected_sdxl_shapes(str(folder), json.dumps(unet_config(folder, checkpoint), sort_keys=True))
    return shape_mismatches(parts, expected, _NAMES)


def load_sdxl_single_file(path: str | Path, config: str | Path | None = None, *, dtype: torch.dtype | None = None,
                          option: str | None = None) -> tuple:
    """The UNet, VAE, two text encoders, two tokenizers and the training noise schedule (DDPM over SDXL's betas)
    of a single-file SDXL checkpoint, offline, in the order of
    :class:`~fact_lightning.models.sdxl_base.SDXLBaseModel`'s fields (``dtype``: of the weights, float32 by
    default).

    ``config``: a folder of diffusers component configs (default: SDXL base 1.0's, shipped in the package). Every
    problem is named before a weight is read (:func:`sdxl_single_file_problems`); the UNet and VAE come from
    diffusers' ``from_single_file``, the text encoders from its single-file CLIP loader, all with the local configs.
    """
    from diffusers import DDPMScheduler
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    checkpoint = read_checked(path, sdxl_single_file_problems(path, config, option))
    folder = sdxl_config_folder(config)
    parts = convert_sdxl(checkpoint, folder)
    unet, vae = unet_and_vae(parts, folder, checkpoint)
    common = {"config": str(folder), "local_files_only": True}
    # diffusers' CLIP loader tells the encoders apart by their original keys: each gets its own alone.
    first = {f"{XL_TEXT_PREFIX}text_model.{key}": value for key, value in parts["text_encoder"].items()}
    second = {key: value for key, value in checkpoint.items() if key.startswith(XL_TEXT_2_PREFIX)}
    text_encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, first, subfolder="text_encoder", **common)
    text_encoder_2 = create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, second,
                                                          subfolder="text_encoder_2", **common)
    for module in (unet, vae, text_encoder, text_encoder_2):
        # Cast here, not through torch_dtype: diffusers' own .to warns about an empty list of float32 modules.
        torch.nn.Module.to(module, dtype or torch.float32)
    # SDXL ships an Euler sampler config; training draws noise with DDPM over the same betas.
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    tokenizer, tokenizer_2 = _tokenizers(folder)
    log.info("loaded the single-file SDXL base %s with the configs in %s", path, folder)
    return unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler


def _tokenizers(folder: Path) -> tuple:
    """The config folder's tokenizers where it has them, else SDXL's, rebuilt offline: CLIP's BPE, the second
    padding with ``!`` (SDXL's tokenizer_2), not with the end token."""
    from transformers import CLIPTokenizer

    from .tokenizer import clip_tokenizer_from_open_clip, sdxl_second_tokenizer

    found = [CLIPTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True)
             if (folder / sub).is_dir() else None for sub in ("tokenizer", "tokenizer_2")]
    first = found[0] or clip_tokenizer_from_open_clip()
    return first, found[1] or sdxl_second_tokenizer(first)
