"""A reference photo -> the aligned, head-masked 112x112 face TransFace reads, at inference time.

The same steps as a shard record's reference face (``records.process_item``): the detector's faces, the
face policy of ``records.choose_face``, landmark refinement by ``detector.analyze``, ArcFace alignment
(``alignment.arcface_matrix`` + ``alignment.warp``) and the head mask (``masks.apply_mask``). Inference and
``fact-data`` share :func:`align_reference`, so a reference face is the same pixels in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_tools import alignment, masks
from data_tools.detectors.base import Detection, FaceDetector, FaceRegions
from fact_lightning.data import schema


class NoFaceError(ValueError):
    """The reference photo has no usable face."""


@dataclass(frozen=True)
class Reference:
    """One prepared reference photo."""

    face: np.ndarray  # (112, 112, 3) uint8 RGB, ArcFace-aligned, zero outside the head mask
    detection: Detection  # refined (final landmarks), in the photo's pixels
    regions: FaceRegions  # face/head regions of the photo, renderable into any frame


def align_reference(image: np.ndarray, detection: Detection, regions: FaceRegions,
                    size: int = schema.FACE_SIZE) -> np.ndarray:
    """ArcFace-aligned ``size`` x ``size`` face of ``image``, zero outside the head mask (uint8 RGB)."""
    to_face = alignment.arcface_matrix(detection.landmarks, size)
    frame = (size, size)
    return masks.apply_mask(alignment.warp(image, to_face, frame), regions.head_mask(to_face, frame))


def prepare_reference(image: np.ndarray, detector: FaceDetector, *, min_score: float = 0.5,
                      min_face_size: int = 32) -> Reference:
    """Detects the photo's main face (the largest confident one) and aligns it for the face encoder.

    ``image``: RGB uint8 (H, W, 3). Raises :class:`NoFaceError` with the reason when no face qualifies.
    Unlike a shard build, a photo with several faces is accepted: the largest confident face is used.
    """
    from data_tools.records import RecordOptions, choose_face  # records will import this module

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    opts = RecordOptions(min_score=min_score, min_face_size=min_face_size, keep_dominant=True, dominant_ratio=1.0)
    face, reason, detail = choose_face(detector.detect(image), opts)
    if face is None:
        raise NoFaceError(f"no usable face in the reference photo: {reason} {detail}".strip())
    analyzed = detector.analyze(image, face)
    if analyzed is None:
        raise NoFaceError(f"{detector.name} found no landmarks in the reference face")
    face, regions = analyzed
    return Reference(align_reference(image, face, regions), face, regions)


def face_region_mask(image: np.ndarray, detector: FaceDetector, *, dilate: float = 0.1, head: bool = False,
                     min_score: float = 0.5) -> np.ndarray:
    """uint8 (H, W) mask, 255 over the main face (or head) of ``image``: the region inpainting regenerates.

    ``dilate`` grows the mask by that fraction of the face size (``masks.dilate``).
    """
    ref = prepare_reference(image, detector, min_score=min_score)
    h, w = image.shape[:2]
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    render = ref.regions.head_mask if head else ref.regions.face_mask
    mask = render(identity, (w, h))
    return masks.dilate(mask, dilate * max(ref.detection.width, ref.detection.height))
