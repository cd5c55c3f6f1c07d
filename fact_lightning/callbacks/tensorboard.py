"""A TensorBoard custom-scalars layout: FAIR and gate values grouped by UNet depth, train and val side by side.

The module logs each adapter site under its short name (``gate_attn/down1.a0.b0``, ``models.unet_layout.
site_name``); this layout charts the sites of one depth (``res1_down``: ``unet_layout.depth_tag``) together.
"""

from __future__ import annotations

import re

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from ..models.unet_layout import site_name


def scalars_layout(depths: dict[str, str]) -> dict:
    """The ``SummaryWriter.add_custom_scalars`` layout for the module's tags (``fair/<site>`` ...), from
    ``{site path: depth tag}`` (the module's ``depth``): one chart per depth, in the order given."""
    groups: dict[str, list[str]] = {}
    for path, depth in depths.items():
        groups.setdefault(depth, []).append(re.escape(site_name(path)))
    layout = {
        "training": {
            "loss": ["Multiline", ["train/loss", "train/diffusion", "val/loss"]],
            "FAIR total": ["Multiline", ["train/fair_total", "val/fair_total"]],
            "conditions": ["Multiline", ["conditions/.*", "curriculum/p_shuffle"]],
            "throughput": ["Multiline", ["perf/samples_per_sec"]],
        },
        # Each train curve beside its held-out one (val: fixed noise and timesteps, no drop or shuffle), and the
        # identity curve of the previews.
        "train vs val": {
            "loss (Eq. 4)": ["Multiline", ["^train/loss$", "^val/loss$"]],
            "diffusion": ["Multiline", ["^train/diffusion$", "^val/diffusion$"]],
            "FAIR total": ["Multiline", ["^train/fair_total$", "^val/fair_total$"]],
            "preview face similarity": ["Multiline", ["^preview/face_similarity(?:_base)?$"]],
        },
    }
    for category, prefix in (("FAIR by depth", "fair"), ("gate tanh(g_attn) by depth", "gate_attn"),
                             ("gate tanh(g_ff) by depth", "gate_ff")):
        layout[category] = {depth: ["Multiline", [f"^{prefix}/(?:{'|'.join(names)})$"]]
                            for depth, names in groups.items()}
    layout["FAIR by depth, train vs val"] = {
        depth: ["Multiline", [f"^fair/(?:{'|'.join(names)})$", f"^val/fair/(?:{'|'.join(names)})$"]]
        for depth, names in groups.items()}
    return layout


class TensorBoardLayout(pl.Callback):
    """Writes the custom-scalars layout once, on rank 0, to every TensorBoard logger of the trainer."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not hasattr(pl_module, "depth"):
            return
        layout = scalars_layout(dict(pl_module.depth))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(layout)
