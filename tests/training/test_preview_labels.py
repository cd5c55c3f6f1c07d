"""The preview grid's labels stay readable when a dashboard shrinks the grid: they scale with the tiles."""

from __future__ import annotations

import numpy as np
import pytest

from fact_lightning.callbacks.preview_grid import label_px, labelled_grid
from fact_lightning.callbacks.previews import GRID_TILE

ROWS, COLUMNS = ["fr_obama p00 s0", "fr_biden p01 s0"], ["reference", "crop", "adapter x0.5", "base"]


def _grid(tile: int) -> np.ndarray:
    cells = [[np.full((tile, tile, 3), 40 * (r + c), np.uint8) for c in range(len(COLUMNS))] for r in range(len(ROWS))]
    return labelled_grid(cells, ROWS, COLUMNS, "fr_obama  step 200", tile)


def _bands(grid: np.ndarray, tile: int) -> tuple[int, int]:
    """(header band height, row-label band width): what the grid has beyond its tiles."""
    return grid.shape[0] - len(ROWS) * tile, grid.shape[1] - len(COLUMNS) * tile


def _text_height(band: np.ndarray) -> int:
    """Rows of the band with dark (text) pixels, from the first to the last."""
    dark = np.flatnonzero((band < 100).all(axis=-1).any(axis=1))
    return int(dark[-1] - dark[0] + 1) if dark.size else 0


@pytest.mark.parametrize("tile", [128, 256, 512])
def test_the_label_bands_scale_with_the_tile(tile):
    grid = _grid(tile)
    top, left = _bands(grid, tile)
    # The header band (title and column labels) is a fixed share of a tile at every size, ...
    assert 0.3 * tile <= top <= 0.5 * tile, (tile, top)
    # ... its text an eighth of a tile high or more: about 11 px when a grid of 4 tiles a row is shown 500 px wide.
    assert label_px(tile) == round(tile / 8)
    title_rows = grid[: top // 2]
    assert _text_height(title_rows) >= 0.7 * label_px(tile), (tile, _text_height(title_rows))
    assert left >= 0.5 * tile  # the row labels are as large: "fr_obama p00 s0" needs half a tile or more
    # The header band is grey, the text black on it, the tiles start below it.
    assert tuple(grid[1, -2]) == (224, 224, 224)
    np.testing.assert_array_equal(grid[top, left], [0, 0, 0])  # the first tile's top-left pixel (value 0)


def test_the_bands_grow_in_proportion():
    tops = {tile: _bands(_grid(tile), tile)[0] for tile in (128, GRID_TILE, 512)}
    assert tops[128] < tops[GRID_TILE] < tops[512]
    assert tops[512] / tops[128] == pytest.approx(4, rel=0.15)


def test_small_tiles_keep_a_legible_minimum():
    assert label_px(32) == label_px(64) == 10
    top, _ = _bands(_grid(32), 32)
    assert top >= 2 * 10


def test_a_column_label_wider_than_its_tile_stays_in_its_column():
    tile = 64
    wide = ["adapter x0.55 (long)", "base"]
    cells = [[np.full((tile, tile, 3), 255, np.uint8) for _ in wide]]
    grid = labelled_grid(cells, ["a"], wide, "t", tile)
    top, left = grid.shape[0] - tile, grid.shape[1] - 2 * tile
    header = grid[top // 2: top, left: left + tile]  # the first column's label, in the header band
    ink = np.flatnonzero((header < 100).all(axis=-1).any(axis=0))
    assert ink.size and ink[-1] < tile - 1  # its text ends inside its own column
