"""Reading ``fact-data build`` shards for training: manifest checks and webdataset stages.

Stage order (as open_clip's ``data.py``): shard list (resampled with a deterministic per-rank/worker seed,
or a fixed list split by node then by worker) -> tar reading with a skip-and-count handler -> group
shuffle buffer -> decode -> identity groups expanded into (target, paired reference, shuffled reference)
samples -> sample shuffle buffer -> tensors. Every stage is a picklable generator or callable, so
DataLoader workers can run them.

A training sample (the dict that ``to_tensors`` returns, batched by the default collate):
    key               str, ``{group key}/{image index:02d}``
    pixels            (3, R, R) float32 in [-1, 1]: the training crop
    mask              (1, R, R) float32 in [0, 1]: its face mask
    face              (3, 112, 112) float32 in [0, 1]: the aligned reference face (for image logs)
    tokens            (N, D) float32: the paired reference's face-encoder tokens
    shuffled_tokens   (N, D) float32: tokens of another image of the same identity (its own if none)
    shuffle_available bool: whether the identity has another image
    caption           str
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from . import schema

log = logging.getLogger(__name__)

REQUIRED_FIELDS = (schema.CROP, schema.MASK, schema.FACE, schema.TOKENS)


class ManifestError(ValueError):
    """The dataset's manifest does not exist or does not match what the model expects."""


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / schema.MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path} not found: a dataset folder needs the manifest.json that `fact-data build` writes last "
            "(an unfinished build has none)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from err


def check_manifest(manifest: dict, *, token_dim: int | None = None, encoder: str | None = None, source: str = "") -> None:
    """Raises :class:`ManifestError` naming every mismatch between the shards and the model's expectations.

    token_dim: the projection's input width (``ResamplerConfig.token_dim``); encoder: the expected
    ``manifest["encoder"]["variant"]`` (e.g. ``"S"`` for TransFace-S), or None to accept any.
    """
    where = f" in {source}" if source else ""
    problems = []
    version = manifest.get("format_version")
    if version != schema.FORMAT_VERSION:
        problems.append(f"format_version is {version!r}, this reader expects {schema.FORMAT_VERSION}")
    enc = manifest.get("encoder") or {}
    if encoder is not None and enc.get("variant") != encoder:
        problems.append(f"encoder variant is {enc.get('variant')!r}, the config expects {encoder!r}")
    shape = enc.get("token_shape")
    if token_dim is not None and (not shape or shape[-1] != token_dim):
        problems.append(f"token shape is {shape}, the projection expects tokens of width {token_dim}")
    if not manifest.get("shards"):
        problems.append("the manifest lists no shards")
    if problems:
        raise ManifestError(f"dataset manifest{where} does not match: " + "; ".join(problems))
    if enc.get("random"):
        log.warning("the shards%s were encoded with a random-weight face encoder: fine for tests, useless for real training", where)


def shard_urls(root: str | Path, manifest: dict) -> list[str]:
    """Paths of the shards the manifest lists, checked to exist."""
    root = Path(root)
    urls = [str(root / s["name"]) for s in manifest["shards"]]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ManifestError(f"{len(missing)} shard(s) listed in {root / schema.MANIFEST_NAME} are missing, e.g. {missing[0]}")
    return urls


class SkipAndCount:
    """A webdataset error handler that skips the bad sample or shard, counts it and warns naming its source.

    Picklable: each DataLoader worker counts in its own copy (``to_tensors`` reports that count per sample).
    """

    def __init__(self) -> None:
        self.count = 0
        self.sources: list[str] = []

    def __call__(self, exn: BaseException) -> bool:
        self.count += 1
        source = next((str(a) for a in reversed(getattr(exn, "args", ())) if isinstance(a, str) and ".tar" in a), "?")
        self.sources.append(source)
        log.warning("skipping unreadable data from %s (%s: %s); %d skipped so far in this reader",
                    source, type(exn).__name__, exn.args[0] if exn.args else "", self.count)
        return True


@dataclass
class CheckShardCounts:
    """Stage: counts the groups read from each shard and reports a shard that ends short of its manifest count.

    Python's tar reader ends a truncated stream silently, so a short count is how a cut shard shows up.
    """

    expected: dict[str, int]
    handler: SkipAndCount

    def __call__(self, groups: Iterable[dict]) -> Iterator[dict]:
        url, seen = None, 0
        for group in groups:
            if group.get("__url__") != url:
                self._check(url, seen)
                url, seen = group.get("__url__"), 0
            seen += 1
            yield group
        self._check(url, seen)

    def _check(self, url: str | None, seen: int) -> None:
        want = self.expected.get(str(url)) if url is not None else None
        if want is not None and seen < want:
            self.handler(EOFError(f"shard ended after {seen} of {want} groups (truncated?)", str(url)))


@dataclass
class ExpandGroups:
    """Stage: one decoded identity group -> one sample per image, each with a shuffled same-identity partner."""

    handler: SkipAndCount
    seed: int = 0

    def __call__(self, groups: Iterable[dict]) -> Iterator[dict]:
        rng = random.Random(self.seed)
        for group in groups:
            try:
                images = _complete_images(group)
            except ValueError as err:
                err.args = (*err.args, str(group.get("__url__", "?")))
                self.handler(err)
                continue
            for i, image in enumerate(images):
                others = [j for j in range(len(images)) if j != i]
                partner = images[rng.choice(others)] if others else image
                key = f"{group['__key__']}/{i:02d}"
                yield {
                    "__key__": key,
                    "key": key,
                    "image": image,
                    "partner_tokens": partner[schema.TOKENS],
                    "shuffle_available": bool(others),
                }


def _complete_images(group: dict) -> list[dict]:
    _, images = schema.split_group(group)
    if not images:
        raise ValueError(f"group {group.get('__key__')} holds no images")
    for i, image in enumerate(images):
        missing = [f for f in REQUIRED_FIELDS if f not in image]
        if missing:
            raise ValueError(f"group {group.get('__key__')} image {i} lacks {missing}")
    return images


@dataclass
class ToTensors:
    """Stage: an expanded sample (PIL images, numpy tokens) -> the training dict described in the module doc."""

    resolution: int
    handler: SkipAndCount | None = None

    def __call__(self, sample: dict) -> dict:
        from PIL import Image

        image = sample["image"]
        crop = image[schema.CROP].convert("RGB")
        mask = image[schema.MASK].convert("L")
        if crop.size != (self.resolution, self.resolution):
            crop = crop.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
            mask = mask.resize((self.resolution, self.resolution), Image.Resampling.BILINEAR)
        meta = image.get(schema.META) or {}
        return {
            "key": sample["key"],
            "pixels": torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0,
            "mask": torch.from_numpy(np.asarray(mask, dtype=np.float32))[None] / 255.0,
            "face": torch.from_numpy(np.asarray(image[schema.FACE].convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255.0,
            "tokens": torch.from_numpy(np.asarray(image[schema.TOKENS], dtype=np.float32)),
            "shuffled_tokens": torch.from_numpy(np.asarray(sample["partner_tokens"], dtype=np.float32)),
            "shuffle_available": torch.tensor(sample["shuffle_available"]),
            "caption": str(meta.get("caption") or ""),
            "data_errors": torch.tensor(self.handler.count if self.handler else 0),
        }


def build_pipeline(
    urls: list[str],
    *,
    resolution: int,
    resampled: bool = True,
    shuffle_groups: int = 100,
    shuffle_samples: int = 200,
    seed: int = 0,
    handler: SkipAndCount | None = None,
    epoch_samples: int | None = None,
    split: bool = True,
    expected_counts: dict[str, int] | None = None,
):
    """The training ``wds.DataPipeline``: an IterableDataset of sample dicts (infinite when ``resampled``).

    ``resampled`` draws shards with replacement from a seed that is deterministic per (seed, epoch, rank,
    worker), as multi-GPU training needs (no rank runs out first). Otherwise the shard list is split by
    node and then by worker (each rank needs at least one shard per worker). ``epoch_samples`` makes each
    worker's epoch finite.
    """
    import webdataset as wds

    handler = handler or SkipAndCount()
    if resampled:
        stages: list[Any] = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls)] + ([wds.split_by_node, wds.split_by_worker] if split else [])
    stages += [
        wds.tarfile_to_samples(handler=handler),
        CheckShardCounts(expected_counts or {}, handler),
        wds.shuffle(shuffle_groups, initial=min(shuffle_groups, 10), seed=seed) if shuffle_groups > 1 else _identity,
        wds.decode("pil", handler=handler),
        ExpandGroups(handler, seed),
        wds.shuffle(shuffle_samples, initial=min(shuffle_samples, 20), seed=seed) if shuffle_samples > 1 else _identity,
        wds.map(ToTensors(resolution, handler), handler=handler),
    ]
    pipeline = wds.DataPipeline(*stages)
    return pipeline.with_epoch(epoch_samples) if epoch_samples else pipeline


def _identity(src):
    yield from src


def read_all(urls: list[str], *, resolution: int, seed: int = 0, handler: SkipAndCount | None = None,
             expected_counts: dict[str, int] | None = None) -> list[dict]:
    """Every sample of ``urls`` in shard order, decoded in memory (small sets: validation, tests, demos)."""
    return list(build_pipeline(urls, resolution=resolution, resampled=False, shuffle_groups=0, shuffle_samples=0,
                               seed=seed, handler=handler, split=False, expected_counts=expected_counts))


def expected_counts(root: str | Path, manifest: dict) -> dict[str, int]:
    """{shard path: number of groups} from the manifest's shard list."""
    return {str(Path(root) / s["name"]): int(s["samples"]) for s in manifest["shards"] if "samples" in s}
