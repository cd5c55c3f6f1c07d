"""Reading built datasets: `inspect` checks, decoded images for previews, shard-level identity verification.

Raw samples come from :func:`fact_lightning.data.shards.iter_raw_samples` (webdataset's tar stages) and are
decoded and checked only by :func:`fact_lightning.data.members.decode_sample`, the member table training reads
through too; a shard that cannot be read, or a member that is unknown or does not decode or fit, is named
with its shard and sample key.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fact_lightning.data import members, schema, shards
from fact_lightning.data.members import SampleError
from fact_lightning.data.shards import ShardError, iter_raw_samples
from fact_lightning.files import sha256_file

__all__ = ["ShardError", "check_sample", "inspect_dataset", "iter_images", "verify_dataset"]


def check_sample(sample: dict[str, bytes], token_shape: list[int] | None = None, resolution: int | None = None,
                 decode: bool = True, latent_shape: list[int] | None = None) -> int:
    """Validate one raw group sample through the member table (``members.decode_sample``); returns its image
    count. Raises SampleError (a ValueError) naming the shard, the sample key and the member.

    latent_shape: the cached latents' shape (``manifest["vae"]["latent_shape"]``), which every image must
    then hold as float16; None: no image may hold latents.

    decode: also decode every image and check sizes (``crop`` and ``mask`` ``resolution`` square, ``face``
    112 square); without it only the member names, the tokens, latents and JSON are checked.
    """
    expected = members.Expected(resolution=resolution, token_shape=tuple(token_shape) if token_shape else None,
                               latent_shape=tuple(latent_shape) if latent_shape else None)
    decoded = members.decode_sample(sample, expected, images=decode)
    _, images = schema.split_group(decoded)
    shard = Path(str(sample.get("__url__") or "?")).name
    for i, image in enumerate(images):
        if (latent_shape is None) == (schema.LATENT in image):  # all images or none, as the manifest says
            problem = ("has cached latents but the manifest names no VAE" if latent_shape is None
                       else "is missing but the manifest names a VAE (cached latents)")
            raise SampleError(f"{shard}: sample {sample['__key__']}: {schema.image_key(i, schema.LATENT)} {problem}")
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
    manifest = shards.read_manifest(root)  # not JSON, or a field of the wrong type: ManifestError, one line
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
        members.check_member_names(path)  # also what webdataset's tar reader drops silently
        for sample in iter_raw_samples(path):
            shard.images += check_sample(sample, token_shape, resolution, decode=not quick, latent_shape=latent_shape)
            shard.samples += 1
    except (ShardError, ValueError) as exc:  # SampleError (a ValueError) names the sample and member
        shard.ok, shard.error = False, str(exc)
        return shard
    if listed is not None and (listed["samples"], listed["images"]) != (shard.samples, shard.images):
        shard.ok = False
        shard.error = (f"{shard.samples} samples / {shard.images} images, manifest says "
                       f"{listed['samples']} / {listed['images']}")
    return shard


def inspect_dataset(root: Path, quick: bool = False) -> DatasetReport:
    """Check every shard against manifest.json: its sha256, that it holds only members fact-data writes, every
    sample's structure, its tokens and cached latents (float16, finite, the manifest's shapes; latents in all
    images or none, as ``manifest["vae"]`` says), and (unless ``quick``) every decoded image's mode and size;
    never raises for bad shards (a manifest.json that is not JSON or holds a field of the wrong type raises
    ManifestError: nothing can be checked against it). The first problem of a shard is reported, naming the
    sample key and member."""
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
                group, images = schema.split_group(members.decode_sample(sample, latents=False))
            except SampleError as exc:  # already names the shard, the sample and the member
                raise ShardError(str(exc)) from None
            yield from ((group, image) for image in images)


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
