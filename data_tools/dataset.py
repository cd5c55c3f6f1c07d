"""Reading built datasets: raw sample iteration, `inspect` checks and shard-level identity verification."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fact_lightning.data import schema

logger = logging.getLogger(__name__)


class ShardError(Exception):
    """A shard that cannot be read to its end (truncated, corrupt, malformed sample)."""


def iter_raw_samples(path: Path) -> Iterator[dict[str, bytes]]:
    """Samples of a webdataset tar as dicts of raw bytes (``__key__`` included), in file order.

    Raises ShardError naming the shard on truncation or corruption.
    """
    path = Path(path)
    current: dict[str, bytes] | None = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, fieldname = member.name.partition(".")
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj is not None else b""
                if len(data) != member.size:
                    raise ShardError(f"{path.name}: member {member.name} is truncated")
                current[fieldname] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"{path.name}: unreadable tar ({type(exc).__name__}: {exc})") from None
    if current is not None:
        yield current


def check_sample(sample: dict[str, bytes]) -> int:
    """Validate one group sample; returns its image count. Raises ValueError describing the problem."""
    key = sample["__key__"]
    if schema.GROUP not in sample:
        raise ValueError(f"sample {key} has no {schema.GROUP}")
    group = json.loads(sample[schema.GROUP])
    _, images = schema.split_group(sample)
    if len(images) != group["num_images"]:
        raise ValueError(f"sample {key}: {len(images)} images, group.json says {group['num_images']}")
    for i, image in enumerate(images):
        missing = [f for f in schema.IMAGE_FIELDS if f not in image]
        if missing:
            raise ValueError(f"sample {key} image {i}: missing {missing}")
        tokens = np.load(io.BytesIO(image[schema.TOKENS]), allow_pickle=False)
        if tokens.dtype != np.float16 or tokens.ndim != 2:
            raise ValueError(f"sample {key} image {i}: tokens {tokens.dtype} {tokens.shape}")
        json.loads(image[schema.META])
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


def inspect_dataset(root: Path) -> DatasetReport:
    """Read every shard to its end and compare with manifest.json; never raises for bad shards."""
    root = Path(root)
    manifest_path = root / schema.MANIFEST_NAME
    manifest = None
    report = DatasetReport(str(root), None)
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            report.problems.append(f"manifest.json is not valid JSON ({exc.msg})")
    else:
        report.problems.append("no manifest.json: the build did not finish (run `fact-data build` again to resume)")
    report.manifest = manifest
    if manifest and manifest.get("format_version") != schema.FORMAT_VERSION:
        report.problems.append(f"format version {manifest.get('format_version')} != supported {schema.FORMAT_VERSION}")
    listed = {s["name"]: s for s in (manifest or {}).get("shards", [])}
    on_disk = sorted(p.name for p in root.glob("shard-*.tar"))
    for leftover in sorted(root.glob("*.tmp")):
        report.problems.append(f"leftover temporary file {leftover.name} (interrupted build)")
    for name in sorted(set(listed) - set(on_disk)):
        report.problems.append(f"{name} is listed in the manifest but missing")
    for name in on_disk:
        shard = ShardReport(name, True)
        try:
            for sample in iter_raw_samples(root / name):
                shard.images += check_sample(sample)
                shard.samples += 1
        except (ShardError, ValueError, KeyError) as exc:
            shard.ok, shard.error = False, str(exc)
        if shard.ok and name in listed and (listed[name]["samples"], listed[name]["images"]) != (shard.samples, shard.images):
            shard.ok = False
            shard.error = (f"{shard.samples} samples / {shard.images} images, manifest says "
                           f"{listed[name]['samples']} / {listed[name]['images']}")
        report.shards.append(shard)
    return report


def iter_images(root: Path) -> Iterator[tuple[dict, dict]]:
    """(group, image) pairs over all readable shards; image fields decoded: crop/mask/face as numpy
    arrays, tokens as float16 array, meta as dict."""
    for path in sorted(Path(root).glob("shard-*.tar")):
        for sample in iter_raw_samples(path):
            group_raw, images = schema.split_group(sample)
            group = json.loads(group_raw)
            for image in images:
                yield group, {
                    schema.CROP: np.asarray(Image.open(io.BytesIO(image[schema.CROP])).convert("RGB")),
                    schema.MASK: np.asarray(Image.open(io.BytesIO(image[schema.MASK])).convert("L")),
                    schema.FACE: np.asarray(Image.open(io.BytesIO(image[schema.FACE])).convert("RGB")),
                    schema.TOKENS: np.load(io.BytesIO(image[schema.TOKENS]), allow_pickle=False),
                    schema.META: json.loads(image[schema.META]),
                }


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
