"""Safe image decoding: bytes -> RGB uint8 array, or a reject reason.

Applies EXIF orientation, converts every PIL mode (RGBA/LA/palette with transparency over white,
grayscale, CMYK, 1-bit, 16-bit and float) to 8-bit RGB, and refuses images above a pixel-count limit
before decoding their pixels (decompression bombs). Never raises for bad input: returns a reason.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000

# Reject reasons produced here.
EMPTY_FILE = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TOO_MANY_PIXELS = "too_many_pixels"
TRUNCATED = "truncated"
DECODE_ERROR = "decode_error"


@dataclass(frozen=True)
class Decoded:
    image: np.ndarray | None  # (H, W, 3) uint8 RGB
    reason: str | None = None
    detail: str = ""
    source_format: str = ""
    source_mode: str = ""


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "P":
        return im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode image bytes to an RGB array; on failure ``image`` is None and ``reason`` says why."""
    if not data:
        return Decoded(None, EMPTY_FILE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        return Decoded(None, TOO_MANY_PIXELS, str(exc))
    except UnidentifiedImageError:
        return Decoded(None, NOT_AN_IMAGE)
    except Exception as exc:  # noqa: BLE001 - any failure to parse a header is a property of the input
        return Decoded(None, NOT_AN_IMAGE, f"{type(exc).__name__}: {exc}")
    fmt, mode = im.format or "", im.mode
    w, h = im.size
    if w * h > max_pixels:
        return Decoded(None, TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels > limit {max_pixels}", fmt, mode)
    if w == 0 or h == 0:
        return Decoded(None, DECODE_ERROR, "zero-sized image", fmt, mode)
    try:
        im.load()
        im = ImageOps.exif_transpose(im) or im
        rgb = _to_rgb(im)
        arr = np.array(rgb, dtype=np.uint8)
    except OSError as exc:
        text = str(exc)
        reason = TRUNCATED if "truncat" in text.lower() or "broken data stream" in text.lower() else DECODE_ERROR
        return Decoded(None, reason, text, fmt, mode)
    except (ValueError, SyntaxError, EOFError, MemoryError) as exc:
        return Decoded(None, DECODE_ERROR, f"{type(exc).__name__}: {exc}", fmt, mode)
    if arr.ndim != 3 or arr.shape[2] != 3:
        return Decoded(None, DECODE_ERROR, f"unexpected decoded shape {arr.shape}", fmt, mode)
    return Decoded(np.ascontiguousarray(arr), None, "", fmt, mode)
