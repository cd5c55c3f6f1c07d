"""The detector protocol: an RGB image -> detections with ArcFace-ordered 5-point landmarks, and masks.

Masks are returned as :class:`FaceRegions`, which rasterise the face and head regions directly into any
target frame given by a 2x3 affine matrix from source pixels (the training crop, the aligned face), so a
4000-pixel photo never needs a full-resolution mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np


@dataclass(frozen=True)
class Detection:
    """One face in source-image pixels.

    bbox: (4,) float [x0, y0, x1, y1]; landmarks: (5, 2) float in ArcFace order (image-left eye, image-right
    eye, nose tip, image-left mouth corner, image-right mouth corner); score in [0, 1].
    """

    bbox: np.ndarray
    landmarks: np.ndarray
    score: float

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


class FaceRegions(Protocol):
    """Face and head regions of one detection, renderable into any affine frame of the source."""

    def face_mask(self, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """uint8 (h, w) mask, 255 inside the face, for target frame ``size`` = (w, h)."""

    def head_mask(self, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """uint8 (h, w) mask, 255 over the head (face, hair, ears), for target frame ``size`` = (w, h)."""


class FaceDetector(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[Detection]:
        """All faces of an RGB uint8 (H, W, 3) image, highest score first."""

    def analyze(self, image: np.ndarray, detection: Detection) -> tuple[Detection, FaceRegions] | None:
        """Refined detection (final 5-point landmarks) and face/head regions for one face, or None when
        the landmark / parsing model fails on it."""


@dataclass(frozen=True)
class PolygonRegions:
    """Regions given as polygons in source pixels (the face-mesh backend)."""

    face: np.ndarray  # (K, 2)
    head: np.ndarray  # (K, 2)

    @staticmethod
    def _fill(poly: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        pts = poly @ matrix[:, :2].T + matrix[:, 2]
        mask = np.zeros((size[1], size[0]), np.uint8)
        # 4 fractional bits keep sub-pixel accuracy when the target frame is small (112x112).
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
        return mask

    def face_mask(self, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return self._fill(self.face, matrix, size)

    def head_mask(self, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return self._fill(self.head, matrix, size)


@dataclass(frozen=True)
class LabelMapRegions:
    """Regions given as a face-parsing label map in its own frame (the facexlib backend).

    labels: (S, S) int label map; to_labels: 2x3 affine from source pixels to the label map's pixels.
    """

    labels: np.ndarray
    to_labels: np.ndarray
    face_labels: tuple[int, ...]
    head_labels: tuple[int, ...]

    def _render(self, keep: tuple[int, ...], matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        mask = np.isin(self.labels, keep).astype(np.uint8) * 255
        # target <- source <- labels: compose matrix with the inverse of to_labels.
        inv = cv2.invertAffineTransform(self.to_labels)
        combined = compose_affine(matrix, inv)
        return cv2.warpAffine(mask, combined, size, flags=cv2.INTER_LINEAR, borderValue=0) >= 128

    def face_mask(self, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return self._render(self.face_labels, matrix, size).astype(np.uint8) * 255

    def head_mask(self, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return self._render(self.head_labels, matrix, size).astype(np.uint8) * 255


def downscale_for_detection(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """(image shrunk so its longer side is at most ``max_side``, the scale applied); detectors run on it and
    divide their coordinates by the scale, so large photos cost no more than a ``max_side`` one."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return image, 1.0
    return cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA), scale


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 affine ``outer o inner`` (apply ``inner`` first)."""
    a = np.vstack([outer, [0, 0, 1]])
    b = np.vstack([inner, [0, 0, 1]])
    return (a @ b)[:2]
