"""Explicit key maps to and from the official FACT and TransFace files (modelscope/facechain ``face_adapter``).

Official FACT checkpoint (one torch pickle of tensors):
    ``<block>.attn2.processor.<param>``  for each adapted transformer block, <param> one of the SFAGS weights
                                         (same names as ours) or ``ln.*``: the block's own norm2, which the
                                         official code moves into its processor;
    ``local_fac_prj.<param>``            the perceiver resampler, same names as ours.
Like the official loader (which keeps only keys with ``processor`` / ``local_fac_prj`` and loads the
processors non-strictly) we ignore, with a warning, keys the adapter does not use; unlike it, a key the
adapter needs that is missing or of the wrong shape is an error.
Official TransFace file: a plain state dict of its VisionTransformer, same names as ``TransFaceEncoder``.
Both are pickles: always read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_open, sha256_file
from ..models.face_encoder import TransFaceConfig, TransFaceEncoder, build_transface, transface_config
from ..models.injection import FaceAdapter
from ..models.resampler import PerceiverResampler, ResamplerConfig
from ..models.unet_layout import transformer_block_sites

log = logging.getLogger(__name__)

PROJECTION_PREFIX = "local_fac_prj."
PROCESSOR_INFIX = ".attn2.processor."
MOVED_NORM = "ln."  # the block's norm2, stored inside the official processor


def _read_torch_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, a foreign pickle, random bytes: all say the same to the user
        raise ValueError(f"{what} {path} is not a readable torch checkpoint ({type(err).__name__}: {err})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} {path} does not hold a flat state dict of tensors")
    return state


def _check_keys(name: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise ValueError(
            f"{name} does not match: {len(missing)} missing keys {sorted(missing)[:5]}, "
            f"{len(unexpected)} unexpected keys {sorted(unexpected)[:5]}"
        )


# -- TransFace -------------------------------------------------------------------------------------------
def load_transface(path: str | Path, **arch) -> TransFaceEncoder:
    """An eval-mode TransFace encoder from an official state dict (e.g. ``ms1mv2_model_TransFace_S.pt``).

    ``arch`` takes the official VisionTransformer's argument names (img_size, patch_size, num_classes,
    embed_dim, depth, num_heads, mlp_ratio); the defaults are TransFace-S. Keys must match exactly.
    """
    state = _read_torch_file(path, "TransFace weights")
    known = set(TransFaceConfig.__dataclass_fields__)
    ignored = {"drop_path_rate", "norm_layer", "mask_ratio", "using_checkpoint", "in_channels", "drop_rate", "attn_drop_rate"}
    unknown = set(arch) - known - ignored
    if unknown:
        raise TypeError(f"unknown TransFace argument(s): {sorted(unknown)}")
    encoder = TransFaceEncoder(TransFaceConfig(**{k: v for k, v in arch.items() if k in known}))
    try:
        result = encoder.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"TransFace weights {path} do not fit the architecture {encoder.config}: {err}") from err
    _check_keys(f"TransFace weights {path}", result.missing_keys, result.unexpected_keys)
    return encoder.eval()


RANDOM_ENCODER_SEED = 0
RANDOM_ENCODER_WARNING = (
    "features come from a RANDOMLY INITIALISED TransFace encoder: fine for tests and demos, "
    "useless for training a real adapter"
)


@dataclass(frozen=True)
class EncoderInfo:
    """What a shard manifest records about the face encoder."""

    variant: str
    config: dict
    weights: str | None
    weights_sha256: str | None
    random: bool

    def to_dict(self) -> dict:
        return asdict(self)


def load_encoder(variant: str, weights: str | Path | None, allow_random: bool) -> tuple[TransFaceEncoder, EncoderInfo]:
    """The TransFace encoder of a build or a generator: official weights, or (explicitly) seeded random weights.

    Raises FileNotFoundError / ValueError with a message meant for the user.
    """
    cfg = transface_config(variant)
    if weights is not None:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(f"TransFace weights not found: {weights} (e.g. ms1mv2_model_TransFace_S.pt)")
        model = load_transface(weights, **cfg.to_dict())
        return model, EncoderInfo(variant, model.config.to_dict(), str(weights), sha256_file(weights), False)
    if not allow_random:
        raise ValueError(
            "no TransFace weights given: pass --encoder-weights path/to/ms1mv2_model_TransFace_S.pt "
            "(the official file), or --random-encoder to use seeded random weights (tests and demos only)")
    log.warning(RANDOM_ENCODER_WARNING)
    model = build_transface(variant, seed=RANDOM_ENCODER_SEED)
    return model.eval(), EncoderInfo(variant, cfg.to_dict(), None, None, True)


# -- FACT adapter ----------------------------------------------------------------------------------------
def official_to_native(state: dict[str, torch.Tensor], adapter: FaceAdapter) -> tuple[dict, dict, list[str]]:
    """Splits an official state dict into (adapter state dict, {block path: moved norm2 state}, ignored keys).

    Ignored: keys outside ``local_fac_prj.`` and the attn2 processors of ``adapter``'s blocks.
    """
    native, norms, ignored = {}, {}, []
    by_prefix = {site.official_processor + ".": site for site in adapter.sites}
    for key, value in state.items():
        if key.startswith(PROJECTION_PREFIX):
            native["projection." + key[len(PROJECTION_PREFIX) :]] = value
            continue
        prefix = key[: key.find(PROCESSOR_INFIX) + len(PROCESSOR_INFIX)] if PROCESSOR_INFIX in key else None
        site = by_prefix.get(prefix)
        if site is None:
            ignored.append(key)
            continue
        param = key[len(prefix) :]
        if param.startswith(MOVED_NORM):
            norms.setdefault(site.path, {})[param[len(MOVED_NORM) :]] = value
        else:
            native[f"blocks.{site.key}.{param}"] = value
    return native, norms, ignored


def load_fact_checkpoint(path: str | Path, unet: nn.Module, dim_head: int = 64) -> FaceAdapter:
    """Reads an official FACT checkpoint, attaches its adapters to ``unet`` and returns the adapter.

    The projection's sizes are inferred from the file (its heads are ``dim_head`` wide, 64 officially);
    every block of ``unet`` must be in the file, with the right shapes. Other keys are ignored with a
    warning, as the official loader ignores them. As the official code does, the stored ``ln`` (the
    block's norm2) replaces the UNet's norm2; the adapter remembers the file's values at the file's precision
    and exports those, even if the UNet runs in lower precision.
    """
    config, state = read_fact_checkpoint(path, dim_head)
    adapter = FaceAdapter(transformer_block_sites(unet), config)
    load_fact_state(adapter, unet, state, path)
    adapter.attach(unet)
    return adapter.eval()


def read_fact_checkpoint(path: str | Path, dim_head: int = 64) -> tuple[ResamplerConfig, dict[str, torch.Tensor]]:
    """(the projection's sizes inferred from the file, with heads ``dim_head`` wide; the file's flat state dict)."""
    state = _read_torch_file(path, "FACT checkpoint")
    projection_state = {k[len(PROJECTION_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTION_PREFIX)}
    if not projection_state:
        raise ValueError(f"FACT checkpoint {path} has no '{PROJECTION_PREFIX}*' keys (the face projection)")
    return PerceiverResampler.config_from_state_dict(projection_state, dim_head), state


def official_processors(state: dict[str, torch.Tensor]) -> set[str]:
    """The attn2 processor names (``<block>.attn2.processor``) an official state dict holds weights for."""
    return {key[: key.find(PROCESSOR_INFIX) + len(PROCESSOR_INFIX) - 1] for key in state if PROCESSOR_INFIX in key}


def load_fact_state(adapter: FaceAdapter, unet: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Loads an official state dict into ``adapter`` (attached to ``unet`` or not) and, as the official code
    does, its moved norms (``ln``) into ``unet``'s norm2; the adapter remembers them at the file's precision."""
    native, norms, ignored = official_to_native(state, adapter)
    try:
        result = adapter.load_state_dict(native, strict=False)
    except RuntimeError as err:
        raise ValueError(f"FACT checkpoint {path} does not fit this UNet: {err}") from err
    ignored += [_native_to_official_key(k, adapter) for k in result.unexpected_keys]
    norms, missing_norms, extra_norms = _select_moved_norms(f"FACT checkpoint {path}", unet, adapter, norms)
    _check_keys(f"FACT checkpoint {path}", list(result.missing_keys) + missing_norms, [])
    ignored += extra_norms
    if ignored:
        log.warning("FACT checkpoint %s: ignoring %d key(s) the adapter does not use: %s%s", path, len(ignored),
                    sorted(ignored)[:5], " ..." if len(ignored) > 5 else "")
    _restore_moved_norms(unet, norms)
    for block_path, norm_state in norms.items():
        adapter.remember_base_norm2(block_path, norm_state)


def _select_moved_norms(name: str, unet: nn.Module, adapter: FaceAdapter, norms: dict) -> tuple[dict, list[str], list[str]]:
    """(the ``ln`` weight and bias of every block, checked against its norm2's shapes; missing keys; extra keys)."""
    selected, missing, extra = {}, [], []
    for site in adapter.sites:
        found, norm2 = norms.get(site.path, {}), unet.get_submodule(site.path).norm2
        prefix = f"{site.official_processor}.{MOVED_NORM}"
        extra += [prefix + k for k in found if k not in ("weight", "bias")]
        missing += [prefix + k for k in ("weight", "bias") if k not in found]
        for k in ("weight", "bias"):
            if k in found and found[k].shape != getattr(norm2, k).shape:
                raise ValueError(f"{name} does not fit this UNet: {prefix}{k} has shape {tuple(found[k].shape)}, "
                                 f"the block's norm2 {tuple(getattr(norm2, k).shape)}")
        selected[site.path] = {k: found[k] for k in ("weight", "bias") if k in found}
    return selected, missing, extra


def _native_to_official_key(key: str, adapter: FaceAdapter) -> str:
    if key.startswith("projection."):
        return PROJECTION_PREFIX + key.removeprefix("projection.")
    for site in adapter.sites:
        if key.startswith(f"blocks.{site.key}."):
            return f"{site.official_processor}.{key.removeprefix(f'blocks.{site.key}.')}"
    return key


def _restore_moved_norms(unet: nn.Module, norms: dict[str, dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for path, norm_state in norms.items():
            norm2 = unet.get_submodule(path).norm2
            drift = max((norm2.state_dict()[k].float() - v.float()).abs().max().item() for k, v in norm_state.items())
            if drift > 1e-6:
                log.warning("%s.norm2 differs from the checkpoint's ln by %.3g; using the checkpoint's", path, drift)
            norm2.load_state_dict({k: v.to(norm2.weight) for k, v in norm_state.items()})


def native_to_official(adapter: FaceAdapter) -> dict[str, torch.Tensor]:
    """The official key layout of an attached adapter.

    The moved norms (``ln``) are the base's norm2 at its original precision (``FaceAdapter.base_norm2_state``):
    a float32 base cast to bf16 after attaching still exports its float32 values; a base loaded in bf16
    exports bf16 values (bf16 is its original precision).
    """
    if not adapter.attached_blocks:
        raise ValueError("the adapter must be attached to its UNet to export the official format (it stores norm2)")
    out = {PROJECTION_PREFIX + k: v for k, v in adapter.projection.state_dict().items()}
    for site in adapter.sites:
        prefix = site.official_processor + "."
        block_state = adapter.blocks[site.key].state_dict()
        for gate in ("alpha_attn", "alpha_dense"):  # the release stores its gates as 0-d scalars
            block_state[gate] = block_state[gate].reshape(())
        out.update({prefix + k: v for k, v in block_state.items()})
        out.update({prefix + MOVED_NORM + k: v for k, v in adapter.base_norm2_state(site.path).items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def export_fact_checkpoint(adapter: FaceAdapter, path: str | Path) -> Path:
    """Writes an attached adapter in the official FACT format (a torch file the official code loads)."""
    path = Path(path)
    if adapter.projection.config.dim_head != 64:
        log.warning("the official format does not store the projection's head split: load %s with dim_head=%d",
                    path, adapter.projection.config.dim_head)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:  # through a file object: a failed write surfaces as its OSError (a full disk)
        torch.save(native_to_official(adapter), f)
    return path
