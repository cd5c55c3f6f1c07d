"""Contact sheet: for each image, the training crop with its face mask tinted, and the aligned face."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from data_tools.dataset import iter_images
from fact_lightning.faces.masks import overlay
from fact_lightning.data import schema


def contact_sheet(root: Path, max_images: int = 48, columns: int = 6, tile: int = 192) -> Image.Image:
    """A sheet of tiles: crop + mask overlay + landmarks (left), aligned reference face (right)."""
    tiles = []
    for group, image in iter_images(root):
        if len(tiles) >= max_images:
            break
        crop = overlay(image[schema.CROP], image[schema.MASK])
        for x, y in image[schema.META]["crop_landmarks"]:
            cv2.circle(crop, (int(round(x)), int(round(y))), max(2, crop.shape[0] // 128), (0, 255, 0), -1)
        x0, y0, x1, y1 = (int(round(v)) for v in image[schema.META]["crop_bbox"])
        cv2.rectangle(crop, (x0, y0), (x1, y1), (255, 255, 0), max(1, crop.shape[0] // 256))
        left = cv2.resize(crop, (tile, tile), interpolation=cv2.INTER_AREA)
        right = cv2.resize(image[schema.FACE], (tile, tile), interpolation=cv2.INTER_NEAREST)
        pair = Image.fromarray(np.hstack([left, right]))
        ImageDraw.Draw(pair).text((4, 4), f"{group['identity']}: {Path(image[schema.META]['source']).name}",
                                  fill=(255, 255, 255))
        tiles.append(pair)
    if not tiles:
        raise ValueError(f"no readable images in {root}")
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * 2 * tile, rows * tile), (32, 32, 32))
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % columns) * 2 * tile, (k // columns) * tile))
    return sheet
