"""Synthetic identity-grouped shards in the ``fact-data build`` format, for tests, benchmarks and experiments.

Each identity is a coloured ellipse "face" with a fixed token signature; each of its images puts the face
at another place and size on another background, so the face mask moves from image to image. Nothing
here detects faces: use ``fact-data build`` for real photos.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from ..data import schema


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _image(rng: np.random.Generator, colour: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:resolution, 0:resolution] / resolution
    background = rng.uniform(0, 255, (2, 3))
    image = background[0] * (1 - xx[..., None]) + background[1] * xx[..., None]
    cx, cy = rng.uniform(0.35, 0.65, 2)
    rx, ry = rng.uniform(0.12, 0.22), rng.uniform(0.16, 0.28)
    inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    image[inside] = colour + 20 * np.sin(12 * yy[inside])[:, None]
    return image.clip(0, 255).astype(np.uint8), (inside * 255).astype(np.uint8)


def write_synthetic_shards(
    out: str | Path,
    *,
    identities: int = 6,
    images_per_identity: int = 4,
    groups_per_shard: int = 3,
    resolution: int = 128,
    num_tokens: int = 144,
    token_dim: int = 64,
    encoder: str = "tiny",
    seed: int = 0,
) -> dict:
    """Writes shards, per-shard stats and manifest.json (last) into ``out``; returns the manifest."""
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, images_total = [], 0
    groups = [range(i, min(i + groups_per_shard, identities)) for i in range(0, identities, groups_per_shard)]
    for shard_index, members in enumerate(groups):
        name = schema.SHARD_PATTERN.format(index=shard_index)
        with wds.TarWriter(str(out / name), encoder=False) as tar:
            for group_index, identity in enumerate(members):
                colour = rng.uniform(40, 220, 3)
                signature = rng.standard_normal((num_tokens, token_dim)).astype(np.float32)
                sample = {"__key__": f"{shard_index:06d}_{group_index:04d}"}
                for i in range(images_per_identity):
                    image, mask = _image(rng, colour, resolution)
                    tokens = signature + 0.3 * rng.standard_normal(signature.shape).astype(np.float32)
                    face = np.broadcast_to(colour.astype(np.uint8), (schema.FACE_SIZE, schema.FACE_SIZE, 3)).copy()
                    sample[schema.image_key(i, schema.CROP)] = _jpg(image)
                    sample[schema.image_key(i, schema.MASK)] = _png(mask)
                    sample[schema.image_key(i, schema.FACE)] = _png(face)
                    sample[schema.image_key(i, schema.TOKENS)] = _npy(tokens.astype(np.float16))
                    sample[schema.image_key(i, schema.META)] = json.dumps(
                        {"identity": f"id{identity}", "caption": f"a photo of person {identity}", "source": "synthetic"}
                    ).encode()
                sample[schema.GROUP] = json.dumps(
                    {"format_version": schema.FORMAT_VERSION, "identity": f"id{identity}", "group_index": group_index,
                     "num_images": images_per_identity, "sources": []}
                ).encode()
                tar.write(sample)
        count = len(members)
        shards.append({"name": name, "samples": count, "images": count * images_per_identity, "sha256": ""})
        images_total += count * images_per_identity
        (out / (name + schema.STATS_SUFFIX)).write_text(json.dumps(shards[-1]))
    manifest = {
        "format_version": schema.FORMAT_VERSION,
        "tool": "fact_lightning.experiments.synthetic",
        "options": {"resolution": resolution, "seed": seed},
        "encoder": {"variant": encoder, "random": False, "token_shape": [num_tokens, token_dim], "token_dtype": "float16"},
        "detector": None,
        "counts": {"found": images_total, "accepted": images_total, "rejected": 0, "samples": identities, "images": images_total},
        "identities": identities,
        "shards": shards,
        "rejects_by_reason": {},
        "warnings": [],
    }
    (out / schema.MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    (out / schema.REJECTS_NAME).write_text("")
    return manifest
