"""A TensorBoard custom-scalars layout: FAIR and gate values grouped by UNet depth."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger


def scalars_layout(depths: list[str]) -> dict:
    """The ``SummaryWriter.add_custom_scalars`` layout for the module's tags (``fair/<depth>/<block>`` ...)."""
    ordered = list(dict.fromkeys(depths))
    layout = {
        "training": {
            "loss": ["Multiline", ["train/loss", "train/diffusion", "val/loss"]],
            "FAIR total": ["Multiline", ["train/fair_total", "val/fair_total"]],
            "conditions": ["Multiline", ["conditions/.*", "curriculum/p_shuffle"]],
            "throughput": ["Multiline", ["perf/samples_per_sec"]],
        },
    }
    for category, prefix in (("FAIR by depth", "fair"), ("gate tanh(g_attn) by depth", "gate_attn"),
                             ("gate tanh(g_ff) by depth", "gate_ff")):
        layout[category] = {depth: ["Multiline", [f"{prefix}/{depth}/.*"]] for depth in ordered}
    return layout


class TensorBoardLayout(pl.Callback):
    """Writes the custom-scalars layout once, on rank 0, to every TensorBoard logger of the trainer."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not hasattr(pl_module, "depth"):
            return
        layout = scalars_layout(list(pl_module.depth.values()))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(layout)
