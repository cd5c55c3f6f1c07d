"""SD1.5 as one file: a community checkpoint (``.safetensors`` in the original LDM/CompVis key layout, as people
download them) loaded offline with diffusers' single-file loader and a local config.

The configs of SD1.5's UNet, VAE, text encoder and scheduler ship in the package (``model_configs/sd15``) and the
tokenizer is rebuilt offline, so the file is all a user needs. Another folder of diffusers configs (``unet/``,
``vae/``, ``text_encoder/``, ``scheduler/``; ``tokenizer/`` optional) describes another topology, e.g. the tiny one
of the tests. Before any weight is read, :func:`single_file_problems` checks the file from its safetensors header
alone: that it is complete, and that diffusers' conversion gives every weight of the configured UNet, VAE and text
encoder at the configured shape (diffusers itself would leave a missing weight uninitialised). Pickles
(``.ckpt``, ``.pt``) are refused: loading one runs code from the file. SDXL files (their original SGM layout) load
in :mod:`.single_file_sdxl` with these header helpers; :func:`file_base_type` tells the two apart by their keys.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch

from ..base_types import LABELS, SD15, SDXL
from ..weights import WEIGHT_FILE_SUFFIXES, MissingWeightsError

log = logging.getLogger(__name__)

SD15_CONFIG = Path(__file__).resolve().parents[1] / "model_configs" / "sd15"
CONFIG_FILES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
# SDXL's original (SGM) layout keeps its two text encoders under "conditioner": ViT-L in transformers' layout,
# OpenCLIP bigG in open_clip's own.
XL_TEXT_PREFIX, XL_TEXT_2_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
_MAX_HEADER_BYTES = 100_000_000  # a header past this is not a safetensors header (the format caps it likewise)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_KINDS = {"xl_base": "an SDXL base model", "xl_refiner": "an SDXL refiner", "xl_inpaint": "an SDXL inpainting model",
          "v2": "an SD2 model", "inpainting_v2": "an SD2 inpainting model", "upscale": "an SD upscaler",
          "playground-v2-5": "a Playground v2.5 model"}


class SingleFileError(MissingWeightsError):
    """A single-file base that cannot be used: not safetensors, truncated, or not the configured SD1.5/SDXL model."""


def is_single_file(source: str | Path | None) -> bool:
    """Whether a base model ``source`` names one weights file rather than a diffusers folder or a hub id."""
    if source is None:
        return False
    return str(source).lower().endswith(WEIGHT_FILE_SUFFIXES) or Path(source).expanduser().is_file()


def config_folder(config: str | Path | None) -> Path:
    """The folder of component configs: ``config`` when given, else the packaged SD1.5 one."""
    return SD15_CONFIG if config is None else Path(config).expanduser()


def single_file_problems(path: str | Path, config: str | Path | None = None, option: str | None = None) -> list[str]:
    """What keeps ``path`` (with the configs of ``config``) from loading, as sentences; no weight is read."""
    return file_problems(path, config_folder(config), CONFIG_FILES, check_single_file, option)


def file_problems(path: str | Path, folder: Path, config_files, check, option: str | None,
                  family: str = "") -> list[str]:
    """The file and the config folder's ``config_files`` that are not there, else what ``check(path, folder)``
    refuses (a :class:`SingleFileError`), each with ``option``; ``family`` names the configs (``"SDXL "``)."""
    where = f" ({option})" if option else ""
    path = Path(path).expanduser()
    problems = []
    if not path.is_file():
        problems.append(f"base model file {path}{where} " + ("is a folder" if path.is_dir() else "does not exist"))
    missing = [name for name in config_files if not (folder / name).is_file()]
    if missing:
        problems.append(f"{family}base model config folder {folder} is missing {', '.join(missing)}")
    if problems:
        return problems
    try:
        check(path, folder)
    except SingleFileError as err:
        return [f"{err}{where}"]
    return []


def check_single_file(path: Path, folder: Path) -> None:
    """Raises :class:`SingleFileError` unless ``path``'s header describes every weight that the configs in
    ``folder`` need, at their shapes."""
    try:
        header = read_header(path)
        checkpoint = meta_checkpoint(header)
    except SingleFileError:
        raise
    except OSError as err:
        raise SingleFileError(f"base model file {path} cannot be read: {err}") from None
    except (TypeError, ValueError, RuntimeError):
        raise SingleFileError(f"base model file {path} is not a safetensors file (its header is not "
                              "readable)") from None
    try:
        mismatch = component_mismatches(checkpoint, folder)
    except (OSError, ValueError, TypeError, KeyError) as err:  # configs that diffusers cannot read or build
        raise SingleFileError(f"base model config folder {folder} does not describe models diffusers can build: "
                              f"{' '.join(str(err).split())[:300]}") from None
    if not mismatch and header_base_type(header) == SDXL:  # SDXL configs convert it, but would drop an encoder
        raise SingleFileError(f"base model file {path} is not an SD1.5 checkpoint (it looks like an SDXL base model: "
                              f"a second text encoder under {XL_TEXT_2_PREFIX}*): load it as SDXL")
    if mismatch:
        kind = described_kind(header, SD15)
        raise SingleFileError(f"base model file {path} is not an SD1.5 checkpoint of the configs in {folder}"
                              f"{kind}: {'; '.join(mismatch)}")


def read_header(path: Path) -> dict[str, dict]:
    """The tensor entries (``dtype``, ``shape``, ``data_offsets``) of a safetensors file, checked to be complete."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        start = file.read(9)  # the header's length (8 bytes), then its JSON
        if start[8:9] != b"{" and (start[:2] == b"PK" or start[:1] == b"\x80"):  # a torch zip archive or a pickle
            raise SingleFileError(f"base model file {path} is a pickle (a torch .ckpt/.pt), which can run code when "
                                  "loaded and is refused: convert it to .safetensors")
        if path.suffix.lower() != ".safetensors":
            raise SingleFileError(f"base model file {path} is not a .safetensors file: a single-file base must be "
                                  "one (.ckpt/.pt/.pth/.bin pickles are refused)")
        length = int.from_bytes(start[:8], "little") if len(start) == 9 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
            raise SingleFileError(f"base model file {path} is not a safetensors file, or is truncated "
                                  f"({size} bytes, too few for its header)")
        try:
            header = json.loads(start[8:] + file.read(length - 1))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise SingleFileError(f"base model file {path} is not a safetensors file (its header is not "
                                  "readable)") from None
    if 8 + length + end > size:
        raise SingleFileError(f"base model file {path} is truncated: its header describes {8 + length + end} "
                              f"bytes, the file has {size}")
    return tensors


def meta_checkpoint(header: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins of a file's tensors: what the conversion and the checks need, without the bytes."""
    return {key: torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES.get(info["dtype"], torch.float32),
                             device="meta") for key, info in header.items()}


def header_base_type(header: dict) -> str | None:
    """The base family a file's keys show, by their text encoders: SDXL's second encoder (OpenCLIP bigG under
    ``conditioner.embedders.1.model.``) or SD1.5's CLIP (``cond_stage_model.transformer.``); None for neither."""
    if any(key.startswith(XL_TEXT_2_PREFIX) for key in header):
        return SDXL
    if any(key.startswith(TEXT_PREFIX) for key in header):
        return SD15
    return None


def file_base_type(path: str | Path) -> str | None:
    """:func:`header_base_type` of a safetensors file, from its header alone; None when it cannot be read (the
    file check then says why)."""
    try:
        return header_base_type(read_header(Path(path).expanduser()))
    except (SingleFileError, OSError):
        return None


def described_kind(header: dict, family: str = SD15) -> str:
    """What a file that is not a ``family`` checkpoint of the configs looks like instead, as a parenthesis (or
    nothing when its keys do not tell)."""
    if not any(key.startswith(UNET_PREFIX) for key in header):
        return " (it holds no SD UNet: no model.diffusion_model.* weights)"
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:
        kind = infer_diffusers_model_type(meta_checkpoint(header))
    except (KeyError, IndexError, ValueError, TypeError):
        kind = None
    if kind in _KINDS and not (family == SDXL and kind == "xl_base"):
        return f" (it looks like {_KINDS[kind]})"
    found = header_base_type(header)  # small or unusual files that diffusers' key probes miss
    return f" (it looks like an {LABELS[found]} base model)" if found not in (None, family) else ""


def unet_config(folder: Path, checkpoint: dict[str, torch.Tensor]) -> dict:
    """The UNet config of ``folder``, its input channels those of the file (9 for an inpainting model)."""
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(folder, subfolder="unet", local_files_only=True))
    conv_in = checkpoint.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4:
        config["in_channels"] = int(conv_in.shape[1])
    return config


def convert(checkpoint: dict[str, torch.Tensor], folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file's UNet, VAE and text encoder in diffusers' key layout (diffusers' own conversion functions)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    vae_config = AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True)
    parts = {"unet": {}, "vae": {}}
    try:  # an unexpected layout (another model family) can break the conversion itself
        if any(key.startswith(UNET_PREFIX) for key in checkpoint):
            parts["unet"] = convert_ldm_unet_checkpoint(checkpoint, unet_config(folder, checkpoint))
        if any(key.startswith(VAE_PREFIX) for key in checkpoint):
            parts["vae"] = convert_ldm_vae_checkpoint(checkpoint, vae_config)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise SingleFileError(f"its key layout is not SD1.5's ({type(err).__name__}: {err})") from None
    # Older files lack the "text_model." level; position_ids is a buffer that recent transformers rebuild.
    text = {key.removeprefix("text_model."): value for key, value in convert_ldm_clip_checkpoint(checkpoint).items()
            if not key.endswith("position_ids")}
    parts["text_encoder"] = text
    return parts


@functools.cache
def _expected_shapes(folder: str, unet_json: str) -> dict[str, dict[str, tuple]]:
    """Every weight name and shape of the models that ``folder``'s configs describe (built on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(unet_json))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae", local_files_only=True))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder", local_files_only=True))
    return {"unet": _shapes(unet.state_dict()), "vae": _shapes(vae.state_dict()),
            "text_encoder": _shapes({k.removeprefix("text_model."): v for k, v in text.state_dict().items()
                                     if not k.endswith("position_ids")})}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in state.items()}


def component_mismatches(checkpoint: dict[str, torch.Tensor], folder: Path) -> list[str]:
    """Per component, what the converted ``checkpoint`` lacks, has too many of or has at another shape than the
    models of ``folder``'s configs; empty when it loads strictly."""
    try:
        parts = convert(checkpoint, folder)
    except SingleFileError as err:
        return [str(err)]
    unet_json = json.dumps(unet_config(folder, checkpoint), sort_keys=True)
    expected = _expected_shapes(str(folder), unet_json)
    names = {"unet": f"UNet ({UNET_PREFIX}*)", "vae": f"VAE ({VAE_PREFIX}*)",
             "text_encoder": f"text encoder ({TEXT_PREFIX}*)"}
    return shape_mismatches(parts, expected, names)


def shape_mismatches(parts: dict[str, dict[str, torch.Tensor]], expected: dict[str, dict[str, tuple]],
                     names: dict[str, str]) -> list[str]:
    """Per component (``names``: how to call each), the weights of ``expected`` that ``parts`` lack, those it
    has too many of and those at another shape; empty when every component loads strictly."""
    problems = []
    for part, want in expected.items():
        got = _shapes(parts[part])
        if not got:
            problems.append(f"it has no {names[part]}")
            continue
        missing = sorted(want.keys() - got.keys())
        extra = sorted(got.keys() - want.keys())
        reshaped = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
        found = []
        if missing:
            found.append(f"{len(missing)} of its {len(want)} weights missing (e.g. {missing[0]})")
        if extra:
            found.append(f"{len(extra)} unknown weights (e.g. {extra[0]})")
        if reshaped:
            k = reshaped[0]
            found.append(f"{len(reshaped)} weights of another shape (e.g. {k}: {list(got[k])} in the file, "
                         f"{list(want[k])} in the config)")
        if found:
            problems.append(f"{names[part]}: {', '.join(found)}")
    return problems


def read_checked(path: str | Path, problems: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of a single file whose header checks (``problems``) found nothing; else one SingleFileError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if problems:
        raise SingleFileError("; ".join(problems))
    try:
        return load_file(Path(path).expanduser())
    except (SafetensorError, OSError) as err:
        raise SingleFileError(f"base model file {path} cannot be read: {err}") from None


def unet_and_vae(parts: dict, folder: Path, checkpoint: dict) -> tuple:
    """The converted UNet and VAE, built by diffusers' ``from_single_file`` with the configs of ``folder`` (the
    UNet's input channels from the file: an inpainting checkpoint keeps its 9)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    common = {"config": str(folder), "local_files_only": True}
    unet = UNet2DConditionModel.from_single_file(parts["unet"], subfolder="unet",
                                                 in_channels=unet_config(folder, checkpoint)["in_channels"], **common)
    return unet, AutoencoderKL.from_single_file(parts["vae"], subfolder="vae", **common)


def load_single_file(path: str | Path, config: str | Path | None = None, *, dtype: torch.dtype | None = None,
                     option: str | None = None) -> tuple:
    """The UNet, VAE, text encoder, tokenizer and noise scheduler of a single-file checkpoint, offline, in the order
    of :class:`~fact_lightning.models.base.BaseModel`'s fields (``dtype``: of the weights, float32 by default).

    ``config``: a folder of diffusers component configs (default: the packaged SD1.5 ones). Every problem is
    named before a weight is read (:func:`single_file_problems`); the UNet and VAE come from diffusers'
    ``from_single_file`` and the text encoder from its single-file CLIP loader, all with the local configs.
    """
    from diffusers import DDPMScheduler
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel

    checkpoint = read_checked(path, single_file_problems(path, config, option))
    folder = config_folder(config)
    parts = convert(checkpoint, folder)
    unet, vae = unet_and_vae(parts, folder, checkpoint)
    # diffusers' CLIP loader reads the original prefix, with the "text_model." level that older files lack.
    text_checkpoint = {f"{TEXT_PREFIX}text_model.{key}": value for key, value in parts["text_encoder"].items()}
    text_encoder = create_diffusers_clip_model_from_ldm(CLIPTextModel, text_checkpoint, subfolder="text_encoder",
                                                        config=str(folder), local_files_only=True)
    for module in (unet, vae, text_encoder):
        # Cast here, not through torch_dtype: diffusers' own .to warns about an empty list of float32 modules.
        torch.nn.Module.to(module, dtype or torch.float32)
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    log.info("loaded the single-file base %s with the configs in %s", path, folder)
    return unet, vae, text_encoder, _tokenizer(folder), scheduler


def _tokenizer(folder: Path):
    """The config folder's tokenizer if it has one, else SD1.5's, rebuilt offline."""
    from transformers import CLIPTokenizer

    from .tokenizer import clip_tokenizer_from_open_clip

    if (folder / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    return clip_tokenizer_from_open_clip()


def single_file_vae_name(path: str | Path) -> str:
    """A stable name for the VAE of a single-file base, as shards record the VAE of their cached latents: the file's
    name and the sha256 of its VAE tensors (keys, dtypes, shapes, bytes), which a changed VAE changes and a
    changed UNet or text encoder does not. A file that cannot be read is named by its path alone (its loading
    then fails with the reason)."""
    path = Path(path).expanduser()
    try:
        stat = path.stat()
        digest = _vae_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except (OSError, SingleFileError):
        return str(path)
    return f"{path.name}@vae-sha256:{digest[:16]}"


@functools.lru_cache(maxsize=8)
def _vae_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 over the VAE tensors of a safetensors file, read by their header offsets (size and mtime: cache key)."""
    header = read_header(Path(path))
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        base = 8 + int.from_bytes(file.read(8), "little")  # the tensors' bytes start after the header
        for key in sorted(k for k in header if k.startswith(VAE_PREFIX)):
            info = header[key]
            begin, end = (int(x) for x in info["data_offsets"])
            digest.update(f"{key}|{info['dtype']}|{info['shape']}|".encode())
            file.seek(base + begin)
            digest.update(file.read(end - begin))
    return digest.hexdigest()
