"""The dataset folder that ``fact-data build`` writes and training reads: the one owner of its files.

File names, the identity-group sample layout, the atomic tar writer, per-shard stats, ``manifest.json``
and ``rejects.jsonl``, manifest checks, and reading raw samples back with webdataset's own tar stages. What a
sample's members may hold and how each is decoded is :mod:`members`.
Field names and dtypes inside a sample live in :mod:`schema`. A dataset directory holds::

    shard-000000.tar ...        webdataset tar shards, one sample per identity group
    shard-000000.stats.json ... per-shard stats, written after the tar is complete (the resume marker)
    manifest.json               written last: options, encoder, counts, shard list with sha256
    rejects.jsonl               one line per input that did not make it, with its reason

A manifest is valid only together with the stats of the shards it lists: a build that rewrites a shard
removes its old tar and stats first, so a reader finds out when a re-build stopped half-way.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import TMP_SUFFIX as _TMP
from ..files import atomic_open, sha256_file, write_bytes_atomic, write_json_atomic
from . import schema

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-{index:06d}.tar"
STATS_PATTERN = "shard-{index:06d}.stats.json"
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
TMP_SUFFIX = _TMP  # a file still being written
LOCK_NAME = ".fact-data.lock"  # held (flock) by a running build
SHARD_FILE_RE = re.compile(r"^shard-\d{6}(\.tar|\.stats\.json)(\.tmp)?$")
TAR_MTIME = 0.0  # members carry a fixed mtime, owner and mode: the same samples always give the same bytes


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index=index)


def stats_name(index: int) -> str:
    return STATS_PATTERN.format(index=index)


def stats_name_for(shard: str) -> str:
    """``shard-000003.tar`` -> ``shard-000003.stats.json``."""
    return shard[: -len(".tar")] + ".stats.json"


# --- writing -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageFields:
    """One image of a group sample, encoded: see :mod:`schema` for what each field holds."""

    crop_jpg: bytes
    mask_png: bytes
    face_png: bytes
    tokens: np.ndarray  # (N, D), stored as float16
    meta: dict
    latent: np.ndarray | None = None  # (2, C, h, w): the VAE's latent mean and std, stored as float16


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def group_sample(key: str, identity: str, group_index: int, images: Sequence[ImageFields]) -> dict[str, bytes]:
    """One webdataset sample (all values bytes) for an identity group: per-image fields and ``group.json``."""
    sample: dict[str, bytes] = {"__key__": key}
    for i, image in enumerate(images):
        sample[schema.image_key(i, schema.CROP)] = image.crop_jpg
        sample[schema.image_key(i, schema.MASK)] = image.mask_png
        sample[schema.image_key(i, schema.FACE)] = image.face_png
        sample[schema.image_key(i, schema.TOKENS)] = npy_bytes(np.asarray(image.tokens).astype(np.float16))
        sample[schema.image_key(i, schema.META)] = json_bytes(image.meta)
        if image.latent is not None:
            sample[schema.image_key(i, schema.LATENT)] = npy_bytes(np.asarray(image.latent).astype(np.float16))
    sample[schema.GROUP] = json_bytes({
        "format_version": schema.FORMAT_VERSION,
        "identity": identity,
        "group_index": group_index,
        "num_images": len(images),
        "sources": [image.meta.get("source") for image in images],
    })
    return sample


class ShardWriter:
    """Context manager writing samples to ``path + '.tmp'``; a clean exit fsyncs it and renames it to ``path``,
    an error (a full disk included) removes it. ``sha256`` and ``tar_bytes`` are set after a clean exit."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0
        self.sha256: str | None = None
        self.tar_bytes: int | None = None

    def __enter__(self) -> ShardWriter:
        import webdataset as wds

        self._atomic = atomic_open(self.path)
        self._file = self._atomic.__enter__()
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME, user="fact", group="fact")
        return self

    def write(self, sample: dict[str, bytes]) -> None:
        self._tar.write(sample)
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._tar.close()  # the tar's end blocks; the file itself stays open for atomic_open
        except BaseException as err:
            if exc_type is None:
                exc_type, exc, tb = type(err), err, err.__traceback__
        if exc_type is not None:
            self._atomic.__exit__(exc_type, exc, tb)  # removes the .tmp and re-raises
            raise exc  # (a close error after a clean body)
        self._atomic.__exit__(None, None, None)
        self.sha256 = sha256_file(self.path)
        self.tar_bytes = self.path.stat().st_size


def write_stats(root: str | Path, index: int, stats: dict) -> None:
    """A shard's stats, written after its tar: the marker that the shard is complete."""
    write_json_atomic(Path(root) / stats_name(index), stats)


def read_stats(root: str | Path, index: int) -> dict | None:
    """A shard's stats, or None when missing or unreadable."""
    path = Path(root) / stats_name(index)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("unreadable stats %s", path)
        return None


def remove_shard(root: str | Path, index: int) -> None:
    """Remove a shard's stats (first) and tar before it is rewritten."""
    for name in (stats_name(index), shard_name(index)):
        (Path(root) / name).unlink(missing_ok=True)


def write_rejects(root: str | Path, rejects: list[dict]) -> None:
    data = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejects)
    write_bytes_atomic(Path(root) / REJECTS_NAME, data.encode("utf-8"))


def write_manifest(root: str | Path, manifest: dict) -> None:
    """Written last: the dataset is complete once manifest.json names its shards."""
    write_json_atomic(Path(root) / MANIFEST_NAME, manifest)


def shard_entry(stats: dict) -> dict:
    """The manifest's line for one shard, from its stats."""
    return {"name": stats["name"], "samples": stats["samples"], "images": stats["images"], "sha256": stats["sha256"]}


# --- reading the manifest ------------------------------------------------------------------------------
class ManifestError(UserError, ValueError):
    """The dataset's manifest does not exist, does not match its shards, or not what the model expects."""


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path} not found: a dataset folder needs the manifest.json that `fact-data build` writes last "
            "(an unfinished build has none)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} does not hold a JSON object")
    problem = _type_problem(manifest)
    if problem:
        raise ManifestError(f"{path}: {problem} (the file was edited or damaged: run `fact-data build` again)")
    return manifest


# The types of the manifest fields readers use (absent fields are the readers' to judge); checked on reading,
# so a string where a count belongs is one error naming the file and the field, not a crash deep in a reader.
_INT, _STR, _DICT, _LIST = (int,), (str,), (dict,), (list,)
_MANIFEST_FIELDS = {"format_version": _INT, "shards": _LIST, "counts": _DICT, "encoder": _DICT, "options": _DICT,
                    "vae": (dict, type(None)), "identities": _DICT, "rejects_by_reason": _DICT, "warnings": _LIST,
                    "resumed_shards": _INT}
_SHARD_FIELDS = {"name": _STR, "samples": _INT, "images": _INT, "sha256": (str, type(None))}
_NESTED_FIELDS = {("encoder", "variant"): _STR, ("encoder", "token_shape"): _LIST, ("vae", "name"): _STR,
                  ("vae", "latent_shape"): _LIST, ("options", "record"): _DICT}


def _wrong(value, types: tuple) -> bool:
    # JSON true is no count: bool is an int to Python, not to a manifest
    return not isinstance(value, types) or (isinstance(value, bool) and bool not in types)


def _type_name(types: tuple) -> str:
    names = {int: "an integer", str: "a string", dict: "an object", list: "a list", type(None): "null"}
    return " or ".join(names[t] for t in types)


def _type_problem(manifest: dict) -> str | None:
    """What in ``manifest`` has the wrong JSON type, or None."""
    def bad(where: str, value, types: tuple) -> str:
        return f"{where} must be {_type_name(types)}, got {type(value).__name__} {json.dumps(value)[:60]}"

    for key, types in _MANIFEST_FIELDS.items():
        if key in manifest and _wrong(manifest[key], types):
            return bad(f"field {key!r}", manifest[key], types)
    for (outer, key), types in _NESTED_FIELDS.items():
        inner = manifest.get(outer) or {}
        if key in inner and _wrong(inner[key], types):
            return bad(f"field {outer}.{key}", inner[key], types)
    for outer, key in (("encoder", "token_shape"), ("vae", "latent_shape")):
        shape = (manifest.get(outer) or {}).get(key) or []
        if any(_wrong(v, _INT) for v in shape):
            return f"field {outer}.{key} must be a list of integers, got {json.dumps(shape)[:60]}"
    resolution = ((manifest.get("options") or {}).get("record") or {}).get("resolution")
    if resolution is not None and _wrong(resolution, _INT):
        return bad("field options.record.resolution", resolution, _INT)
    for name, value in (manifest.get("counts") or {}).items():
        if _wrong(value, _INT):
            return bad(f"field counts.{name}", value, _INT)
    for i, entry in enumerate(manifest.get("shards") or []):
        if not isinstance(entry, dict):
            return bad(f"shards[{i}]", entry, _DICT)
        for key, types in _SHARD_FIELDS.items():
            if key in entry and _wrong(entry[key], types):
                return bad(f"field shards[{i}].{key}", entry[key], types)
        if not isinstance(entry.get("name"), str):
            return f"shards[{i}] has no name"
    return None


def manifest_resolution(manifest: dict) -> int | None:
    """The side of the shards' square crops: ``options.record.resolution``; None if not recorded."""
    value = ((manifest.get("options") or {}).get("record") or {}).get("resolution")
    return int(value) if value is not None else None


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


def same_vae(theirs: str, ours: str) -> bool:
    """Whether two VAE names (``manifest["vae"]["name"]``, ``BaseModelSpec.describe_vae()``) are the same VAE:
    equal strings, or two folders of this machine that resolve to the same one (a ``vae/`` subfolder
    counts as its model's folder)."""
    if theirs == ours:
        return True
    paths = [Path(x).expanduser() for x in (theirs, ours)]
    if not all(p.is_dir() for p in paths):
        return False
    a, b = (p.resolve() for p in paths)
    return (a.parent if a.name == "vae" else a) == (b.parent if b.name == "vae" else b)


def check_latents(manifest: dict, *, vae: str | None, resolution: int | None, source: str = "") -> tuple | None:
    """The (2, C, h, w) shape of the shards' cached latents, or None when they hold none.

    Raises :class:`ManifestError` (one line) when the latents come from another VAE than ``vae`` (the
    model's, ``BaseModelSpec.describe_vae()``; None: unknown, also an error) or do not fit ``resolution``.
    """
    info = manifest.get("vae")
    if not info:
        return None
    where = f" in {source}" if source else ""
    fix = "add the model's with `fact-data add-latents DIR --vae MODEL`, or set data.cached_latents: false"
    if vae is None:
        raise ManifestError(f"the shards{where} hold latents of the VAE {info.get('name')!r} but the model's VAE is "
                            f"unknown: set data.vae (fact-train links it from model.base); or {fix}")
    if not same_vae(str(info.get("name")), vae):
        raise ManifestError(f"the shards{where} hold latents of the VAE {info.get('name')!r}, the model's VAE is "
                            f"{vae!r}: {fix}")
    shape = tuple(info.get("latent_shape") or ())
    theirs = manifest_resolution(manifest)
    side = resolution if resolution is not None else theirs
    if len(shape) != 4 or shape[0] != 2 or (side is not None and (shape[2] * schema.LATENT_DOWNSAMPLE != side
                                                                  or shape[3] * schema.LATENT_DOWNSAMPLE != side)):
        raise ManifestError(f"the shards{where} hold latents of shape {list(shape)} for {theirs} px crops, training "
                            f"reads {resolution} px: set data.cached_latents: false to encode the resized crops")
    return shape


def shard_urls(root: str | Path, manifest: dict) -> list[str]:
    """Paths of the shards the manifest lists, checked to exist and to be the shards it describes (their
    stats record the manifest's sha256; a re-build that stopped half-way leaves them otherwise) and to
    hold the cached latents the manifest names (all of them, or none)."""
    root = Path(root)
    urls, missing, rewritten, mixed = [], [], [], []
    for entry in manifest["shards"]:
        path = root / entry["name"]
        urls.append(str(path))
        if not path.is_file():
            missing.append(entry["name"])
            continue
        stats_path = root / stats_name_for(entry["name"])
        try:
            stats = json.loads(stats_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            stats = {}
        if entry.get("sha256") and stats.get("sha256") != entry["sha256"]:
            rewritten.append(entry["name"])
        elif stats and stats.get("vae") != manifest.get("vae"):
            mixed.append(entry["name"])
    if missing:
        raise ManifestError(f"{len(missing)} shard(s) listed in {root / MANIFEST_NAME} are missing, e.g. "
                            f"{missing[0]} (a re-build stopped half-way? run `fact-data build` again)")
    if rewritten:
        raise ManifestError(f"{len(rewritten)} shard(s) in {root} are not those {MANIFEST_NAME} describes, e.g. "
                            f"{rewritten[0]} (its stats are missing or record another sha256): a re-build stopped "
                            "half-way; run `fact-data build` again")
    if mixed:
        name = (manifest.get("vae") or {}).get("name")
        raise ManifestError(f"{len(mixed)} shard(s) in {root} do not hold the latents {MANIFEST_NAME} names ("
                            f"{'VAE ' + repr(name) if name else 'none'}), e.g. {mixed[0]}: the shards mix datasets "
                            "with and without cached latents; run `fact-data add-latents` or `fact-data build` again")
    return urls


def expected_counts(root: str | Path, manifest: dict) -> dict[str, int]:
    """{shard path: number of groups} from the manifest's shard list."""
    return {str(Path(root) / s["name"]): int(s["samples"]) for s in manifest["shards"] if "samples" in s}


# --- reading samples -------------------------------------------------------------------------------------
class ShardError(UserError):
    """A shard that cannot be read to its end (truncated, corrupt, malformed sample); names the shard."""


def _split_name(fname: str) -> tuple[str, str]:
    """A tar member's (sample key, member name): webdataset's split at the first dot of the base name, except
    that a name without one is kept (as its own sample and member, which the member table then rejects)
    instead of being dropped unseen."""
    from webdataset.tariterators import base_plus_ext

    key, name = base_plus_ext(fname)
    return (key, name) if key is not None else (fname, fname)


def _group_members(files: Iterable[dict], handler) -> Iterator[dict]:
    """webdataset's ``group_by_keys``, with names kept exactly as written (no lower-casing): ``00.CROP.JPG``
    is not a member of the table."""
    from webdataset.tariterators import group_by_keys

    return group_by_keys(files, keys=_split_name, lcase=False, handler=handler)


def tar_samples(urls: Iterable[dict], handler) -> Iterator[dict]:
    """webdataset stage: ``{"url": ...}`` dicts -> raw group samples, as ``wds.tarfile_to_samples`` reads them
    but grouped by :func:`_group_members`; errors go to ``handler``. Nothing is decoded here."""
    from webdataset.tariterators import tar_file_expander, url_opener

    return _group_members(tar_file_expander(url_opener(urls, handler=handler), handler=handler), handler)


def iter_raw_samples(path: str | Path) -> Iterator[dict[str, bytes]]:
    """Samples of a webdataset tar as dicts of raw bytes (``__key__`` and ``__url__`` included), in file
    order, through webdataset's own tar iterator, grouped as training groups them (:func:`tar_samples`).

    Raises ShardError naming the shard on truncation or corruption.
    """
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import tar_file_iterator

    path = Path(path)

    def members(f) -> Iterator[dict]:
        for member in tar_file_iterator(f):
            member["__url__"] = str(path)
            yield member

    try:
        with open(path, "rb") as f:
            yield from _group_members(members(f), reraise_exception)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        reason = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
        raise ShardError(f"{path.name}: unreadable tar ({type(exc).__name__}: {reason})") from None
