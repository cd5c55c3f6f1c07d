"""Each checkpoint also writes the adapter alone: our safetensors with metadata, and the official file at the end.

Every export folder (``step-000200/``, ``final/``) is assembled in a hidden staging folder and renamed into
place whole, so a folder that is there is complete: a kill or a full disk during an export leaves the old
folder or none. After each export the run folder's ``README.md``, a model card (:mod:`.model_card`), is
rewritten atomically to name it. A fit that ends with nothing left to train (a resume at ``max_steps``) still
writes the final export if no complete one of that step is there (the previous run was killed while writing it).
With an :class:`~fact_lightning.callbacks.ema.AdapterEMA` callback each export also holds the averaged weights:
``adapter_ema.safetensors`` (metadata ``ema``: decay, warm-up, updates) and, where the official file is written,
``fact_adapter_ema.bin``.

Every adapter file records its base type (``base_type``: ``sd15`` or ``sdxl``, the run's ``base_spec.base_type``),
which ``fact-generate`` reads to pick the base's loader. The official FACT file format exists for SD1.5 only:
on an SDXL base ``official: auto`` (the default) writes none, and ``final`` or ``always`` is refused at setup,
before training, in one line.

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

from ..base_types import LABELS, SD15
from ..errors import UserError
from ..files import assembled_folder, remove_staging, replace_path, staging_name, write_failure
from ..models.adapter_io import nonfinite_tensors, read_adapter_metadata, save_adapter
from ..models.injection import FaceAdapter
from .ema import averaged_weights, find_ema
from .model_card import CARD_NAME, gather_facts, render_card, write_card

log = logging.getLogger(__name__)

NATIVE_NAME = "adapter.safetensors"
OFFICIAL_NAME = "fact_adapter.bin"
EMA_NATIVE_NAME = "adapter_ema.safetensors"
EMA_OFFICIAL_NAME = "fact_adapter_ema.bin"
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
            of training only), ``always`` (every export), ``never``, or ``auto``: ``final`` on an SD1.5 base,
            ``never`` on SDXL (the official format is SD1.5's alone; ``final``/``always`` there is refused).
        final: export when training ends. If the last checkpoint already exported that step, ``final`` is a
            link to it rather than a second copy.
    """

    def __init__(self, dirpath: str | None = None, dtype: Literal["float16", "bfloat16", "float32"] | None = "float16",
                 official: Literal["auto", "final", "always", "never"] = "auto", final: bool = True):
        self.dirpath = dirpath
        self.dtype = dtype
        self.official = official
        self._official = "final" if official == "auto" else official  # resolved for the run's base at setup
        self.final = final
        self.written: list[Path] = []
        self._folder = Path(dirpath) if dirpath else None
        self._run: Path | None = None  # the run folder: its README.md is the model card
        self._exported: str | None = None  # this process's latest export (a step's top-k and last save: one)
        self._ema = False  # the trainer has an AdapterEMA: every export also writes the averaged weights

    def _root(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "adapters"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a refusal comes first, before anything is done; validate exports nothing
            self._official = self._official_for(pl_module.base_spec)
        # trainer.log_dir is a broadcast: every rank must ask for it, so it is asked once here, not on rank 0 later.
        self._run = Path(trainer.log_dir or trainer.default_root_dir)
        self._folder = Path(self.dirpath) if self.dirpath else self._run / "adapters"
        self._ema = find_ema(trainer) is not None
        if trainer.is_global_zero:
            for folder in (self._folder, self._run):  # what an export or a card write killed half-way left
                if folder.is_dir():
                    remove_staging(folder)

    def _official_for(self, spec) -> Literal["final", "always", "never"]:
        """When this run writes the official file: ``auto`` resolved for ``spec``'s base type; an explicit
        ``final``/``always`` on a base the official format does not cover is one error line, before training."""
        base_type = spec.base_type
        if base_type == SD15:
            return "final" if self.official == "auto" else self.official
        if self.official in ("final", "always"):
            raise UserError(f"AdapterExport official={self.official!r}: the official FACT file format exists for SD1.5 "
                            f"only and this run's base {spec.describe()} is {LABELS[base_type]}; set official: never "
                            "(our adapter.safetensors records the base type)")
        return "never"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        name = f"step-{trainer.global_step:06d}"
        if self._exported == name:
            return
        self.export(trainer, pl_module, name, official=self._official == "always")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final:
            self._export_final(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resume at max_steps trains nothing and never reaches on_train_end: the final export is owed when the
        # previous run died writing it. Rank 0 decides (other nodes may not see its disk), all ranks act.
        if not self.final or trainer.global_step == 0:
            return
        missing = trainer.is_global_zero and not self.final_is_complete(trainer.global_step)
        if trainer.strategy.broadcast(missing, src=0):
            self._export_final(trainer, pl_module)

    def final_is_complete(self, step: int) -> bool:
        """Whether ``final/`` holds a complete export of ``step`` (the folder is only ever placed whole)."""
        folder = self._folder / FINAL
        try:
            written = read_adapter_metadata(folder / NATIVE_NAME).get("step")
        except Exception:  # absent, or an older writer's partial file
            return False
        names = [OFFICIAL_NAME] if self._official == "final" else []
        if self._ema:
            names += [EMA_NATIVE_NAME] + ([EMA_OFFICIAL_NAME] if self._official == "final" else [])
        return written == str(step) and all((folder / n).is_file() for n in names)

    def _export_final(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step_folder = self._folder / f"step-{trainer.global_step:06d}"
        if self._official != "final" and (step_folder / NATIVE_NAME).is_file():
            if trainer.is_global_zero:
                _link(step_folder, self._folder / FINAL)
            return
        self.export(trainer, pl_module, FINAL, official=self._official != "never")

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str, official: bool) -> Path | None:
        state = pl_module.full_adapter_state()  # a collective under FSDP: every rank takes part
        ema_state, ema = None, None
        with averaged_weights(trainer, pl_module) as ema:
            if ema is not None:  # the same gather, of the averaged weights (swapped in on every rank); copied,
                # as CPU weights come back as the live tensors themselves, which get the raw weights back
                ema_state = {k: v.clone() for k, v in pl_module.full_adapter_state().items()}
        if not trainer.is_global_zero:
            # Every rank skips the same repeated saves of a step (top-k and last): under FSDP2 the gathers above
            # are collectives, and a rank that gathers again alone waits forever.
            self._exported = name
            return None
        for what, weights in (("adapter", state), ("adapter's EMA", ema_state)):
            bad = nonfinite_tensors(weights or {})
            if bad:
                raise NonFiniteAdapterError(f"the {what} has non-finite weights ({len(bad)} tensors, e.g. {bad[0]}) "
                                            f"at step {trainer.global_step}; nothing was exported")
        folder = (self._folder or self._root(trainer)) / name
        adapter = pl_module.adapter
        if pl_module.device_mesh is not None:  # sharded: write from an unsharded copy
            adapter = _unsharded_copy(pl_module.adapter, state)
        averaged = _unsharded_copy(pl_module.adapter, ema_state) if ema_state is not None else None
        data = getattr(trainer, "datamodule", None)
        manifest = getattr(data, "manifest", None) or {}
        base_type = pl_module.base_spec.base_type
        metadata = {
            "base_model": pl_module.base_spec.describe(),
            "step": str(trainer.global_step),
            "dtype": self.dtype or str(next(adapter.parameters()).dtype).removeprefix("torch."),
            "training_config": json.dumps(dict(pl_module.hparams), default=str),
            "data_encoder": json.dumps(manifest.get("encoder")),
        }
        try:
            with assembled_folder(folder) as staged:
                save_adapter(adapter, staged / NATIVE_NAME, metadata, dtype=_DTYPES.get(self.dtype),
                             base_type=base_type)
                if official:
                    self._write_official(pl_module, adapter, staged / OFFICIAL_NAME)
                if averaged is not None:
                    ema_metadata = {**metadata, "ema": json.dumps({**ema.settings(), "updates": ema.updates})}
                    save_adapter(averaged, staged / EMA_NATIVE_NAME, ema_metadata, dtype=_DTYPES.get(self.dtype),
                                 base_type=base_type)
                    if official:
                        self._write_official(pl_module, averaged, staged / EMA_OFFICIAL_NAME)
        except Exception as exc:
            error = _write_error(exc, f"the adapter export {folder}", "nothing was written there")
            if error is None:
                raise
            raise error from None
        self._exported = name
        self.written.append(folder / NATIVE_NAME)
        if official:
            self.written.append(folder / OFFICIAL_NAME)
        if averaged is not None:
            self.written += [folder / EMA_NATIVE_NAME] + ([folder / EMA_OFFICIAL_NAME] if official else [])
        log.info("exported the adapter to %s", folder)
        run = self._run or Path(trainer.default_root_dir)
        try:
            ema_file = folder / EMA_NATIVE_NAME if averaged is not None else None
            write_card(run, render_card(gather_facts(trainer, pl_module, run, folder / NATIVE_NAME, ema_file)))
        except Exception as exc:
            error = _write_error(exc, f"the model card {run / CARD_NAME}", "the previous card is unchanged")
            if error is None:
                raise
            raise error from None
        return folder / NATIVE_NAME

    @staticmethod
    def _write_official(pl_module: pl.LightningModule, adapter: FaceAdapter, path: Path) -> None:
        from ..interop.official import export_fact_checkpoint

        swapped = adapter is not pl_module.adapter
        if swapped:  # attach the copy in the original's place for the moved norms
            pl_module.adapter.detach()
            adapter.attach(pl_module.unet)
        try:
            export_fact_checkpoint(adapter, path)
        finally:
            if swapped:
                adapter.detach()
                pl_module.adapter.attach(pl_module.unet)


def _unsharded_copy(adapter: FaceAdapter, state: dict[str, torch.Tensor]) -> FaceAdapter:
    """A plain (unsharded, CPU) adapter of ``adapter``'s layout holding ``state``, in the state's dtype (exact)."""
    copy = FaceAdapter(adapter.sites, adapter.projection.config).to(next(iter(state.values())).dtype)
    copy.load_state_dict(state, strict=True)
    return copy


def _write_error(exc: BaseException, what: str, outcome: str) -> UserError | None:
    """One line for a write that failed on the disk (full, read-only ...); None for any other error."""
    failure = write_failure(exc)
    return None if failure is None else UserError(f"cannot write {what}: {failure.strerror or failure}; {outcome}")


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` as a relative symlink (a copy where the filesystem has none), put in place whole."""
    staged = staging_name(link)
    try:
        os.symlink(os.path.relpath(target, link.parent), staged, target_is_directory=True)
    except OSError:
        shutil.copytree(target, staged)
    replace_path(staged, link)
