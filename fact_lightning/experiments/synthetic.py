"""Synthetic identity-grouped shards in the ``fact-data build`` format, for tests, benchmarks and experiments.

Each identity is a coloured ellipse "face" with a fixed token signature; each of its images puts the face
at another place and size on another background, so the face mask moves from image to image. Nothing
here detects faces: use ``fact-data build`` for real photos. The files are written by
:mod:`fact_lightning.data.shards`, the same code as ``fact-data build``, so the format cannot drift.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..data import schema, shards


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
    """Writes shards, per-shard stats, rejects.jsonl and manifest.json (last) into ``out``; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    all_stats, images_total = [], 0
    groups = [range(i, min(i + groups_per_shard, identities)) for i in range(0, identities, groups_per_shard)]
    for shard_index, members in enumerate(groups):
        counts = {}
        with shards.ShardWriter(out / shards.shard_name(shard_index)) as writer:
            for group_index, identity in enumerate(members):
                colour = rng.uniform(40, 220, 3)
                signature = rng.standard_normal((num_tokens, token_dim)).astype(np.float32)
                name = f"id{identity}"
                fields = []
                for i in range(images_per_identity):
                    image, mask = _image(rng, colour, resolution)
                    tokens = signature + 0.3 * rng.standard_normal(signature.shape).astype(np.float32)
                    face = np.broadcast_to(colour.astype(np.uint8), (schema.FACE_SIZE, schema.FACE_SIZE, 3)).copy()
                    meta = {"identity": name, "caption": f"a photo of person {identity}", "source": f"{name}/{i}"}
                    fields.append(shards.ImageFields(_jpg(image), _png(mask), _png(face), tokens, meta))
                writer.write(shards.group_sample(f"{shard_index:06d}_{group_index:04d}", name, 0, fields))
                counts[name] = {"found": images_per_identity, "accepted": images_per_identity, "groups": 1}
        n = len(members) * images_per_identity
        stats = {"format_version": schema.FORMAT_VERSION, "name": shards.shard_name(shard_index), "found": n,
                 "images": n, "samples": len(members), "identities": counts, "rejects": [],
                 "sha256": writer.sha256, "tar_bytes": writer.tar_bytes}
        shards.write_stats(out, shard_index, stats)
        all_stats.append(stats)
        images_total += n
    manifest = {
        "format_version": schema.FORMAT_VERSION,
        "tool": {"name": "fact_lightning.experiments.synthetic", "version": None},
        "options": {"record": {"resolution": resolution}, "seed": seed},
        "encoder": {"variant": encoder, "random": False, "token_shape": [num_tokens, token_dim],
                    "token_dtype": schema.TOKENS_DTYPE},
        "detector": None,
        "counts": {"found": images_total, "accepted": images_total, "rejected": 0, "samples": identities,
                   "images": images_total, "identities": identities},
        "identities": {k: v for s in all_stats for k, v in s["identities"].items()},
        "shards": [shards.shard_entry(s) for s in all_stats],
        "rejects_by_reason": {},
        "warnings": [],
    }
    shards.write_rejects(out, [])
    shards.write_manifest(out, manifest)
    return manifest
