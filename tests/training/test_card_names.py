"""Dashboard names: every adapter site of SD1.5 has a short, unique name (``down1.a0.b0``) that maps back to its
module path, and the Custom Scalars layout charts each site's tags once, at its depth."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.sd15 import SD15_UNET
from fact_lightning.callbacks.tensorboard import scalars_layout
from fact_lightning.models.unet_layout import depth_tag, site_name, site_path, transformer_block_sites

SD15_NAMES = (["down0.a0.b0", "down0.a1.b0", "down1.a0.b0", "down1.a1.b0", "down2.a0.b0", "down2.a1.b0", "mid.a0.b0"]
              + [f"up{block}.a{attention}.b0" for block in (1, 2, 3) for attention in (0, 1, 2)])
PREFIXES = {"FAIR by depth": "fair", "gate tanh(g_attn) by depth": "gate_attn", "gate tanh(g_ff) by depth": "gate_ff"}


@pytest.fixture(scope="module")
def sd15_sites():
    """The adapter sites of SD1.5's own UNet (its config, on the meta device: no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    return unet, transformer_block_sites(unet)


def test_sd15_sites_have_short_unique_names_that_map_back(sd15_sites):
    _, sites = sd15_sites
    names = [site.name for site in sites]
    assert names == SD15_NAMES  # forward order: down, mid, up
    assert len(set(names)) == 16
    for site in sites:
        assert site_path(site.name) == site.path  # round trip
        assert len(f"gate_attn/{site.name}") <= 21  # whole in a TensorBoard card title
    assert sorted(names) == names  # TensorBoard sorts cards by tag: the UNet's order is kept


def test_the_tiny_unet_names_its_sites_as_sd15_does(tiny_unet, sd15_sites):
    _, sites = sd15_sites
    assert [s.name for s in transformer_block_sites(tiny_unet)] == [s.name for s in sites]


@pytest.mark.parametrize("path, name", [
    ("down_blocks.0.attentions.1.transformer_blocks.0", "down0.a1.b0"),
    ("mid_block.attentions.0.transformer_blocks.0", "mid.a0.b0"),
    ("up_blocks.3.attentions.2.transformer_blocks.0", "up3.a2.b0"),
    ("down_blocks.2.attentions.1.transformer_blocks.9", "down2.a1.b9"),  # SDXL's deep blocks
    ("up_blocks.12.attentions.10.transformer_blocks.11", "up12.a10.b11"),
])
def test_site_names_round_trip(path, name):
    assert site_name(path) == name and site_path(name) == path


def test_another_shape_of_path_keeps_its_name():
    for path in ("transformer_blocks.0", "down_blocks.0.attentions.0.transformer_blocks.0.attn2"):
        assert site_name(path) == path and site_path(path) == path


def test_the_layout_charts_every_site_once_at_its_depth(sd15_sites):
    unet, sites = sd15_sites
    depths = {site.path: depth_tag(site, unet.config) for site in sites}
    layout = scalars_layout(depths)
    assert set(PREFIXES) <= set(layout)
    for category, prefix in PREFIXES.items():
        charts = layout[category]
        assert list(charts) == list(dict.fromkeys(depths.values()))  # one chart per depth, forward order
        for site in sites:
            tag = f"{prefix}/{site.name}"
            # TensorBoard's custom-scalars plugin matches each chart's regexes with re.match.
            holding = [depth for depth, (_, regexes) in charts.items() if any(re.match(r, tag) for r in regexes)]
            assert holding == [depths[site.path]], (tag, holding)
        other = "gate_ff" if prefix != "gate_ff" else "fair"
        assert not any(re.match(r, f"{other}/down0.a0.b0") for _, regexes in charts.values() for r in regexes)
    assert sum(len(regexes[0].split("|")) for _, regexes in layout["FAIR by depth"].values()) == 16
