"""Which base model a generator runs on, SD1.5 or SDXL, and the adapter files that fit it.

The base type is read from the base model's own parts (an :class:`SDXLBaseModel` has a second text encoder and
the text-time embedding) and, for an adapter, from its file: our exports record it under ``BASE_TYPE_KEY``;
the official FACT torch file is SD1.5's (the only base the authors released adapters for). An adapter for
another base type is one ``ValueError`` before any weight loads; an adapter file without the key (written
before it existed) is checked by its sites, which ``load_adapter`` compares with the UNet's blocks.
"""

from __future__ import annotations

from pathlib import Path

from fact_lightning.base_types import BASE_TYPE_KEY, BASE_TYPES, LABELS, SD15, SDXL
# Each base's own sampler when the caller names none: SD1.5's scheduler_config.json (PNDM, which the official
# FACT apps sample with) and SDXL base 1.0's (Euler).
OWN_SCHEDULER = {SD15: "pndm", SDXL: "euler"}


def base_type(base) -> str:
    """``"sdxl"`` for an :class:`SDXLBaseModel`, ``"sd15"`` for an SD1.5-style ``BaseModel``."""
    from fact_lightning.models.sdxl_base import SDXLBaseModel

    return SDXL if isinstance(base, SDXLBaseModel) else SD15


def adapter_base_type(path: str | Path) -> str | None:
    """The base type an adapter file was made for: its recorded ``base_type`` (our ``.safetensors``), SD1.5 for
    the official FACT file, None for one of ours written before the key existed."""
    from fact_lightning.models.adapter_io import read_adapter_metadata

    path = Path(path)
    if path.suffix != ".safetensors":
        return SD15
    try:
        recorded = read_adapter_metadata(path).get(BASE_TYPE_KEY)
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    if recorded is not None and recorded not in BASE_TYPES:
        raise ValueError(f"{path} records base type {recorded!r}; this fact-lightning knows {', '.join(BASE_TYPES)}")
    return recorded


def load_adapter_for(base, path: str | Path):
    """Loads the adapter file ``path`` attached to ``base``'s UNet, refusing one made for another base type.

    One ``ValueError`` names both types when the file records its own (or is the official SD1.5 format);
    otherwise ``load_adapter`` refuses sites that ``base``'s UNet does not have, with their count and a path.
    """
    from fact_lightning.models.adapter_io import load_adapter

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    made_for, running = adapter_base_type(path), base_type(base)
    if made_for is not None and made_for != running:
        kind = "the official FACT format" if path.suffix != ".safetensors" else "its metadata"
        raise ValueError(f"adapter {path} is for {LABELS[made_for]} ({kind} says so) but the base model is "
                         f"{LABELS[running]}: give a {LABELS[running]} adapter or a {LABELS[made_for]} base model")
    return load_adapter(path, base.unet)
