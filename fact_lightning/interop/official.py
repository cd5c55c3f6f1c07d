"""Explicit key maps to and from the official FACT and TransFace files (modelscope/facechain ``face_adapter``).

Official FACT checkpoint (one torch pickle of tensors):
    ``<block>.attn2.processor.<param>``  for each adapted transformer block, <param> one of the SFAGS weights
                                         (same names as ours) or ``ln.*``: the block's own norm2, which the
                                         official code moves into its processor;
    ``local_fac_prj.<param>``            the perceiver resampler, same names as ours.
Official TransFace file: a plain state dict of its VisionTransformer, same names as ``TransFaceEncoder``.
Both are pickles: always read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..files import sha256_file
from ..models.face_encoder import TransFaceConfig, TransFaceEncoder, build_transface, transface_config
from ..models.injection import FaceAdapter
from ..models.resampler import PerceiverResampler
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
def official_to_native(state: dict[str, torch.Tensor], adapter: FaceAdapter) -> tuple[dict, dict]:
    """Splits an official state dict into (adapter state dict, {block path: moved norm2 state})."""
    native, norms = {}, {}
    by_prefix = {site.official_processor + ".": site for site in adapter.sites}
    for key, value in state.items():
        if key.startswith(PROJECTION_PREFIX):
            native["projection." + key[len(PROJECTION_PREFIX) :]] = value
            continue
        prefix = key[: key.find(PROCESSOR_INFIX) + len(PROCESSOR_INFIX)] if PROCESSOR_INFIX in key else None
        site = by_prefix.get(prefix)
        if site is None:
            native["<unexpected>" + key] = value
            continue
        param = key[len(prefix) :]
        if param.startswith(MOVED_NORM):
            norms.setdefault(site.path, {})[param[len(MOVED_NORM) :]] = value
        else:
            native[f"blocks.{site.key}.{param}"] = value
    return native, norms


def load_fact_checkpoint(path: str | Path, unet: nn.Module, dim_head: int = 64) -> FaceAdapter:
    """Reads an official FACT checkpoint, attaches its adapters to ``unet`` and returns the adapter.

    The projection's sizes are inferred from the file (its heads are ``dim_head`` wide, 64 officially);
    the blocks must be exactly those of ``unet``.
    As the official code does, the stored ``ln`` (the block's norm2) replaces the UNet's norm2.
    """
    state = _read_torch_file(path, "FACT checkpoint")
    projection_state = {k[len(PROJECTION_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTION_PREFIX)}
    if not projection_state:
        raise ValueError(f"FACT checkpoint {path} has no '{PROJECTION_PREFIX}*' keys (the face projection)")
    adapter = FaceAdapter(transformer_block_sites(unet), PerceiverResampler.config_from_state_dict(projection_state, dim_head))
    native, norms = official_to_native(state, adapter)
    unexpected = [k.removeprefix("<unexpected>") for k in native if k.startswith("<unexpected>")]
    native = {k: v for k, v in native.items() if not k.startswith("<unexpected>")}
    try:
        result = adapter.load_state_dict(native, strict=False)
    except RuntimeError as err:
        raise ValueError(f"FACT checkpoint {path} does not fit this UNet: {err}") from err
    missing = list(result.missing_keys) + [
        f"{s.official_processor}.{MOVED_NORM}*" for s in adapter.sites if set(norms.get(s.path, {})) != {"weight", "bias"}
    ]
    _check_keys(f"FACT checkpoint {path}", missing, unexpected + list(result.unexpected_keys))
    _restore_moved_norms(unet, norms)
    adapter.attach(unet)
    return adapter.eval()


def _restore_moved_norms(unet: nn.Module, norms: dict[str, dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for path, norm_state in norms.items():
            norm2 = unet.get_submodule(path).norm2
            drift = max((norm2.state_dict()[k].float() - v.float()).abs().max().item() for k, v in norm_state.items())
            if drift > 1e-6:
                log.warning("%s.norm2 differs from the checkpoint's ln by %.3g; using the checkpoint's", path, drift)
            norm2.load_state_dict({k: v.to(norm2.weight) for k, v in norm_state.items()})


def native_to_official(adapter: FaceAdapter) -> dict[str, torch.Tensor]:
    """The official key layout of an attached adapter (the moved norms are read from its UNet)."""
    if not adapter.attached_blocks:
        raise ValueError("the adapter must be attached to its UNet to export the official format (it stores norm2)")
    out = {PROJECTION_PREFIX + k: v for k, v in adapter.projection.state_dict().items()}
    for site, block in zip(adapter.sites, adapter.attached_blocks, strict=True):
        prefix = site.official_processor + "."
        block_state = adapter.blocks[site.key].state_dict()
        for gate in ("alpha_attn", "alpha_dense"):  # the release stores its gates as 0-d scalars
            block_state[gate] = block_state[gate].reshape(())
        out.update({prefix + k: v for k, v in block_state.items()})
        out.update({prefix + MOVED_NORM + k: v for k, v in block.norm2.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def export_fact_checkpoint(adapter: FaceAdapter, path: str | Path) -> Path:
    """Writes an attached adapter in the official FACT format (a torch file the official code loads)."""
    path = Path(path)
    if adapter.projection.config.dim_head != 64:
        log.warning("the official format does not store the projection's head split: load %s with dim_head=%d",
                    path, adapter.projection.config.dim_head)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(native_to_official(adapter), tmp)
    tmp.replace(path)
    return path
