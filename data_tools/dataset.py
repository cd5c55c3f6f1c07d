"""Reading built datasets: `inspect` checks, decoded images for previews, shard-level identity verification.

Raw samples come from :func:`fact_lightning.data.shards.iter_raw_samples` (webdataset's tar stages); a
shard that cannot be read, or a member that cannot be decoded, raises ShardError naming the shard.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fact_lightning.data import schema, shards
from fact_lightning.data.shards import ShardError, iter_raw_samples
from fact_lightning.files import sha256_file

__all__ = ["ShardError", "check_sample", "inspect_dataset", "iter_images", "verify_dataset"]


def _image(data: bytes, mode: str, what: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode != mode:
                raise ValueError(f"{what} is {im.mode}, expected {mode}")
            return np.asarray(im)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{what} does not decode ({type(exc).__name__}: {exc})") from None


def _tokens(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{what} is not a .npy array ({exc})") from None


def _json(data: bytes, what: str) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def decode_image_fields(image: dict[str, bytes], where: str) -> dict:
    """One image's raw fields -> crop/mask/face arrays, float16 tokens, meta dict; ValueError names the field."""
    return {
        schema.CROP: _image(image[schema.CROP], "RGB", f"{where} {schema.CROP}"),
        schema.MASK: _image(image[schema.MASK], "L", f"{where} {schema.MASK}"),
        schema.FACE: _image(image[schema.FACE], "RGB", f"{where} {schema.FACE}"),
        schema.TOKENS: _tokens(image[schema.TOKENS], f"{where} {schema.TOKENS}"),
        schema.META: _json(image[schema.META], f"{where} {schema.META}"),
    }


def check_sample(sample: dict[str, bytes], token_shape: list[int] | None = None, resolution: int | None = None,
                 decode: bool = True, latent_shape: list[int] | None = None) -> int:
    """Validate one group sample; returns its image count. Raises ValueError describing the problem.

    latent_shape: the cached latents' shape (``manifest["vae"]["latent_shape"]``), which every image must
    then hold as float16; None: no image may hold latents.

    decode: also decode every image and check sizes (``crop`` and ``mask`` ``resolution`` square, ``face``
    112 square); without it only the structure, tokens and JSON are checked.
    """
    key = sample["__key__"]
    if schema.GROUP not in sample:
        raise ValueError(f"sample {key} has no {schema.GROUP}")
    group = _json(sample[schema.GROUP], f"sample {key} {schema.GROUP}")
    _, images = schema.split_group(sample)
    if len(images) != group.get("num_images"):
        raise ValueError(f"sample {key}: {len(images)} images, group.json says {group.get('num_images')}")
    for i, image in enumerate(images):
        where = f"sample {key} image {i}"
        missing = [f for f in schema.IMAGE_FIELDS if f not in image]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        tokens = _tokens(image[schema.TOKENS], f"{where} {schema.TOKENS}")
        if tokens.dtype != np.float16 or tokens.ndim != 2 or (token_shape and list(tokens.shape) != list(token_shape)):
            raise ValueError(f"{where}: tokens {tokens.dtype} {list(tokens.shape)}, expected float16 "
                             f"{token_shape or '(N, D)'}")
        _json(image[schema.META], f"{where} {schema.META}")
        if latent_shape is None and schema.LATENT in image:
            raise ValueError(f"{where}: has cached latents but the manifest names no VAE")
        if latent_shape is not None:
            if schema.LATENT not in image:
                raise ValueError(f"{where}: no cached latents ({schema.LATENT}) but the manifest names a VAE")
            latent = _tokens(image[schema.LATENT], f"{where} {schema.LATENT}")
            if latent.dtype != np.float16 or list(latent.shape) != list(latent_shape):
                raise ValueError(f"{where}: latents {latent.dtype} {list(latent.shape)}, expected float16 "
                                 f"{list(latent_shape)}")
        if decode:
            fields = decode_image_fields(image, where)
            crop, mask, face = fields[schema.CROP], fields[schema.MASK], fields[schema.FACE]
            side = resolution or crop.shape[0]
            if crop.shape[:2] != (side, side) or mask.shape != (side, side):
                raise ValueError(f"{where}: crop {crop.shape[1]}x{crop.shape[0]}, mask {mask.shape[1]}x"
                                 f"{mask.shape[0]}, expected {side}x{side}")
            if face.shape[:2] != (schema.FACE_SIZE, schema.FACE_SIZE):
                raise ValueError(f"{where}: face {face.shape[1]}x{face.shape[0]}, expected "
                                 f"{schema.FACE_SIZE}x{schema.FACE_SIZE}")
    return len(images)


@dataclass
class ShardReport:
    name: str
    ok: bool
    samples: int = 0
    images: int = 0
    error: str = ""


@dataclass
class DatasetReport:
    path: str
    manifest: dict | None
    shards: list[ShardReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(s.ok for s in self.shards)


def _load_manifest(root: Path, report: DatasetReport) -> dict | None:
    if not (root / shards.MANIFEST_NAME).is_file():
        report.problems.append("no manifest.json: the build did not finish (run `fact-data build` again to resume)")
        return None
    try:
        manifest = shards.read_manifest(root)
    except shards.ManifestError as exc:
        report.problems.append(str(exc))
        return None
    if manifest.get("format_version") != schema.FORMAT_VERSION:
        report.problems.append(f"format version {manifest.get('format_version')} != supported {schema.FORMAT_VERSION}")
    return manifest


def _check_shard(path: Path, listed: dict | None, token_shape, resolution, quick: bool,
                 latent_shape=None) -> ShardReport:
    shard = ShardReport(path.name, True)
    if listed is not None and listed.get("sha256") and sha256_file(path) != listed["sha256"]:
        shard.ok, shard.error = False, "sha256 differs from the manifest (damaged or rewritten)"
        return shard
    try:
        for sample in iter_raw_samples(path):
            shard.images += check_sample(sample, token_shape, resolution, decode=not quick, latent_shape=latent_shape)
            shard.samples += 1
    except (ShardError, ValueError, KeyError) as exc:
        shard.ok, shard.error = False, str(exc)
        return shard
    if listed is not None and (listed["samples"], listed["images"]) != (shard.samples, shard.images):
        shard.ok = False
        shard.error = (f"{shard.samples} samples / {shard.images} images, manifest says "
                       f"{listed['samples']} / {listed['images']}")
    return shard


def inspect_dataset(root: Path, quick: bool = False) -> DatasetReport:
    """Check every shard against manifest.json: its sha256, every sample's structure, token shape and cached
    latents (all images or none, as ``manifest["vae"]`` says), and (unless ``quick``) every decoded image's
    size; never raises for bad shards."""
    root = Path(root)
    report = DatasetReport(str(root), None)
    manifest = report.manifest = _load_manifest(root, report)
    listed = {s["name"]: s for s in (manifest or {}).get("shards", [])}
    token_shape = ((manifest or {}).get("encoder") or {}).get("token_shape")
    resolution = shards.manifest_resolution(manifest or {})
    latent_shape = ((manifest or {}).get("vae") or {}).get("latent_shape")
    on_disk = sorted(p.name for p in root.glob("shard-*.tar"))
    for leftover in sorted(root.glob("*" + shards.TMP_SUFFIX)):
        report.problems.append(f"leftover temporary file {leftover.name} (interrupted build)")
    for name in sorted(set(listed) - set(on_disk)):
        report.problems.append(f"{name} is listed in the manifest but missing")
    for name in on_disk:
        report.shards.append(_check_shard(root / name, listed.get(name), token_shape, resolution, quick, latent_shape))
    return report


def iter_images(root: Path) -> Iterator[tuple[dict, dict]]:
    """(group, image) pairs over all shards; image fields decoded: crop/mask/face as numpy arrays, tokens as
    float16 array, meta as dict. Raises ShardError naming the shard for anything that does not decode."""
    for path in sorted(Path(root).glob("shard-*.tar")):
        for sample in iter_raw_samples(path):
            try:
                group_raw, images = schema.split_group(sample)
                group = _json(group_raw or b"", f"sample {sample['__key__']} {schema.GROUP}")
                decoded = [decode_image_fields(image, f"sample {sample['__key__']} image {i}")
                           for i, image in enumerate(images)]
            except (ValueError, KeyError) as exc:
                raise ShardError(f"{path.name}: {exc}") from None
            for image in decoded:
                yield group, image


def verify_dataset(root: Path, embedder=None, threshold: float | None = None) -> list[dict]:
    """Identity check over built shards with the dlib embedder (on each training crop and its face box).

    Returns one row per image: identity, source, distance, ok.
    """
    from fact_lightning.faces import identity as ident

    embedder = embedder or ident.DlibEmbedder()
    threshold = threshold or embedder.threshold
    per_id: dict[str, list[tuple[str, np.ndarray]]] = {}
    for group, image in iter_images(root):
        emb = embedder.embed_image(image[schema.CROP], image[schema.META]["crop_bbox"])
        per_id.setdefault(group["identity"], []).append((image[schema.META]["source"], emb))
    rows = []
    for name in sorted(per_id):
        entries = per_id[name]
        for (source, _), check in zip(entries, ident.check_identity([e for _, e in entries], threshold, embedder.metric)):
            rows.append({"identity": name, "source": source, "distance": check.distance, "ok": check.ok,
                         "model": embedder.name, "threshold": threshold})
    return rows
