"""Our own adapter file: safetensors with versioned metadata, plus one loader for ours and the official format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..base_types import BASE_TYPE_KEY, BASE_TYPES
from .injection import FaceAdapter
from .resampler import ResamplerConfig
from .unet_layout import BlockSite, transformer_block_sites

FORMAT_NAME = "fact-lightning-adapter"
FORMAT_VERSION = 1


def save_adapter(adapter: FaceAdapter, path: str | Path, metadata: dict | None = None,
                 dtype: torch.dtype | None = None, *, base_type: str | None = None) -> Path:
    """Writes the adapter's weights (projection + every block) as safetensors, atomically.

    ``metadata`` (base model, step, training config, ...) is stored as JSON strings beside the format
    version, the projection sizes and the block layout, so the file is self-describing. ``dtype`` casts the
    written weights (float16 halves the file); loading casts them back to the adapter's dtype.
    ``base_type`` ("sd15" or "sdxl") is recorded under ``base_type``, so that inference picks the base model's
    loader from the adapter file (``inference.bases.adapter_base_type``); a file without it (older exports) runs
    on the base model's layout, SD1.5 when that does not tell.
    """
    from safetensors.torch import save_file


    if base_type is not None and base_type not in BASE_TYPES:
        raise ValueError(f"base_type must be one of {', '.join(BASE_TYPES)}, got {base_type!r}")
    recorded = (metadata or {}).get(BASE_TYPE_KEY)
    if base_type is not None and recorded is not None and recorded != base_type:
        raise ValueError(f"metadata says {BASE_TYPE_KEY}={recorded!r} but base_type={base_type!r} was given")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "projection": json.dumps(adapter.projection.config.to_dict()),
        "sites": json.dumps([site.__dict__ for site in adapter.sites]),
    }
    header.update({k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()})
    if base_type is not None:
        header[BASE_TYPE_KEY] = base_type
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in adapter.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def read_adapter_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors of a state dict that hold NaN or infinite values."""
    return [name for name, value in state.items() if not torch.isfinite(value).all()]


def check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuses an adapter with NaN or infinite weights: it would only ever produce black images."""
    bad = nonfinite_tensors(state)
    if bad:
        raise ValueError(f"adapter file {path} has non-finite (NaN or infinite) weights in {len(bad)} tensors, "
                         f"e.g. {bad[0]}: the training run that wrote it diverged")


def load_adapter(path: str | Path, unet: nn.Module | None = None) -> FaceAdapter:
    """Loads an adapter file, ours (``.safetensors``) or the official FACT torch file, strictly.

    With ``unet`` the adapter is attached to it (which must have the layout the adapter was trained on).
    The official format needs ``unet`` (its block layout is only implied by key names). An adapter with
    non-finite weights is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    if path.suffix != ".safetensors":
        if unet is None:
            raise ValueError("loading an official FACT checkpoint needs the UNet to attach to")
        from ..interop.official import load_fact_checkpoint

        adapter = load_fact_checkpoint(path, unet)
        try:
            check_finite(adapter.state_dict(), path)
        except ValueError:
            adapter.detach()
            raise
        return adapter

    sites, config, state = read_adapter_state(path)
    adapter = FaceAdapter(sites, config)
    result = adapter.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: missing keys {result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]}")
    check_finite(state, path)
    if unet is not None:
        # An adapter may cover some of the UNet's blocks (SDXL's one-per-stack choice): each of its sites must be
        # there, with the same widths.
        found = {site.path: site for site in transformer_block_sites(unet)}
        differing = [site.path for site in sites if found.get(site.path) != site]
        if differing:
            raise ValueError(f"{path} was trained for another UNet layout ({len(sites)} adapted blocks; "
                             f"{len(differing)} missing or of other widths in the one given, e.g. {differing[0]})")
        adapter.attach(unet)
    return adapter.eval()


def read_adapter_state(path: str | Path) -> tuple[list[BlockSite], ResamplerConfig, dict[str, torch.Tensor]]:
    """(block sites, projection sizes, state dict at the file's dtype) of one of our ``.safetensors`` files,
    its format and version checked; the weights are not checked for finiteness here."""
    from safetensors.torch import load_file

    try:
        meta = read_adapter_metadata(path)
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a {FORMAT_NAME} file (format={meta.get('format')!r})")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version}; this fact-lightning reads up to {FORMAT_VERSION}")
    sites = [BlockSite(**s) for s in json.loads(meta["sites"])]
    return sites, ResamplerConfig(**json.loads(meta["projection"])), state
