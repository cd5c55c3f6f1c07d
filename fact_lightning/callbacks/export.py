"""Each checkpoint also writes the adapter alone: our safetensors with metadata, and the official file at the end.

Sizes at SD1.5 scale (255.5M trainable parameters): an adapter file is 511 MB in float16 (1.02 GB in float32);
a full training checkpoint (float32 weights + Adam's two moments) is about 3.07 GB, so keep only the last few
(``ModelCheckpoint(save_top_k=K, monitor="step", mode="max")``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch

from ..models.adapter_io import nonfinite_tensors, save_adapter
from ..errors import UserError
from ..models.injection import FaceAdapter

log = logging.getLogger(__name__)

NATIVE_NAME = "adapter.safetensors"
OFFICIAL_NAME = "fact_adapter.bin"
FINAL = "final"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class NonFiniteAdapterError(UserError):
    """The adapter holds NaN or infinite weights: it is not written."""


class AdapterExport(pl.Callback):
    """Writes ``<dirpath>/step-000200/adapter.safetensors`` at every checkpoint and ``<dirpath>/final/`` at the end.

    Args:
        dirpath: where to write; default ``<run folder>/adapters``.
        dtype: the exported weights' dtype (float16 halves the files; training keeps its own precision); None
            writes them in the training dtype.
        official: when to also write the official FACT torch file (``fact_adapter.bin``): ``final`` (the end
            of training only), ``always`` (every export) or ``never``.
        final: export when training ends. If the last checkpoint already exported that step, ``final`` is a
            link to it rather than a second copy.
    """

    def __init__(self, dirpath: str | None = None, dtype: Literal["float16", "bfloat16", "float32"] | None = "float16",
                 official: Literal["final", "always", "never"] = "final", final: bool = True):
        self.dirpath = dirpath
        self.dtype = dtype
        self.official = official
        self.final = final
        self.written: list[Path] = []
        self._folder = Path(dirpath) if dirpath else None

    def _root(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "adapters"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # trainer.log_dir is a broadcast: every rank must ask for it, so it is asked once here, not on rank 0 later.
        self._folder = self._root(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.export(trainer, pl_module, f"step-{trainer.global_step:06d}", official=self.official == "always")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.final:
            return
        step_folder = self._folder / f"step-{trainer.global_step:06d}"
        if self.official != "final" and (step_folder / NATIVE_NAME).is_file():
            if trainer.is_global_zero:
                _link_or_copy(step_folder, self._folder / FINAL)
            return
        self.export(trainer, pl_module, FINAL, official=self.official != "never")

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, official: bool) -> Path | None:
        state = pl_module.full_adapter_state()  # a collective under FSDP: every rank takes part
        if not trainer.is_global_zero:
            return None
        bad = nonfinite_tensors(state)
        if bad:
            raise NonFiniteAdapterError(f"the adapter has non-finite weights ({len(bad)} tensors, e.g. {bad[0]}) at "
                                        f"step {trainer.global_step}; nothing was exported")
        folder = (self._folder or self._root(trainer)) / name
        adapter, swapped = pl_module.adapter, False
        if pl_module.device_mesh is not None:  # sharded: write from an unsharded copy
            adapter = FaceAdapter(pl_module.adapter.sites, pl_module.adapter.projection.config)
            adapter.load_state_dict(state, strict=True)
        data = getattr(trainer, "datamodule", None)
        manifest = getattr(data, "manifest", None) or {}
        metadata = {
            "base_model": pl_module.base_spec.describe(),
            "step": str(trainer.global_step),
            "dtype": self.dtype or str(next(adapter.parameters()).dtype).removeprefix("torch."),
            "training_config": json.dumps(dict(pl_module.hparams), default=str),
            "data_encoder": json.dumps(manifest.get("encoder")),
        }
        path = save_adapter(adapter, folder / NATIVE_NAME, metadata, dtype=_DTYPES.get(self.dtype))
        self.written.append(path)
        if official:
            from ..interop.official import export_fact_checkpoint

            if adapter is not pl_module.adapter:  # attach the copy in the original's place for the moved norms
                pl_module.adapter.detach()
                adapter.attach(pl_module.unet)
                swapped = True
            try:
                self.written.append(export_fact_checkpoint(adapter, folder / OFFICIAL_NAME))
            finally:
                if swapped:
                    adapter.detach()
                    pl_module.adapter.attach(pl_module.unet)
        log.info("exported the adapter to %s", folder)
        return path


def _link_or_copy(target: Path, link: Path) -> None:
    """``link`` -> ``target`` as a relative symlink (a copy where the filesystem has none)."""
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    try:
        os.symlink(os.path.relpath(target, link.parent), link, target_is_directory=True)
    except OSError:
        shutil.copytree(target, link)
