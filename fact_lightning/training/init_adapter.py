"""``model.init_adapter``: start a run from released weights (an official FACT file or one of our exports).

The file is checked against the model built from the config before anything is loaded: every projection size
(``token_dim`` is the face encoder's token width) and the list of adapted UNet blocks. A mismatch is one
:class:`UserError` naming the file and each field that differs (file value vs model value). This is not a
resume: only the adapter's weights come from the file; the optimizer, the step and the curriculum start fresh.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..interop.official import load_fact_state, official_processors, read_fact_checkpoint
from ..models.adapter_io import check_finite, read_adapter_state
from ..models.injection import FaceAdapter
from ..models.resampler import ResamplerConfig

log = logging.getLogger(__name__)

OPTION = "model.init_adapter"
NATIVE_SUFFIX = ".safetensors"  # ours; anything else is read as the official torch file (.ckpt, .bin)


def check_init_adapter(path: str | Path, projection: ResamplerConfig) -> None:
    """The checks that need no model: the file exists, reads, and its projection has ``projection``'s sizes.

    ``fact-train`` runs them before anything is written; :func:`load_init_adapter` repeats them and adds
    the block list and the weights' finiteness, which need the built UNet and the tensors.
    """
    path = _existing(path)
    with _one_line(path):
        config, _, _ = _read(path, projection.dim_head)
        _refuse(path, _projection_differences(config, projection))


def load_init_adapter(path: str | Path, adapter: FaceAdapter, unet: nn.Module) -> None:
    """Loads the file ``path`` into ``adapter`` (attached to ``unet``), in place, at the adapter's dtype.

    An official file also carries each block's ``ln``: the official code moves the block's norm2 into its
    processor and loads the stored one in its place, so, as its loader does, the file's ``ln`` replaces the
    training UNet's (frozen) norm2 here too; the adapter trains and exports against those norms.
    """
    path = _existing(path)
    with _one_line(path):
        config, sites, state = _read(path, adapter.projection.config.dim_head)
        native = path.suffix == NATIVE_SUFFIX
        differences = _projection_differences(config, adapter.projection.config)
        model_sites = [s.path for s in adapter.sites]
        if native:  # ours: the whole layout, widths included
            if [s.path for s in sites] != model_sites:
                differences.append(_sites_difference([s.path for s in sites], model_sites))
            else:
                differences += [f"site {f.path} {f} (file) vs {m} (model)" for f, m in zip(sites, adapter.sites)
                                if f != m]
        elif not set(model_sites) <= set(sites):  # official: extra blocks are ignored, as its loader does
            differences.append(_sites_difference(sites, model_sites))
        _refuse(path, differences)
        check_finite(state, path)
        if native:
            adapter.load_state_dict(state, strict=True)  # copies into the adapter's tensors, at its dtype
        else:
            load_fact_state(adapter, unet, state, path)
    log.info("%s: adapter weights loaded from %s (optimizer, step and curriculum start fresh)", OPTION, path)


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{OPTION} {path} does not exist")
    return path


@contextlib.contextmanager
def _one_line(path: Path) -> Iterator[None]:
    """A reader's or loader's error (an unreadable file, non-finite weights, a shape the checks let through)
    as one :class:`UserError` naming the option and the file."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, RuntimeError) as err:
        message = " ".join(str(err).split())
        raise UserError(message if str(path) in message else f"{OPTION} {path}: {message}") from None


def _read(path: Path, dim_head: int) -> tuple[ResamplerConfig, list, dict[str, torch.Tensor]]:
    """(projection sizes, block sites: ours as ``BlockSite``s, an official file's as block paths, state dict).

    An official file does not store the head split: ``dim_head`` (the model's) decides it."""
    if path.suffix == NATIVE_SUFFIX:
        sites, config, state = read_adapter_state(path)
        return config, sites, state
    config, state = read_fact_checkpoint(path, dim_head)
    return config, sorted(p.removesuffix(".attn2.processor") for p in official_processors(state)), state


def _projection_differences(file: ResamplerConfig, model: ResamplerConfig) -> list[str]:
    ours, theirs = model.to_dict(), file.to_dict()
    return [f"projection.{k} {theirs[k]} (file) vs {ours[k]} (model)" for k in ours if theirs[k] != ours[k]]


def _sites_difference(file: list[str], model: list[str]) -> str:
    missing, extra = sorted(set(model) - set(file)), sorted(set(file) - set(model))
    return (f"sites: {len(file)} blocks (file) vs {len(model)} (model), missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}, extra {extra[:3]}{' ...' if len(extra) > 3 else ''}")


def _refuse(path: Path, differences: list[str]) -> None:
    if differences:
        raise UserError(f"{OPTION} {path} does not fit this model: {'; '.join(differences)}")
