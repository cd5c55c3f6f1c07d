"""SDXL's micro-conditioning of a training crop: what ``fact-data`` records in each image's meta, and how the
training reader turns it (or its absence) into batch fields.

SDXL (Podell et al. 2023, section 2.2) conditions its UNet on the source image's size before any resize
(``original_size``, (h, w) in source pixels) and on the top-left corner of the crop it trained on
(``crop_top_left``, (top, left)), the latter in the pixels of the image *after* the resize that brought it to
the training scale. A ``fact-data`` crop is a square of side S of the source resized to R x R, so that resize
is by R / S, and we record the crop's corner in the source scaled by R / S, rounded to whole pixels; a crop that
reaches past the image's top or left edge (a face too large for the photo, padded) records 0 there, the
nearest position SDXL saw in training. Both are meta fields (``schema.META_KEYS``): shards made before they
existed still read, and train with the crop's own size and (0, 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ORIGINAL_SIZE = "original_size"  # [h, w]: the decoded, EXIF-transposed source photo, source pixels
CROP_TOP_LEFT = "crop_top_left"  # [top, left]: the crop's corner in the source, at the crop's resolution scale


def record(crop_box: Sequence[float], image_size: tuple[int, int], resolution: int) -> dict[str, list[int]]:
    """The meta fields of a crop of ``crop_box`` ([x0, y0, x1, y1], source pixels) of a ``image_size`` (w, h)
    photo, resized to ``resolution`` x ``resolution``."""
    x0, y0, x1, _ = (float(v) for v in crop_box)
    scale = resolution / (x1 - x0)
    w, h = image_size
    return {ORIGINAL_SIZE: [int(h), int(w)],
            CROP_TOP_LEFT: [max(0, round(y0 * scale)), max(0, round(x0 * scale))]}


def read(meta: dict, crop_side: int, resolution: int) -> tuple[list[float], list[float], bool]:
    """(original_size, crop_top_left, recorded) of an image whose stored crop is ``crop_side`` pixels, trained at
    ``resolution``: the meta's values (the corner rescaled when training resizes the crop), or, when the meta has
    none, the training crop's own size and (0, 0) with ``recorded`` False. Malformed values raise ValueError
    (the reader's handler skips the image's group and counts it)."""
    if not isinstance(meta, dict) or ORIGINAL_SIZE not in meta and CROP_TOP_LEFT not in meta:
        return [float(resolution)] * 2, [0.0, 0.0], False
    size, corner = meta.get(ORIGINAL_SIZE), meta.get(CROP_TOP_LEFT)
    for name, value, lowest in ((ORIGINAL_SIZE, size, 1), (CROP_TOP_LEFT, corner, 0)):
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= lowest
                           for v in value)):
            raise ValueError(f"meta {name} is {value!r}, expected two numbers >= {lowest}")
    scale = resolution / crop_side
    return [float(v) for v in size], [float(v) * scale for v in corner], True
