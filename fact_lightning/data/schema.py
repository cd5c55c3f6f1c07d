"""The fields of a shard sample, shared by ``fact-data build`` (writer) and the training data pipeline (reader).

The files of a dataset folder, the group-sample layout and its reading and writing live in :mod:`shards`.
Each webdataset sample is one *identity group*: up to ``max_per_group`` images of one person. Its key is
``{shard:06d}_{group:04d}`` and it holds ``group.json`` plus, for image ``i`` (two digits), the fields
``{i:02d}.crop.jpg``, ``{i:02d}.mask.png``, ``{i:02d}.face.png``, ``{i:02d}.tokens.npy``, ``{i:02d}.meta.json``,
and, in a dataset made with a VAE, ``{i:02d}.latent.npy``.
Those are the only members a sample may hold. Readers decode them only through the one table of member
decoders and checks in :mod:`members` (``members.decode_sample``), never through webdataset's default decoder
table: a member of any other name (``00.extra.pyd``, a pickle) makes the sample damaged and is never decoded.

Bump :data:`FORMAT_VERSION` on any change that a reader could notice. The optional ``latent.npy`` did not
bump it: a reader of version 1 that predates it ignores the extra member and encodes the crop itself, which
gives the same training batches (up to float16 rounding), and a dataset either has it in every image (the
manifest then names the VAE: ``manifest["vae"]``) or in none.
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
IMAGE_FIELDS = (CROP, MASK, FACE, TOKENS, META)  # every image has these
# Optional, in every image or in none: the SD VAE's latent distribution of the decoded CROP (pixels / 127.5 - 1),
# float16 array (2, C, R/8, R/8): [0] the mean, [1] the std of ``vae.encode(x).latent_dist``, as the VAE gives
# them (the scaling factor is NOT applied). manifest["vae"] names the VAE.
LATENT = "latent.npy"

# --- per-group field ------------------------------------------------------------------------------------
GROUP = "group.json"   # {"format_version", "identity", "group_index", "num_images", "sources"}

TOKENS_DTYPE = "float16"
LATENT_DTYPE = "float16"
LATENT_DOWNSAMPLE = 8  # SD VAEs: latents are R/8 x R/8 for an R x R crop
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
    # SDXL's micro-conditioning (``micro_conditioning``); older shards lack them and still read (no version bump).
    "original_size",   # [h, w] of the source image, source pixels
    "crop_top_left",   # [top, left] of crop_box in the source, scaled by resolution / crop side, clamped at 0
)

# manifest.json keys.
MANIFEST_KEYS = (
    "format_version", "tool", "options", "encoder", "detector", "counts", "identities", "shards",
    "rejects_by_reason", "warnings", "vae",
)
# manifest["encoder"]: {"variant", "config", "weights", "weights_sha256", "random", "token_shape", "token_dtype"}
# manifest["counts"]: {"found", "accepted", "rejected", "samples", "images"}
# manifest["shards"]: [{"name", "samples", "images", "sha256"}]
# manifest["vae"]: null (no cached latents), or {"name", "source", "subfolder", "revision", "seed", "weights_sha256",
#   "scaling_factor", "latent_shape", "latent_dtype"}: "name" is what training compares with its model's VAE
#   ("tiny(seed=0)", or the base model's folder or hub id [+ "@revision"]); "weights_sha256" hashes the loaded
#   state dict; "scaling_factor" is the VAE's, recorded and not applied; every shard's stats hold the same "vae".
# manifest["options"]["record"]["resolution"]: the side of the square crops

_FIELD_RE = re.compile(r"^(\d{2})\.(.+)$")
KEY_RE = re.compile(r"^\d{6,}_\d{4,}$")  # a sample's key: {shard:06d}_{group:04d}


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
