"""Training progress in optimizer steps (a FACT run is sized by ``max_steps`` over a stream, not by epochs).

On a terminal, rich's bar, which reads the logged values only at logging steps, so that it adds no host
synchronisation to the other steps. Anywhere else (a log file, as on a cluster), where rich would show
nothing until the end, plain lines on stderr (``commands.console.ProgressLines``): the step of ``max_steps``,
rate, ETA and the loss, the first after the first step, then one every ``interval`` seconds (default
``$FACT_PROGRESS_INTERVAL``, else 30), each read of the loss a host sync at that line only.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from rich.console import Console

from ..commands.console import ProgressLines


class StepProgressBar(RichProgressBar):
    """Rich's bar, counting ``global_step`` up to ``max_steps`` (Lightning's shows "Epoch 0/-2" for a step-sized
    run), or plain progress lines when its console is not a terminal.

    Args:
        interval: seconds between plain progress lines; None: ``$FACT_PROGRESS_INTERVAL`` or 30.
        refresh_rate, leave, theme, console_kwargs: ``RichProgressBar``'s (theme None: its default).
    """

    def __init__(self, interval: float | None = None, refresh_rate: int = 100, leave: bool = False,
                 theme: RichProgressBarTheme | None = None, console_kwargs: dict[str, Any] | None = None):
        super().__init__(refresh_rate=refresh_rate, leave=leave, theme=theme or RichProgressBarTheme(),
                         console_kwargs=console_kwargs)
        if interval is not None and not interval >= 0:
            raise ValueError(f"interval must be a number of seconds >= 0, got {interval}")
        self.interval = interval
        self.plain = False
        self._lines: ProgressLines | None = None

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "train steps"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Where rich would draw nothing until the end (its console is no terminal): plain lines instead.
        self.plain = trainer.is_global_zero and not Console(**self._console_kwargs).is_interactive
        if self.plain:
            self.disable()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.plain:
            return super().on_train_start(trainer, pl_module)
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._lines = ProgressLines("step", max_steps, unit="step", start=trainer.global_step, interval=self.interval)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._lines is not None:
            if self._lines.due(trainer.global_step):  # the loss is read (a host sync) only for a line
                self._lines.write(trainer.global_step, **self._shown(trainer, pl_module))
            return
        if not self.is_disabled and self.train_progress_bar_id is None:  # a mid-epoch resume
            self._initialize_train_progress_bar_id()
        stepped = trainer.max_steps and trainer.max_steps > 0
        self._update(self.train_progress_bar_id, trainer.global_step if stepped else batch_idx + 1)
        # Reading logged tensors is a host sync on a GPU: the shown loss is refreshed at logging steps only.
        if trainer._logger_connector.should_update_logs:
            self._update_metrics(trainer, pl_module)
        self.refresh()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._lines is not None:
            self._lines.finish(trainer.global_step, **self._shown(trainer, pl_module))
            self._lines = None
        super().on_train_end(trainer, pl_module)

    def _shown(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The progress-bar values (``train/loss``), as floats."""
        metrics = self.get_metrics(trainer, pl_module)
        return {k: float(v) for k, v in metrics.items() if k != "v_num" and isinstance(v, (int, float))}
