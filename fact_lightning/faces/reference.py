"""One photo's face, chosen under a policy, and the aligned, head-masked 112x112 face TransFace reads.

Shard records (``data_tools.records``) and inference take the same steps: the detector's faces, the face
policy (:class:`FacePolicy`, :func:`choose_face`), landmark refinement by ``detector.analyze``, the border
checks (:func:`locate_face`), then ArcFace alignment and the head mask (:func:`align_reference`). So a
reference face is the same pixels in a shard and at inference time, and a photo is refused for the same
named reason in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fact_lightning.data import schema
from fact_lightning.faces import alignment, masks
from fact_lightning.faces.detectors.base import Detection, FaceDetector, FaceRegions

# Why a photo's face was refused (the names fact-data writes to rejects.jsonl).
NO_FACE = "no_face"
LOW_SCORE = "low_score"
SEVERAL_FACES = "several_faces"
FACE_TOO_SMALL = "face_too_small"
FACE_AT_BORDER = "face_cut_by_border"
LANDMARKS_FAILED = "landmarks_failed"


class NoFaceError(ValueError):
    """The reference photo has no face that the policy accepts; ``reason`` is one of the names above."""

    def __init__(self, message: str, reason: str = NO_FACE):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FacePolicy:
    """Which face of a photo counts, and when a photo is refused instead.

    min_score: detection score below which a face is ignored; min_face_size: smallest face box side in
    source pixels; keep_dominant: with several faces keep the largest when its area is ``dominant_ratio``
    times the second's (else refuse the photo); max_face_outside: the largest fraction of the face box that
    may lie outside the image; landmarks_inside: refuse a face with a landmark outside the image.
    """

    min_score: float = 0.5
    min_face_size: int = 64
    keep_dominant: bool = False
    dominant_ratio: float = 2.0
    max_face_outside: float = 0.1
    landmarks_inside: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {self.min_score}")
        if self.dominant_ratio < 1.0:
            raise ValueError(f"dominant_ratio must be >= 1, got {self.dominant_ratio}")
        if self.max_face_outside < 0 or self.min_face_size < 1:
            raise ValueError("max_face_outside must be >= 0, min_face_size >= 1")


# What inference accepts when the user opts out of the strict policy: the largest confident face, wherever.
LENIENT_POLICY = FacePolicy(min_face_size=32, keep_dominant=True, dominant_ratio=1.0, max_face_outside=1.0,
                            landmarks_inside=False)


@dataclass(frozen=True)
class FaceRejection:
    reason: str
    detail: str = ""


def choose_face(detections: list[Detection], policy: FacePolicy) -> Detection | FaceRejection:
    """The face a photo stands for under the several-faces, score and size rules, or why there is none."""
    if not detections:
        return FaceRejection(NO_FACE)
    confident = [d for d in detections if d.score >= policy.min_score]
    if not confident:
        best = max(d.score for d in detections)
        return FaceRejection(LOW_SCORE, f"best score {best:.3f} < {policy.min_score}")
    by_area = sorted(confident, key=lambda d: -d.area)
    if len(by_area) > 1:
        ratio = by_area[0].area / max(by_area[1].area, 1e-6)
        if not (policy.keep_dominant and ratio >= policy.dominant_ratio):
            return FaceRejection(SEVERAL_FACES, f"{len(by_area)} faces, largest/second area ratio {ratio:.2f}")
    face = by_area[0]
    if min(face.width, face.height) < policy.min_face_size:
        return FaceRejection(FACE_TOO_SMALL, f"{face.width:.0f}x{face.height:.0f} px < {policy.min_face_size}")
    return face


def locate_face(image: np.ndarray, detector: FaceDetector,
                policy: FacePolicy) -> tuple[Detection, FaceRegions] | FaceRejection:
    """The chosen face with its final landmarks and face/head regions, or why the photo is refused."""
    h, w = image.shape[:2]
    if min(h, w) < policy.min_face_size:  # no acceptable face fits (and a 60000x2 strip breaks detectors)
        return FaceRejection(FACE_TOO_SMALL, f"the image is {w}x{h} px, narrower than a {policy.min_face_size} px face")
    face = choose_face(detector.detect(image), policy)
    if isinstance(face, FaceRejection):
        return face
    outside = alignment.box_fraction_outside(face.bbox, (w, h))
    if outside > policy.max_face_outside:
        return FaceRejection(FACE_AT_BORDER, f"{outside:.0%} of the face box is outside the image")
    analyzed = detector.analyze(image, face)
    if analyzed is None:
        return FaceRejection(LANDMARKS_FAILED, f"{detector.name} found no landmarks in the detected face")
    face, regions = analyzed
    lm = face.landmarks
    if policy.landmarks_inside and ((lm < 0).any() or (lm[:, 0] >= w).any() or (lm[:, 1] >= h).any()):
        return FaceRejection(FACE_AT_BORDER, "a facial landmark lies outside the image")
    return face, regions


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


def prepare_reference(image: np.ndarray, detector: FaceDetector, policy: FacePolicy = FacePolicy()) -> Reference:
    """Finds the photo's face under ``policy`` (by default fact-data's) and aligns it for the face encoder.

    ``image``: RGB uint8 (H, W, 3). Raises :class:`NoFaceError` naming the reason when the policy refuses
    the photo (``LENIENT_POLICY`` takes the largest confident face wherever it is).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    found = locate_face(image, detector, policy)
    if isinstance(found, FaceRejection):
        detail = f" ({found.detail})" if found.detail else ""
        raise NoFaceError(f"no usable face: {found.reason}{detail}", found.reason)
    face, regions = found
    return Reference(align_reference(image, face, regions), face, regions)


def face_region_mask(image: np.ndarray, detector: FaceDetector, *, dilate: float = 0.1, head: bool = False,
                     policy: FacePolicy = LENIENT_POLICY) -> np.ndarray:
    """uint8 (H, W) mask, 255 over the main face (or head) of ``image``: the region inpainting regenerates.

    ``dilate`` grows the mask by that fraction of the face size (``masks.dilate``).
    """
    ref = prepare_reference(image, detector, policy)
    h, w = image.shape[:2]
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    render = ref.regions.head_mask if head else ref.regions.face_mask
    mask = render(identity, (w, h))
    return masks.dilate(mask, dilate * max(ref.detection.width, ref.detection.height))
