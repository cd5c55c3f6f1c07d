"""Each checkpoint also writes the adapter alone: our safetensors with metadata, optionally the official file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl

from ..adapter_io import save_adapter
from ..models.injection import FaceAdapter

log = logging.getLogger(__name__)

NATIVE_NAME = "adapter.safetensors"
OFFICIAL_NAME = "fact_adapter.bin"


class AdapterExport(pl.Callback):
    """Writes ``<dirpath>/step-000200/adapter.safetensors`` at every checkpoint and ``<dirpath>/final/`` at the end.

    Args:
        dirpath: where to write; default ``<log dir or default_root_dir>/adapters``.
        official: also write the official FACT torch file (``fact_adapter.bin``) beside it.
        final: export when training ends, with or without a checkpoint then.
    """

    def __init__(self, dirpath: str | None = None, official: bool = False, final: bool = True):
        self.dirpath = dirpath
        self.official = official
        self.final = final
        self.written: list[Path] = []

    def _root(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "adapters"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.export(trainer, pl_module, f"step-{trainer.global_step:06d}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final:
            self.export(trainer, pl_module, "final")

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Path | None:
        state = pl_module.full_adapter_state()  # a collective under FSDP: every rank takes part
        if not trainer.is_global_zero:
            return None
        folder = self._root(trainer) / name
        adapter, swapped = pl_module.adapter, False
        if pl_module.device_mesh is not None:  # sharded: write from an unsharded copy
            adapter = FaceAdapter(pl_module.adapter.sites, pl_module.adapter.projection.config)
            adapter.load_state_dict(state, strict=True)
        data = getattr(trainer, "datamodule", None)
        manifest = getattr(data, "manifest", None) or {}
        metadata = {
            "base_model": pl_module.base_spec.describe(),
            "step": str(trainer.global_step),
            "training_config": json.dumps(dict(pl_module.hparams), default=str),
            "data_encoder": json.dumps(manifest.get("encoder")),
        }
        path = save_adapter(adapter, folder / NATIVE_NAME, metadata)
        self.written.append(path)
        if self.official:
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
