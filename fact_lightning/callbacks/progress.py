"""A progress bar in optimizer steps (a FACT run is sized by ``max_steps`` over a stream, not by epochs) that
reads the logged values only at logging steps, so it adds no host synchronisation to the other steps."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Rich's bar, counting ``global_step`` up to ``max_steps`` (Lightning's shows "Epoch 0/-2" for a step-sized run)."""

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "train steps"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:  # a mid-epoch resume
            self._initialize_train_progress_bar_id()
        stepped = trainer.max_steps and trainer.max_steps > 0
        self._update(self.train_progress_bar_id, trainer.global_step if stepped else batch_idx + 1)
        # Reading logged tensors is a host sync on a GPU: the shown loss is refreshed at logging steps only.
        if trainer._logger_connector.should_update_logs:
            self._update_metrics(trainer, pl_module)
        self.refresh()
