"""Mask post-processing: dilation relative to face size, area checks. Pure numpy + cv2."""

from __future__ import annotations

import cv2
import numpy as np


def dilate(mask: np.ndarray, pixels: float) -> np.ndarray:
    """Grow a 0/255 mask by about ``pixels`` (elliptical kernel); no-op for pixels < 0.5."""
    r = int(round(pixels))
    if r < 1:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask, kernel)


def apply_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pixels outside the mask set to 0, as the official FACT reference preprocessing does."""
    return np.where(mask[..., None] >= 128, image, 0).astype(image.dtype)


def coverage(mask: np.ndarray) -> float:
    """Fraction of pixels inside a 0/255 mask."""
    return float((mask >= 128).mean()) if mask.size else 0.0


def overlay(image: np.ndarray, mask: np.ndarray, color=(255, 0, 0), alpha: float = 0.45) -> np.ndarray:
    """The image with the mask tinted and its outline drawn (for contact sheets)."""
    out = image.astype(np.float32)
    inside = mask >= 128
    out[inside] = out[inside] * (1 - alpha) + np.array(color, np.float32) * alpha
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, color, max(1, image.shape[0] // 256))
    return out
