"""Reading ``fact-data build`` shards for training: webdataset stages (the files and the manifest: ``shards.py``).

Stage order (as open_clip's ``data.py``): shard list (resampled, or a fixed list split by node then by
worker) -> tar reading with a bounded skip-and-count handler -> group shuffle buffer -> decode and check
every member through the member table of ``shards.py`` (the one `fact-data inspect` uses; never webdataset's
default decoders, so a member the schema does not name is never decoded) -> identity groups expanded into
(target, paired reference, shuffled reference) samples -> sample shuffle buffer -> checked tensors. A
damaged group (an unknown member, a member that does not decode or does not fit the schema or the manifest)
is skipped whole, with its partners, and counted once by the handler. Every stage is a picklable generator
or callable, so DataLoader workers can run them.
Every random choice (shard draw, both shuffle buffers, the partner) is seeded from (seed, start, epoch,
rank, worker): ranks and workers draw different orders, and the same rank draws the same order again.

A training sample (the dict that ``ToTensors`` returns, batched by the default collate):
    key               str, ``{group key}/{image index:02d}``
    pixels            (3, R, R) float32 in [-1, 1]: the training crop
    mask              (1, R, R) float32 in [0, 1]: its face mask
    face              (3, 112, 112) float32 in [0, 1]: the aligned reference face (for image logs)
    tokens            (N, D) float32: the paired reference's face-encoder tokens
    shuffled_tokens   (N, D) float32: tokens of another image of the same identity (its own if none)
    shuffle_available bool: whether the identity has another image
    caption           str
    latent_mean       (C, R/8, R/8) float32: the VAE latent mean of the crop, when the shards cache latents
    latent_std        (C, R/8, R/8) float32: its std (the model then skips the VAE)
    original_size     (2,) float32: SDXL's micro-conditioning, the source photo's (h, w) (``micro_conditioning``)
    crop_top_left     (2,) float32: the crop's (top, left) at the training crop's scale
    micro_conditioning bool: whether the meta recorded them (else the crop's own size and (0, 0))
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ..errors import UserError
from . import micro_conditioning, schema
from .members import Expected, decode_sample
from .shards import ManifestError, tar_samples

log = logging.getLogger(__name__)

_NAMED = re.compile(r"([^\s'\"<>=]+\.tar)\b")


class DataError(UserError):
    """Training data that cannot be read: too many consecutive failures (unreadable or deleted shards)."""


def _source_of(exn: BaseException) -> str:
    """The shard an error came from, as webdataset's stages or ours attach it to the exception's args."""
    for arg in (getattr(exn, "url", None), *reversed(getattr(exn, "args", ()))):
        for text in (arg, getattr(arg, "name", None)):
            if isinstance(text, str) and (match := _NAMED.search(text)):
                return match.group(1)
    return "an unknown shard"


def _message(exn: BaseException) -> str:
    if not exn.args and exn.__cause__ is not None:  # webdataset's DecodingError: the field and its cause
        where = " ".join(str(x) for x in (getattr(exn, "key", None), getattr(exn, "k", None)) if x)
        return f"{where}: {type(exn.__cause__).__name__}: {exn.__cause__}"
    return f"{type(exn).__name__}: {exn.args[0] if exn.args else ''}".split(" @ ")[0]


class SkipAndCount:
    """A webdataset error handler: skips the bad sample or shard, counts it and warns naming its source.

    ``max_consecutive`` failures in a row (no good sample between them: every shard unreadable or deleted)
    raise :class:`DataError` instead of retrying forever. Warnings: the first ``warn_first``, then at most
    one every ``warn_every_s`` seconds with the count since. Memory stays bounded (the last few sources).
    Picklable: each DataLoader worker counts in its own copy (``ToTensors`` reports that count per sample).
    """

    def __init__(self, max_consecutive: int = 100, warn_first: int = 5, warn_every_s: float = 60.0) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive_errors must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.warn_first = warn_first
        self.warn_every_s = warn_every_s
        self.count = 0
        self.consecutive = 0
        self.sources: deque[str] = deque(maxlen=16)
        self._last_warning = float("-inf")
        self._unreported = 0

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, ManifestError):  # shards that do not fit the manifest: no skipping fixes that
            raise exn
        self.count += 1
        self.consecutive += 1
        source = _source_of(exn)
        self.sources.append(source)
        message = _message(exn)
        if self.consecutive >= self.max_consecutive:
            raise DataError(f"{self.consecutive} consecutive data errors, the last from {source} ({message}); "
                            "are the shards readable? (max_consecutive_errors)") from None
        self._unreported += 1
        now = time.monotonic()
        if self.count <= self.warn_first or now - self._last_warning >= self.warn_every_s:
            log.warning("skipping unreadable data from %s (%s); %d skipped in this reader (%d since the last warning)",
                        source, message, self.count, self._unreported)
            self._last_warning, self._unreported = now, 0
        return True

    def ok(self) -> None:
        """A good sample went through: the failures so far were not consecutive."""
        self.consecutive = 0


@dataclass
class StreamSeed:
    """Seeds every random stage from (seed, start, epoch, rank, worker); rank and worker as webdataset reads
    them (``RANK``/``WORLD_SIZE`` or torch.distributed, and the DataLoader worker).

    ``start``: batches this rank consumed before the stream began (set on resume, so a resumed run draws a
    new order instead of replaying the first one).
    """

    seed: int = 0
    start: int = 0

    def rng(self, epoch: int, salt: int) -> random.Random:
        from webdataset.utils import make_seed, pytorch_worker_info

        rank, _, worker, _ = pytorch_worker_info()
        return random.Random(make_seed(self.seed, self.start, epoch, rank, worker, salt))

    def worker_seed(self) -> int:
        """For ``wds.ResampledShards``, which mixes in its own epoch and seed."""
        from webdataset.utils import make_seed, pytorch_worker_info

        rank, _, worker, _ = pytorch_worker_info()
        return make_seed(self.start, rank, worker)


@dataclass
class SeededShuffle:
    """Stage: webdataset's shuffle buffer with an rng from :class:`StreamSeed`, new each epoch."""

    bufsize: int
    initial: int
    seeds: StreamSeed
    salt: int
    epoch: int = -1

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        import webdataset as wds

        self.epoch += 1
        return wds.shuffle(self.bufsize, self.initial, rng=self.seeds.rng(self.epoch, self.salt))(src)


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
class DecodeGroups:
    """Stage (under ``wds.map`` with the handler): a raw group -> its members decoded and checked by
    ``members.decode_sample``; a damaged group raises ``SampleError`` (shard, key, member), skipped and counted.

    latents: False leaves ``latent.npy`` undecoded (training that ignores cached latents).
    """

    expected: Expected = field(default_factory=Expected)
    latents: bool = True

    def __call__(self, sample: dict) -> dict:
        return decode_sample(sample, self.expected, latents=self.latents)


@dataclass
class ExpandGroups:
    """Stage: one decoded, checked identity group (:class:`DecodeGroups`: every image complete) -> one sample
    per image, each with a shuffled same-identity partner."""

    seeds: StreamSeed = field(default_factory=StreamSeed)
    epoch: int = -1

    def __call__(self, groups: Iterable[dict]) -> Iterator[dict]:
        self.epoch += 1
        rng = self.seeds.rng(self.epoch, salt=2)
        for group in groups:
            _, images = schema.split_group(group)
            for i, image in enumerate(images):
                others = [j for j in range(len(images)) if j != i]
                partner = images[rng.choice(others)] if others else image
                key = f"{group['__key__']}/{i:02d}"
                yield {
                    "__key__": key,
                    "__url__": group.get("__url__"),
                    "key": key,
                    "image": image,
                    "partner_tokens": partner[schema.TOKENS],
                    "shuffle_available": bool(others),
                }


@dataclass
class ToTensors:
    """Stage: an expanded sample (uint8 image arrays as :class:`DecodeGroups` gives them, or PIL images; numpy
    tokens) -> the training dict described in the module doc, after checking it against the manifest (crop
    size, mask size, face size, token shape): a sample that does not fit raises ValueError, which the handler
    skips and counts, so it never reaches collation. (In the pipeline DecodeGroups has already checked every
    member; these checks keep the stage safe on its own and apply ``resolution`` after a resize.)

    resize: crops of another size than ``resolution`` are resized (else they are rejected).
    latent_shape: the (2, C, h, w) of the shards' cached latents (``manifest["vae"]``), or None when the
        manifest names none; an image with latents of another shape, or with latents where the manifest
        names none, or without where it names some, raises :class:`ManifestError` naming the shard (not
        skipped: a dataset mixes images with and without latents). In the pipeline, DecodeGroups has already
        skipped and counted a group whose latents are damaged (not float16, not finite, another shape).
    ignore_latents: leave cached latents out of the samples (the model then encodes the crops itself).
    """

    resolution: int
    token_shape: tuple[int, int] | None = None
    resize: bool = False
    handler: SkipAndCount | None = None
    latent_shape: tuple[int, int, int, int] | None = None
    ignore_latents: bool = False

    def __call__(self, sample: dict) -> dict:
        try:
            return self._tensors(sample)
        except ManifestError as err:
            shard = str(sample.get("__url__") or "?").rsplit("/", 1)[-1]
            raise ManifestError(f"{shard}: image {sample.get('key')} {err}") from None
        except (ValueError, TypeError, OSError) as err:  # name the shard for the handler
            err.args = (f"{sample.get('key')}: {err.args[0] if err.args else err}", str(sample.get("__url__")))
            raise

    def _tensors(self, sample: dict) -> dict:
        from PIL import Image

        image = sample["image"]
        crop, mask, face = (_pixels(image[f], mode, f) for f, mode in
                            ((schema.CROP, "RGB"), (schema.MASK, "L"), (schema.FACE, "RGB")))
        if crop.shape[:2] != mask.shape:
            raise ValueError(f"mask {list(mask.shape)} differs from crop {list(crop.shape[:2])}")
        if face.shape[:2] != (schema.FACE_SIZE, schema.FACE_SIZE):
            raise ValueError(f"face {list(face.shape[:2])}, expected {schema.FACE_SIZE}x{schema.FACE_SIZE}")
        side = (self.resolution, self.resolution)
        stored_side = crop.shape[1]
        if crop.shape[:2] != side:
            if not self.resize:
                raise ValueError(f"crop {list(crop.shape[:2])}, expected {list(side)} (resize is off)")
            crop = np.asarray(Image.fromarray(crop).resize(side, Image.Resampling.BICUBIC))
            mask = np.asarray(Image.fromarray(mask).resize(side, Image.Resampling.BILINEAR))
        tokens, partner = (np.asarray(t) for t in (image[schema.TOKENS], sample["partner_tokens"]))
        for name, t in (("tokens", tokens), ("partner tokens", partner)):
            if t.ndim != 2 or (self.token_shape is not None and tuple(t.shape) != tuple(self.token_shape)):
                raise ValueError(f"{name} {list(t.shape)}, expected {list(self.token_shape or ('N', 'D'))}")
        meta = image.get(schema.META) or {}
        original, corner, recorded = micro_conditioning.read(meta, stored_side, self.resolution)
        latents = {} if self.ignore_latents else self._latents(image.get(schema.LATENT), crop.shape[1::-1])
        return {**latents,
            "key": sample["key"],
            "pixels": torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0,
            "mask": torch.from_numpy(np.asarray(mask, dtype=np.float32))[None] / 255.0,
            "face": torch.from_numpy(np.asarray(face, dtype=np.float32)).permute(2, 0, 1) / 255.0,
            "tokens": torch.from_numpy(tokens.astype(np.float32)),
            "shuffled_tokens": torch.from_numpy(partner.astype(np.float32)),
            "shuffle_available": torch.tensor(sample["shuffle_available"]),
            "caption": str(meta.get("caption") or "") if isinstance(meta, dict) else "",
            "original_size": torch.tensor(original), "crop_top_left": torch.tensor(corner),
            "micro_conditioning": torch.tensor(recorded),
            "data_errors": torch.tensor(self.handler.count if self.handler else 0),
        }

    def _latents(self, latent, crop_size: tuple[int, int]) -> dict:
        if self.latent_shape is None:
            if latent is not None:
                raise ManifestError(f"has cached latents ({schema.LATENT}) but the manifest names no VAE")
            return {}
        if latent is None:
            raise ManifestError(f"has no cached latents ({schema.LATENT}) but the manifest names a VAE")
        latent = np.asarray(latent)
        if tuple(latent.shape) != tuple(self.latent_shape):
            raise ManifestError(f"latents {list(latent.shape)}, the manifest says {list(self.latent_shape)}")
        if tuple(crop_size) != tuple(s * schema.LATENT_DOWNSAMPLE for s in latent.shape[:1:-1]):
            raise ManifestError(f"latents {list(latent.shape)} do not fit the crop {crop_size}")
        latent = torch.from_numpy(latent.astype(np.float32))
        return {"latent_mean": latent[0], "latent_std": latent[1]}


def _pixels(value: Any, mode: str, what: str) -> np.ndarray:
    """uint8 pixels of a decoded image: an array (``members.decode_sample``) or a PIL image (converted to ``mode``)."""
    from PIL import Image

    array = np.asarray(value.convert(mode) if isinstance(value, Image.Image) else value)
    channels = (3,) if mode == "RGB" else ()
    if array.dtype != np.uint8 or array.shape[2:] != channels or array.ndim != 2 + len(channels):
        raise ValueError(f"{what} is {array.dtype} {list(array.shape)}, expected a uint8 {mode} image")
    return array


@dataclass
class MarkGood:
    """Stage: every sample that comes out resets the handler's consecutive-failure count."""

    handler: SkipAndCount

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            self.handler.ok()
            yield sample


def build_pipeline(
    urls: list[str],
    *,
    resolution: int,
    token_shape: tuple[int, int] | None = None,
    resize: bool = False,
    resampled: bool = True,
    shuffle_groups: int = 100,
    shuffle_samples: int = 200,
    seed: int | StreamSeed = 0,
    handler: SkipAndCount | None = None,
    epoch_samples: int | None = None,
    split: bool = True,
    expected_counts: dict[str, int] | None = None,
    latent_shape: tuple[int, int, int, int] | None = None,
    ignore_latents: bool = False,
    shard_resolution: int | None = None,
):
    """The training ``wds.DataPipeline``: an IterableDataset of sample dicts (infinite when ``resampled``).

    Every member is decoded and checked by ``members.decode_sample`` against what the caller knows of the
    manifest: crops of ``resolution`` (with ``resize``: of ``shard_resolution``, the manifest's, if given),
    tokens of ``token_shape``, latents of ``latent_shape``.

    ``resampled`` draws shards with replacement, seeded per (seed, start, epoch, rank, worker), as
    multi-GPU training needs (no rank runs out first). Otherwise the shard list is split by node and then
    by worker (each rank needs at least one shard per worker). ``epoch_samples`` makes each worker's epoch
    finite.
    """
    import webdataset as wds

    seeds = seed if isinstance(seed, StreamSeed) else StreamSeed(seed)
    handler = handler or SkipAndCount()
    expected = Expected(resolution=shard_resolution if resize else resolution,
                        token_shape=tuple(token_shape) if token_shape else None,
                        latent_shape=tuple(latent_shape) if latent_shape and not ignore_latents else None)
    if resampled:
        stages: list[Any] = [wds.ResampledShards(urls, seed=seeds.seed, worker_seed=seeds.worker_seed,
                                                 deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls)] + ([wds.split_by_node, wds.split_by_worker] if split else [])
    stages += [
        partial(tar_samples, handler=handler),
        CheckShardCounts(expected_counts or {}, handler),
        SeededShuffle(shuffle_groups, min(shuffle_groups, 10), seeds, salt=1) if shuffle_groups > 1 else _identity,
        wds.map(DecodeGroups(expected, latents=not ignore_latents), handler=handler),
        ExpandGroups(seeds),
        SeededShuffle(shuffle_samples, min(shuffle_samples, 20), seeds, salt=3) if shuffle_samples > 1 else _identity,
        wds.map(ToTensors(resolution, token_shape, resize, handler, latent_shape, ignore_latents), handler=handler),
        MarkGood(handler),
    ]
    pipeline = wds.DataPipeline(*stages)
    return pipeline.with_epoch(epoch_samples) if epoch_samples else pipeline


def _identity(src):
    yield from src


def read_all(urls: list[str], *, resolution: int, token_shape: tuple[int, int] | None = None, resize: bool = False,
             seed: int = 0, handler: SkipAndCount | None = None,
             expected_counts: dict[str, int] | None = None, latent_shape: tuple[int, int, int, int] | None = None,
             ignore_latents: bool = False, shard_resolution: int | None = None) -> list[dict]:
    """Every sample of ``urls`` in shard order, decoded in memory (small sets: validation, tests, demos)."""
    return list(build_pipeline(urls, resolution=resolution, token_shape=token_shape, resize=resize, resampled=False,
                               shuffle_groups=0, shuffle_samples=0, seed=seed, handler=handler, split=False,
                               expected_counts=expected_counts, latent_shape=latent_shape,
                               ignore_latents=ignore_latents, shard_resolution=shard_resolution))
