"""Per-photo processing: source file -> ImageRecord (crop, mask, aligned face, metadata) or Reject.

Pure with respect to its inputs: the same bytes and options give the same record, whatever process
runs it, which is what makes builds deterministic across worker counts and resumes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from data_tools.declare import check_fields, option
from data_tools.sources import NO_IDENTITY, NOT_A_FILE, SourceItem
from fact_lightning.checks import FRACTION, Range, count, number
from fact_lightning.data import micro_conditioning, schema
from fact_lightning.faces import alignment, masks
from fact_lightning.faces.decode import DEFAULT_MAX_PIXELS, decode_image
from fact_lightning.faces.detectors.base import FaceDetector
from fact_lightning.faces.reference import FacePolicy, FaceRejection, align_reference, locate_face

logger = logging.getLogger(__name__)

# Reject reasons, besides those of fact_lightning.faces.decode and of the face policy (faces.reference).
UNREADABLE = "unreadable"
FILE_TOO_LARGE = "file_too_large"
EMPTY_MASK = "empty_mask"
DUPLICATE = "duplicate"
IDENTITY_MISMATCH = "identity_mismatch"
PROCESSING_ERROR = "processing_error"  # an unexpected exception, logged with its traceback


@dataclass(frozen=True)
class RecordOptions:
    """Everything that changes a record; part of the shard fingerprint."""

    resolution: int = option(512, "Side of the square training crop (pixels).",
                             range=Range(int, 64, 4096, multiple_of=8))
    min_face_size: int = option(64, "Reject faces whose box is smaller (source pixels).", range=count(1, 100_000))
    min_score: float = option(0.5, "Reject faces with a lower detection score.", range=FRACTION)
    keep_dominant: bool = option(False, "With several faces keep the clearly largest one instead of rejecting.")
    dominant_ratio: float = option(2.0, "Area ratio largest/second that counts as clearly largest.",
                                   range=number(1.0, 1000.0))
    max_face_outside: float = option(0.1, "Reject faces with more than this fraction of their box outside.",
                                     range=FRACTION)
    mask_dilate: float = option(0.0, "Dilate the face mask by this fraction of the face size.", range=number(0.0, 10.0))
    face_fraction: float = option(0.35, "Face size as a fraction of the training crop's side.",
                                  range=number(above=0.0, max=1.0))
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "Reject images with more pixels (decompression bombs).",
                             range=count(1))
    max_file_mb: int = option(256, "Reject input files larger than this (MiB).", range=count(1, 1 << 20))
    jpeg_quality: int = option(95, "JPEG quality of the training crops.", range=count(1, 100))

    def __post_init__(self) -> None:
        check_fields(self)
        self.face_policy  # validates the face-policy fields

    @property
    def face_policy(self) -> FacePolicy:
        return FacePolicy(min_score=self.min_score, min_face_size=self.min_face_size, keep_dominant=self.keep_dominant,
                          dominant_ratio=self.dominant_ratio, max_face_outside=self.max_face_outside)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Reject:
    source: str
    identity: str
    reason: str
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageRecord:
    source: str
    identity: str
    crop_jpg: bytes
    mask_png: bytes
    face_png: bytes
    face: np.ndarray  # (112, 112, 3) uint8, head-masked, for the encoder
    meta: dict
    embedding: np.ndarray | None = field(default=None, repr=False)  # identity-check embedding, if any


def _png(array: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _jpg(array: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()


def _round(a: np.ndarray) -> list:
    return np.round(np.asarray(a, np.float64), 2).tolist()


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; never blocks on a FIFO or reads a device.

    Raises OSError for what cannot be read, ValueError (its reason in ``args[1]``) for what must not be.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO returns at once
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file", NOT_A_FILE)
        if st.st_size > max_bytes:
            raise ValueError(f"{st.st_size} bytes > the limit of {max_bytes}", FILE_TOO_LARGE)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"more than {max_bytes} bytes", FILE_TOO_LARGE)
    return data


def process_item(item: SourceItem, detector: FaceDetector, opts: RecordOptions,
                 embedder=None) -> ImageRecord | Reject:
    """Run one photo through decode, detection, masks, crop and alignment."""
    def reject(reason: str, detail: str = "") -> Reject:
        return Reject(item.source, item.identity, reason, detail)

    if not item.identity:
        return reject(NO_IDENTITY, "image directly under --src; put it in a <identity>/ folder")
    try:
        data = read_regular_file(item.path, opts.max_file_mb << 20)
    except OSError as exc:
        return reject(UNREADABLE, f"{type(exc).__name__}: {exc.strerror or exc}")
    except ValueError as exc:
        return reject(exc.args[1], exc.args[0])
    decoded = decode_image(data, max_pixels=opts.max_pixels)
    if decoded.image is None:
        return reject(decoded.reason, decoded.detail)
    image = decoded.image
    h, w = image.shape[:2]

    found = locate_face(image, detector, opts.face_policy)
    if isinstance(found, FaceRejection):
        return reject(found.reason, found.detail)
    face, regions = found
    lm = face.landmarks

    # Training crop and its face mask.
    box = alignment.crop_box(face.bbox, (w, h), face_fraction=opts.face_fraction)
    to_crop = alignment.crop_matrix(box, opts.resolution)
    size = (opts.resolution, opts.resolution)
    crop = alignment.warp(image, to_crop, size)
    mask = regions.face_mask(to_crop, size)
    face_px = max(face.width, face.height) * to_crop[0, 0]
    mask = masks.dilate(mask, opts.mask_dilate * face_px)
    if masks.coverage(mask) == 0.0:
        return reject(EMPTY_MASK, "the face mask is empty inside the crop")

    # Reference face: ArcFace-aligned, zero outside the head mask (the same code path as inference).
    aligned = align_reference(image, face, regions)
    to_face = alignment.arcface_matrix(lm, schema.FACE_SIZE)  # recorded in meta["align_matrix"]

    crop_bbox = alignment.apply_affine(to_crop, face.bbox.reshape(2, 2)).reshape(-1)
    meta = {
        "source": item.source,
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "identity": item.identity,
        "caption": item.caption,
        "image_size": [w, h],
        "source_format": decoded.source_format,
        "source_mode": decoded.source_mode,
        "detector": detector.name,
        "score": round(float(face.score), 4),
        "bbox": _round(face.bbox),
        "landmarks": _round(lm),
        "crop_box": _round(box),
        "crop_bbox": _round(crop_bbox),
        "crop_landmarks": _round(alignment.apply_affine(to_crop, lm)),
        "align_matrix": np.round(to_face, 6).tolist(),
        "identity_check": None,
        **micro_conditioning.record(box, (w, h), opts.resolution),  # SDXL's original size and crop corner
    }
    record = ImageRecord(item.source, item.identity, _jpg(crop, opts.jpeg_quality), _png(mask, "L"),
                         _png(aligned, "RGB"), aligned, meta)
    if embedder is not None:
        record.embedding = embedder.embed_image(crop, crop_bbox)
    return record
