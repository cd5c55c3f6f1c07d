"""The one map from a UNet's transformer blocks to their widths and places, read from the model itself."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockSite:
    """One transformer block of a UNet that takes a face adapter.

    path: the block's module path, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0``.
    width: its hidden width (the adapter's query width); heads: the heads of its cross-attention.
    """

    path: str
    width: int
    heads: int
    cross_attention_dim: int

    @property
    def key(self) -> str:
        """A module-name-safe key (ModuleDict keys may not contain dots)."""
        return self.path.replace(".", "_")

    @property
    def stage(self) -> str:
        """Where in the UNet the block sits: ``down``, ``mid`` or ``up``."""
        return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[self.path.split(".", 1)[0]]

    @property
    def name(self) -> str:
        """The short name dashboards show, e.g. ``down1.a0.b0`` (:func:`site_name`)."""
        return site_name(self.path)

    @property
    def official_processor(self) -> str:
        """The official FACT checkpoint's prefix for this block (its attn2 processor)."""
        return f"{self.path}.attn2.processor"


def transformer_block_sites(unet: nn.Module) -> list[BlockSite]:
    """Every ``BasicTransformerBlock`` with a cross-attention, in forward order (down, mid, up)."""
    from diffusers.models.attention import BasicTransformerBlock

    sites = []
    for path, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None:
            attn2 = module.attn2
            sites.append(
                BlockSite(
                    path=path,
                    width=attn2.query_dim,
                    heads=attn2.heads,
                    cross_attention_dim=attn2.cross_attention_dim,
                )
            )
    if not sites:
        raise ValueError(f"{type(unet).__name__} has no cross-attention transformer blocks to adapt")
    # diffusers registers up_blocks before mid_block; order the sites as the forward pass runs them.
    order = {"down": 0, "mid": 1, "up": 2}
    return sorted(sites, key=lambda site: order[site.stage])


def depth_tag(site: BlockSite, unet_config) -> str:
    """A label that groups blocks of one resolution, e.g. ``res1_down`` (0 = full latent resolution)."""
    levels = len(unet_config.block_out_channels)
    if site.stage == "mid":
        return f"res{levels - 1}_mid"
    index = int(site.path.split(".")[1])
    level = index if site.stage == "down" else levels - 1 - index
    return f"res{level}_{site.stage}"


# A site's module path and its short name: the UNet part (down/up with its block index, or mid), the attention
# (Transformer2DModel) within it, the BasicTransformerBlock within that.
_SITE_PATH = re.compile(r"(?:(down|up)_blocks\.(\d+)|(mid)_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)")
_SITE_NAME = re.compile(r"(?:(down|up)(\d+)|(mid))\.a(\d+)\.b(\d+)")


def site_name(path: str) -> str:
    """The short name of an adapter site, for dashboards: ``down_blocks.1.attentions.0.transformer_blocks.0`` ->
    ``down1.a0.b0``, ``mid_block.attentions.0.transformer_blocks.0`` -> ``mid.a0.b0``, ``up_blocks.3.attentions.2.
    transformer_blocks.0`` -> ``up3.a2.b0`` (block indices are diffusers': ``up1`` is the lowest-resolution up
    block with attention in SD1.5). A path of another shape is returned as it is. :func:`site_path` inverts it.
    """
    match = _SITE_PATH.fullmatch(path)
    if match is None:
        return path
    stage, block, mid, attention, transformer = match.groups()
    return f"{mid or stage + block}.a{attention}.b{transformer}"


def site_path(name: str) -> str:
    """The module path of a :func:`site_name` (``up3.a2.b0`` -> ``up_blocks.3.attentions.2.transformer_blocks.0``)."""
    match = _SITE_NAME.fullmatch(name)
    if match is None:
        return name
    stage, block, mid, attention, transformer = match.groups()
    part = "mid_block" if mid else f"{stage}_blocks.{block}"
    return f"{part}.attentions.{attention}.transformer_blocks.{transformer}"
