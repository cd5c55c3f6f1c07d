"""The one table of shard members and their decoders, shared by `fact-data inspect` and training: no other
decoder ever sees a member's bytes. A member the table does not name makes its sample damaged, undecoded."""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import schema
from .shards import ShardError


class SampleError(ValueError):
    """A sample that is not what ``fact-data build`` writes: an unknown member, or one that does not decode or
    does not fit the schema and the manifest. Its one-line message names the shard, the sample key and the member."""


class _Unfit(ValueError):
    """A member's problem, worded to follow its name (``"is empty (0 bytes)"``)."""


@dataclass(frozen=True)
class Expected:
    """What the manifest promises about every sample; None where it records nothing (the schema's own rules
    still apply: float16 and finite arrays, RGB/L images, square crops, masks of the crop's size, 112 px faces)."""

    resolution: int | None = None               # side of the crops (:func:`manifest_resolution`)
    token_shape: tuple[int, ...] | None = None  # manifest["encoder"]["token_shape"]
    latent_shape: tuple[int, ...] | None = None  # manifest["vae"]["latent_shape"]


@dataclass(frozen=True)
class Member:
    kind: str  # what the bytes must be, for messages
    decode: Callable[[bytes, Expected], Any]  # bytes -> checked value; raises on anything else


MAX_SIDE = 8192  # no crop comes near it: a larger header is refused before any pixel is decoded


def _image(data: bytes, fmt: str, mode: str, side: int | None) -> np.ndarray:
    """Pixels of a ``fmt`` image (only that PIL plugin may open it) whose header says ``mode`` and a square of
    ``side`` (any side when None); checked from the header before the pixels are decoded."""
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=[fmt]) as im:
        width, height = im.size
        if im.mode != mode:
            raise _Unfit(f"is mode {im.mode}, expected {mode}")
        if (side is not None and im.size != (side, side)) or width != height or not 0 < width <= MAX_SIDE:
            raise _Unfit(f"is {width}x{height}, expected {f'{side}x{side}' if side else 'a square'}")
        im.load()
        return np.asarray(im)


def _npy(data: bytes) -> np.ndarray:
    """A .npy array, its header checked first: no object dtype (np.load would unpickle it), and exactly the
    bytes its shape says (a forged header cannot make the reader allocate more than the member holds)."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if header is None:
        raise _Unfit(f"is .npy version {version[0]}.{version[1]}, expected 1.0 or 2.0")
    shape, _, dtype = header(f)
    if dtype.hasobject:
        raise _Unfit(f"holds Python objects ({dtype}, a pickle): refused, not loaded")
    size, held = math.prod(shape) * dtype.itemsize, len(data) - f.tell()
    if size != held:
        raise _Unfit(f"header says {dtype} {list(shape)} ({size} bytes), the member holds {held}")
    f.seek(0)
    return np.lib.format.read_array(f, allow_pickle=False)


def _float16(array: np.ndarray, shape: tuple[int, ...] | None, dims: str) -> np.ndarray:
    """``array`` if it is float16, finite, non-empty, of ``shape`` (None: any with len(dims) axes)."""
    if (array.dtype != np.float16 or array.ndim != len(dims) or array.size == 0
            or (shape is not None and tuple(array.shape) != tuple(shape))):
        want = list(shape) if shape is not None else "[" + ", ".join(dims) + "]"
        raise _Unfit(f"is {array.dtype} {list(array.shape)}, expected float16 {want}")
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise _Unfit(f"holds {bad} non-finite value(s) (NaN or inf)")
    return array


def _json_object(data: bytes) -> dict:
    def no_constant(name: str):
        raise _Unfit(f"holds {name}, which is not JSON")

    value = json.loads(data.decode("utf-8"), parse_constant=no_constant)
    if not isinstance(value, dict):
        raise _Unfit(f"is JSON {type(value).__name__}, expected an object")
    return value


def _crop(data: bytes, expected: Expected) -> np.ndarray:
    return _image(data, "JPEG", "RGB", expected.resolution)


def _mask(data: bytes, expected: Expected) -> np.ndarray:
    return _image(data, "PNG", "L", expected.resolution)


def _face(data: bytes, expected: Expected) -> np.ndarray:
    return _image(data, "PNG", "RGB", schema.FACE_SIZE)


def _tokens(data: bytes, expected: Expected) -> np.ndarray:
    return _float16(_npy(data), expected.token_shape, "ND")


def _latent(data: bytes, expected: Expected) -> np.ndarray:
    latent = _float16(_npy(data), expected.latent_shape, "2Chw")
    side = expected.resolution
    if latent.shape[0] != 2 or (side and [s * schema.LATENT_DOWNSAMPLE for s in latent.shape[2:]] != [side, side]):
        hw = f"{side}/{schema.LATENT_DOWNSAMPLE}" if side else "h"
        raise _Unfit(f"is {list(latent.shape)}, expected [2, C, {hw}, {hw}] (mean and std of the crop)")
    if (latent[1] < 0).any():
        raise _Unfit("holds a negative std (latent[1])")
    return latent


def _group(data: bytes, expected: Expected) -> dict:
    group = _json_object(data)
    if group.get("format_version") != schema.FORMAT_VERSION:
        raise _Unfit(f"says format_version {group.get('format_version')!r}, expected {schema.FORMAT_VERSION}")
    n = group.get("num_images")
    if type(n) is not int or n < 1:
        raise _Unfit(f"says num_images {n!r}, expected a count >= 1")
    if not isinstance(group.get("identity"), str):
        raise _Unfit(f"says identity {group.get('identity')!r}, expected a string")
    return group


# Every member a sample may hold, by field name (per image: "03." + name): what it must be and its decoder.
IMAGE_MEMBERS: dict[str, Member] = {
    schema.CROP: Member("a JPEG image", _crop),
    schema.MASK: Member("a PNG image", _mask),
    schema.FACE: Member("a PNG image", _face),
    schema.TOKENS: Member("a .npy array", _tokens),
    schema.META: Member("UTF-8 JSON", lambda data, expected: _json_object(data)),
    schema.LATENT: Member("a .npy array", _latent),
}
GROUP_MEMBERS: dict[str, Member] = {schema.GROUP: Member("UTF-8 JSON", _group)}
_IMAGE_MEMBER_RE = re.compile(r"^(\d{2})\.(.+)$")
_NOT_MEMBERS = frozenset({"__key__", "__url__", "__local_path__"})  # webdataset's own entries in a sample


def member_field(name: str) -> str | None:
    """The field a member suffix names (``"03.crop.jpg"`` -> ``"crop.jpg"``, ``"group.json"``), or None when
    the table has no such member: fact-data never writes it and no reader decodes it."""
    if name in GROUP_MEMBERS:
        return name
    match = _IMAGE_MEMBER_RE.match(name)
    return match.group(2) if match and match.group(2) in IMAGE_MEMBERS else None


def _decode(name: str, data: Any, expected: Expected) -> Any:
    field = member_field(name)
    member = GROUP_MEMBERS.get(field) or IMAGE_MEMBERS[field]
    if not isinstance(data, bytes):
        raise _Unfit(f"is {type(data).__name__}, expected the member's bytes")
    if not data:
        raise _Unfit("is empty (0 bytes)")
    try:
        return member.decode(data, expected)
    except _Unfit:
        raise
    except Exception as exc:  # untrusted bytes: whatever a decoder raises means this member is damaged
        text = " ".join(re.sub(r"<[^>]*>", "", str(exc)).split())[:160]  # PIL names its BytesIO: noise
        raise _Unfit(f"does not decode as {member.kind} ({type(exc).__name__}: {text})") from None


def decode_sample(sample: dict[str, Any], expected: Expected = Expected(), *, images: bool = True,
                  latents: bool = True) -> dict[str, Any]:
    """A raw group sample (member name -> bytes, as webdataset's tar stages give it) decoded and checked through
    the member table; the same keys with decoded values: images as uint8 arrays (crop and face (H, W, 3), mask
    (H, W)), tokens and latents as float16 arrays, JSON members as dicts.

    A member the table does not name makes the whole sample damaged, and nothing of it is decoded. Each image
    must hold every field of ``schema.IMAGE_FIELDS``; its mask must be its crop's size, its latents fit it.
    images=False leaves crop, mask and face undecoded (``inspect --quick``); latents=False drops ``latent.npy``
    undecoded (training that ignores cached latents). Raises :class:`SampleError` naming shard, key and member.
    """
    key = sample.get("__key__")
    shard = Path(str(sample.get("__url__") or "?")).name
    members = {k: v for k, v in sample.items() if k not in _NOT_MEMBERS}

    def fail(name: str, problem: str) -> SampleError:
        return SampleError(f"{shard}: sample {key}: {name} {problem}")

    unknown = sorted(name for name in members if member_field(name) is None)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise fail(unknown[0], f"is not a member fact-data writes: not decoded, the sample is damaged{more}")
    if not isinstance(key, str) or not schema.KEY_RE.match(key):
        raise SampleError(f"{shard}: sample key {key!r} is not the {{shard}}_{{group}} key fact-data writes")
    if schema.GROUP not in members:
        raise fail(schema.GROUP, "is missing")

    def decoded(name: str, exp: Expected) -> Any:
        try:
            return _decode(name, members[name], exp)
        except _Unfit as err:
            raise fail(name, str(err)) from None

    out: dict[str, Any] = {"__key__": key, "__url__": sample.get("__url__")}
    group = out[schema.GROUP] = decoded(schema.GROUP, expected)
    indices = sorted({int(name[:2]) for name in members if name != schema.GROUP})
    if indices != list(range(group["num_images"])):
        raise fail(schema.GROUP, f"says {group['num_images']} image(s), the sample holds images {indices}")
    for i in indices:
        missing = [f for f in schema.IMAGE_FIELDS if schema.image_key(i, f) not in members]
        if missing:
            raise fail(schema.image_key(i, missing[0]), "is missing")
        exp = expected
        for field in (schema.CROP, schema.MASK, schema.FACE, schema.TOKENS, schema.META, schema.LATENT):
            name = schema.image_key(i, field)
            if name not in members or (field == schema.LATENT and not latents):
                continue
            if field in (schema.CROP, schema.MASK, schema.FACE) and not images:
                if not members[name]:
                    raise fail(name, "is empty (0 bytes)")
                out[name] = members[name]
                continue
            out[name] = decoded(name, exp)
            if field == schema.CROP:  # the mask and the latents must fit this crop
                exp = replace(expected, resolution=out[name].shape[0])
    return out


def check_member_names(path: str | Path) -> None:
    """Raises ShardError naming the first tar member that fact-data does not write: not a regular file, a name
    that is not ``{key}.{member of the table}``, or a name written twice. Reads headers only. (webdataset's tar
    reader drops some of these silently, so :func:`decode_sample` alone would not see them.)"""
    path = Path(path)
    seen: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, _, name = info.name.partition(".")
                if not info.isreg():
                    problem = "is not a regular file"
                elif not schema.KEY_RE.match(key) or member_field(name) is None:
                    problem = "is not a member fact-data writes"
                elif info.name in seen:
                    problem = "is written twice"
                else:
                    seen.add(info.name)
                    continue
                raise ShardError(f"{path.name}: tar member {info.name!r} {problem}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"{path.name}: unreadable tar ({type(exc).__name__}: {exc})") from None
