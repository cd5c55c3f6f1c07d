"""The one map from a UNet's transformer blocks to their widths and places, read from the model itself."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

# Which transformer blocks take an adapter: every block ("block", SD1.5's 16), the first block of every
# transformer stack ("stack", SDXL's 11), or an explicit list of site names or block paths.
SiteChoice = str | Sequence[str]
SITE_CHOICES = ("block", "stack")


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


def stack_path(block_path: str) -> str:
    """The ``Transformer2DModel`` (the stack) a block belongs to: ``...attentions.0.transformer_blocks.3`` ->
    ``...attentions.0``."""
    return block_path.rpartition(".transformer_blocks.")[0] or block_path


def select_sites(unet: nn.Module, sites: SiteChoice = "block") -> list[BlockSite]:
    """The adapter sites of ``unet`` for a choice of ``sites``, in forward order.

    ``"block"``: every cross-attention transformer block (SD1.5: 16; SDXL: 70). ``"stack"``: one site per
    transformer stack (SDXL: 11; on SD1.5, whose stacks are one block deep, the same 16 as ``"block"``). A list:
    those sites, by short name (``down1.a0.b0``) or block path, each once.

    A stack's site is its FIRST block, with SFAGS in that block's GLIGEN slot as everywhere else, rather than a
    module wrapping the stack's output tokens: SFAGS then keeps its place of Eq. 2, after a self-attention and
    before the cross-attention to the text, so the text attention and every later block of the stack (9 more
    in SDXL's deep stacks) work on tokens that already carry the identity; a wrapper at the stack's output would
    add it after all of the stack's text attention, where nothing in the stack could refine it. It also keeps
    one mechanism for both choices (same hook, FAIR capture, checkpoint keys, gradient checkpointing): a stack
    site is an ordinary block site, and FAIR runs on that block's tokens, the stack's own grid.
    """
    every = transformer_block_sites(unet)
    if isinstance(sites, str):
        if sites == "block":
            return every
        if sites == "stack":
            firsts: dict[str, BlockSite] = {}
            for site in every:
                firsts.setdefault(stack_path(site.path), site)
            return list(firsts.values())
        raise ValueError(f"sites must be one of {SITE_CHOICES} or a list of site names, got {sites!r}")
    wanted = [site_path(str(name)) for name in sites]
    if not wanted:
        raise ValueError("an explicit list of adapter sites is empty: give at least one site name")
    repeated = sorted({p for p in wanted if wanted.count(p) > 1})
    if repeated:
        raise ValueError(f"adapter sites named more than once: {', '.join(site_name(p) for p in repeated)}")
    known = {site.path for site in every}
    unknown = [name for name, path in zip(sites, wanted) if path not in known]
    if unknown:
        raise ValueError(f"no such adapter site in this UNet: {', '.join(map(str, unknown))} (its {len(every)} sites "
                         f"run from {every[0].name} to {every[-1].name})")
    chosen = set(wanted)
    return [site for site in every if site.path in chosen]


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
