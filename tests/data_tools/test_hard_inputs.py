"""Every hard input kind, made from a real face photo: odd formats and modes are accepted, the rest
rejected with a reason; a build over all of them never crashes and accounts for every file."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data_tools import records
from fact_lightning.faces import decode
from fact_lightning.faces import reference as face_policy
from data_tools.build import run_build
from data_tools.records import ImageRecord, Reject, RecordOptions, process_item
from data_tools.sources import SourceItem
from fact_lightning.data import shards

from dt_helpers import EDGE, FACE_PHOTO, RAW, build_opts


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def _png_bomb(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature + length/type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def make_accepted(d: Path, face: Image.Image) -> dict[str, Path]:
    """Real face photo in every format / mode a build must accept."""
    d.mkdir(parents=True, exist_ok=True)
    pal_t = face.convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
    pal_t.info["transparency"] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    rotated = face.transpose(Image.Transpose.ROTATE_90)
    sixteen = (np.asarray(face.convert("L"), np.uint16) * 257)
    rgba = face.convert("RGBA")
    alpha = np.full(face.size[::-1], 255, np.uint8)
    alpha[:40] = 0  # transparent band at the top
    rgba.putalpha(Image.fromarray(alpha))
    return {
        "png": _save(face, d / "face.png"),
        "webp": _save(face, d / "face.webp", quality=90),
        "bmp": _save(face, d / "face.bmp"),
        "tiff": _save(face, d / "face.tiff"),
        "gray": _save(face.convert("L"), d / "gray.jpg", quality=90),
        "cmyk": _save(face.convert("CMYK"), d / "cmyk.jpg", quality=90),
        "palette": _save(face.convert("P", palette=Image.Palette.ADAPTIVE), d / "palette.png"),
        "palette_transparency": _save(pal_t, d / "palette_t.png", transparency=255),
        "gray16_png": _save(Image.fromarray(sixteen), d / "gray16.png"),
        "gray16_tiff": _save(Image.fromarray(sixteen), d / "gray16.tiff"),
        "rgba": _save(rgba, d / "rgba.png"),
        "rgba_real": Path(shutil.copy(EDGE / "rgba_32bit.png", d / "rgba_32bit.png")),
        "exif_rotated": _save(rotated, d / "exif_rotated.jpg", exif=exif, quality=90),
    }


def make_rejected(d: Path, face: Image.Image) -> dict[str, tuple[Path, str]]:
    d.mkdir(parents=True, exist_ok=True)
    jpg = (d / "ok.jpg")
    face.save(jpg, quality=90)
    full = jpg.read_bytes()
    jpg.unlink()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    (d / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    face.filter(ImageFilter.GaussianBlur(40)).save(d / "no_face.jpg", quality=90)
    _png_bomb(d / "bomb.png", 30000, 30000)
    shutil.copy(EDGE / "two_people.jpg", d / "two_people.jpg")
    shutil.copy(EDGE / "partial_face.jpg", d / "partial_face.jpg")
    return {
        "truncated": (d / "truncated.jpg", decode.TRUNCATED),
        "empty": (d / "empty.jpg", decode.EMPTY_FILE),
        "text": (d / "text.jpg", decode.NOT_AN_IMAGE),
        "garbage": (d / "garbage.png", decode.NOT_AN_IMAGE),
        "no_face": (d / "no_face.jpg", face_policy.NO_FACE),
        "bomb": (d / "bomb.png", decode.TOO_MANY_PIXELS),
        "two_people": (d / "two_people.jpg", face_policy.SEVERAL_FACES),
        "border": (d / "partial_face.jpg", face_policy.FACE_AT_BORDER),
    }


def _item(path: Path) -> SourceItem:
    return SourceItem("odd", path.name, str(path), "a photo of a person")


@pytest.fixture(scope="module")
def face() -> Image.Image:
    return Image.open(FACE_PHOTO).convert("RGB")


def test_odd_formats_and_modes_are_accepted(tmp_path, face, detector):
    reference = process_item(_item(FACE_PHOTO), detector, RecordOptions())
    assert isinstance(reference, ImageRecord)
    for kind, path in make_accepted(tmp_path, face).items():
        result = process_item(_item(path), detector, RecordOptions())
        assert isinstance(result, ImageRecord), f"{kind}: {result}"
        if kind == "rgba_real":
            continue
        assert result.meta["image_size"] == [face.width, face.height], kind  # EXIF rotation undone
        # Same face found at (nearly) the same place as in the original photo.
        np.testing.assert_allclose(result.meta["bbox"], reference.meta["bbox"], atol=0.06 * face.width,
                                   err_msg=kind)


def test_sixteen_bit_keeps_its_range():
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    decoded = decode.decode_image(buf.getvalue())
    assert decoded.image is not None and decoded.source_mode.startswith("I")
    gray = decoded.image[..., 0].astype(int)
    assert gray.min() == 0 and gray.max() == 255 and 120 < gray.mean() < 135  # scaled, not clipped to white


def test_palette_and_rgba_composite_over_white(face):
    rgba = face.convert("RGBA")
    rgba.putalpha(0)
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert (decode.decode_image(buf.getvalue()).image == 255).all()


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "garbage", "no_face", "bomb", "two_people", "border"])
def test_bad_inputs_are_rejected_with_reason(tmp_path, face, detector, kind):
    path, reason = make_rejected(tmp_path, face)[kind]
    result = process_item(_item(path), detector, RecordOptions())
    assert isinstance(result, Reject) and result.reason == reason, result


def test_pixel_limit_option_and_policies(tmp_path, face, detector):
    item = _item(FACE_PHOTO)
    assert process_item(item, detector, RecordOptions(max_pixels=100_000)).reason == decode.TOO_MANY_PIXELS
    assert process_item(item, detector, RecordOptions(min_face_size=2000)).reason == face_policy.FACE_TOO_SMALL
    assert process_item(item, detector, RecordOptions(min_score=0.999)).reason == face_policy.LOW_SCORE
    # Two equal faces: still rejected with --keep-dominant (no clearly largest face).
    two = _item(EDGE / "two_people.jpg")
    assert process_item(two, detector, RecordOptions(keep_dominant=True)).reason == face_policy.SEVERAL_FACES


def test_keep_dominant_keeps_the_clearly_largest_face(tmp_path, face, detector):
    canvas = Image.new("RGB", (900, 600), (200, 200, 200))
    canvas.paste(face, (40, 40))
    small_face = Image.open(RAW / "fr_obama" / "2.jpg").convert("RGB")
    small_face.thumbnail((260, 260))
    canvas.paste(small_face, (560, 300))
    path = _save(canvas, tmp_path / "dominant.jpg", quality=92)
    assert process_item(_item(path), detector, RecordOptions()).reason == face_policy.SEVERAL_FACES
    kept = process_item(_item(path), detector, RecordOptions(keep_dominant=True))
    assert isinstance(kept, ImageRecord)
    assert kept.meta["bbox"][2] < 40 + face.width  # the big face on the left


def test_build_over_all_hard_inputs_accounts_for_everything(tmp_path, face):
    src = tmp_path / "src"
    accepted = make_accepted(src / "odd_ok", face)
    rejected = make_rejected(src / "odd_bad", face)
    (src / "loose.jpg").write_bytes(FACE_PHOTO.read_bytes())  # no identity folder
    manifest = run_build(build_opts(src, tmp_path / "out", max_per_group=4))
    c = manifest["counts"]
    assert c["found"] == len(accepted) + len(rejected) + 1
    assert c["accepted"] + c["rejected"] == c["found"]
    assert c["accepted"] == len(accepted)
    lines = [json.loads(x) for x in (tmp_path / "out" / shards.REJECTS_NAME).read_text().splitlines()]
    assert len(lines) == c["rejected"]
    by_source = {r["source"]: r["reason"] for r in lines}
    assert by_source["loose.jpg"] == records.NO_IDENTITY
    for path, reason in rejected.values():
        assert by_source[f"odd_bad/{path.name}"] == reason
    assert manifest["identities"]["odd_ok"]["groups"] == 4  # 13 images split into groups of <= 4
