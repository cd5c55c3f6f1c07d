"""The shard format shared by ``fact-data build`` (writer) and the training data pipeline (reader).

A dataset directory holds::

    shard-000000.tar ...        webdataset tar shards, one sample per identity group
    shard-000000.stats.json ... per-shard stats, written after the tar is complete (the resume marker)
    manifest.json               written last: options, encoder, counts, shard list (keys below)
    rejects.jsonl               one line per input that did not make it, with its reason

Each webdataset sample is one *identity group*: up to ``max_per_group`` images of one person. Its key is
``{shard:06d}_{group:04d}`` and it holds ``group.json`` plus, for image ``i`` (two digits), the fields
``{i:02d}.crop.jpg``, ``{i:02d}.mask.png``, ``{i:02d}.face.png``, ``{i:02d}.tokens.npy``, ``{i:02d}.meta.json``.
The extensions are the last dot component, so webdataset's stock decoders apply (``.decode("pil")``).

Bump :data:`FORMAT_VERSION` on any change that a reader could notice.
"""

from __future__ import annotations

import re
from typing import Any

FORMAT_VERSION = 1

# --- per-image fields (prefixed by the two-digit image index: "03.crop.jpg") ---------------------------
CROP = "crop.jpg"      # training image: RGB JPEG, square, resolution x resolution
MASK = "mask.png"      # face mask M of the crop: 8-bit L PNG, 255 = face, 0 = elsewhere, same size as crop
FACE = "face.png"      # reference face: RGB PNG 112x112, ArcFace-aligned, 0 (black) outside the head mask
TOKENS = "tokens.npy"  # TransFace final-norm tokens of FACE: float16 array (144, D)
META = "meta.json"     # dict with the META_KEYS below
IMAGE_FIELDS = (CROP, MASK, FACE, TOKENS, META)

# --- per-group field ------------------------------------------------------------------------------------
GROUP = "group.json"   # {"format_version", "identity", "group_index", "num_images", "sources"}

TOKENS_DTYPE = "float16"
FACE_SIZE = 112
# ArcFace 5-point template for 112x112 faces; landmark order everywhere in the format.
LANDMARK_ORDER = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")  # image left / right

# meta.json keys. Coordinates are pixels, x then y; boxes are [x0, y0, x1, y1].
META_KEYS = (
    "source",          # path relative to the build's --src (or as given in a manifest file)
    "source_sha256",   # sha256 of the source file's bytes
    "identity",
    "caption",
    "image_size",      # [width, height] of the decoded, EXIF-transposed source image
    "detector",        # backend name, e.g. "mediapipe"
    "score",           # detection score in [0, 1]
    "bbox",            # face box in source pixels
    "landmarks",       # 5x2 in source pixels, LANDMARK_ORDER
    "crop_box",        # the square of the source that CROP shows, in source pixels (may exceed the image)
    "crop_bbox",       # face box in CROP pixels
    "crop_landmarks",  # 5x2 in CROP pixels
    "align_matrix",    # 2x3 similarity transform, source pixels -> FACE pixels
    "identity_check",  # null, or {"model", "distance", "threshold", "ok"} from identity verification
)

# manifest.json keys.
MANIFEST_KEYS = (
    "format_version", "tool", "options", "encoder", "detector", "counts", "identities", "shards",
    "rejects_by_reason", "warnings",
)
# manifest["encoder"]: {"variant", "config", "weights", "weights_sha256", "random", "token_shape", "token_dtype"}
# manifest["counts"]: {"found", "accepted", "rejected", "samples", "images"}
# manifest["shards"]: [{"name", "samples", "images", "sha256"}]

SHARD_PATTERN = "shard-{index:06d}.tar"
STATS_SUFFIX = ".stats.json"
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"

_FIELD_RE = re.compile(r"^(\d{2})\.(.+)$")


def image_key(index: int, field: str) -> str:
    """The sample key of one image's field: ``image_key(3, CROP) == "03.crop.jpg"``."""
    return f"{index:02d}.{field}"


def split_group(sample: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    """Split a (decoded or raw) webdataset sample into its group field and a list of per-image dicts.

    Each per-image dict maps the bare field names (``CROP``, ``MASK``, ...) to the sample's values, in
    image-index order. Keys starting with ``__`` (``__key__``, ``__url__``) are ignored.
    """
    images: dict[int, dict[str, Any]] = {}
    for key, value in sample.items():
        match = _FIELD_RE.match(key)
        if match:
            images.setdefault(int(match.group(1)), {})[match.group(2)] = value
    return sample.get(GROUP), [images[i] for i in sorted(images)]
