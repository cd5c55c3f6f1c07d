"""The preview grid: previews as labelled tiles, and images sent to every logger that takes them."""

from __future__ import annotations

import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger

# Label text is this fraction of a tile's side (at least LABEL_MIN_PX): still readable when a dashboard shows a
# grid of four tiles a row at a third of its size.
LABEL_FRACTION, LABEL_MIN_PX = 1 / 8, 10


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float (H, W, 3) in [0, 1] -> uint8."""
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def label_px(tile: int) -> int:
    """The label font size of a grid of ``tile``-pixel squares."""
    return max(LABEL_MIN_PX, round(tile * LABEL_FRACTION))


def labelled_grid(rows: list[list[np.ndarray]], row_labels: list[str], col_labels: list[str], title: str,
                  tile: int | None = None) -> np.ndarray:
    """uint8 (H, W, 3) images as ``tile``-pixel squares (default: the largest image's height) in a grid, under a
    grey header band (the title, then the column labels) and right of a band of row labels; the text is
    :func:`label_px` high, an eighth of a tile, so that it scales with the tiles."""
    from PIL import Image, ImageDraw, ImageFont

    tile = tile or max(cell.shape[0] for row in rows for cell in row)
    font = ImageFont.load_default(size=label_px(tile))
    pad = max(2, label_px(tile) // 4)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = measure.textbbox((0, 0), "Ag", font=font)[3] + 2 * pad
    left = max(measure.textbbox((0, 0), t, font=font)[2] for t in row_labels) + 2 * pad
    widest = max(measure.textbbox((0, 0), t, font=font)[2] for t in col_labels)
    if widest > tile - 2 * pad:  # a column label wider than its tile is drawn smaller, not over its neighbour
        column_font = ImageFont.load_default(size=max(1, label_px(tile) * (tile - 2 * pad) // widest))
    else:
        column_font = font
    top = 2 * line
    canvas = Image.new("RGB", (left + tile * len(col_labels), top + tile * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, canvas.width - 1, top - 1), fill=(224, 224, 224))  # the header band
    draw.rectangle((0, top, left - 1, canvas.height - 1), fill=(240, 240, 240))  # the row labels' band
    draw.text((pad, pad), title, fill="black", font=font)
    for c, text in enumerate(col_labels):
        draw.text((left + c * tile + pad, line + pad), text, fill="black", font=column_font)
    for r, (row, text) in enumerate(zip(rows, row_labels)):
        draw.text((pad, top + r * tile + tile // 2 - line // 2 + pad), text, fill="black", font=font)
        for c, cell in enumerate(row):
            canvas.paste(Image.fromarray(_square(cell, tile)), (left + c * tile, top + r * tile))
    return np.asarray(canvas)


def _square(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def log_images(loggers, key: str, images: list[np.ndarray], step: int) -> int:
    """Sends uint8 (H, W, 3) images to every logger that takes images; returns how many did."""
    taken = 0
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for i, image in enumerate(images):
                logger.experiment.add_image(key if len(images) == 1 else f"{key}/{i}", image, step, dataformats="HWC")
        elif callable(getattr(logger, "log_image", None)):
            logger.log_image(key=key, images=list(images), step=step)
        else:
            continue
        taken += 1
    return taken
