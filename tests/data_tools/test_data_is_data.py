"""Data is data: a shard member is decoded only by the member table of ``fact_lightning.data.shards``, the one
that `fact-data inspect` and the training reader share. A member the schema does not name is never decoded
(a pickle never runs), and a member that does not fit the schema (NaN, the wrong dtype, shape or size, 0 bytes,
an image that is not what it says) makes its sample damaged: inspect names shard and key, training skips it
and counts it, and yields every other sample."""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.dataset import inspect_dataset, iter_images
from data_tools.latents import run_add_latents
from data_tools.options import AddLatentsOptions, LatentOptions
from dt_helpers import rewrite_shard
from fact_lightning.data import members, schema, shards
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.data.pipeline import SkipAndCount, build_pipeline, read_all
from fact_lightning.experiments.synthetic import write_synthetic_shards
from fact_lightning.files import sha256_file

RES = 64
SHARD = shards.shard_name(0)
VICTIM = "000000_0001"  # the group each attack damages; the other three groups stay good


@pytest.fixture(scope="session")
def clean(tmp_path_factory) -> Path:
    """Written once by the real writers: synthetic shards (2 shards x 2 groups x 2 images), then add-latents."""
    root = tmp_path_factory.mktemp("data_is_data") / "clean"
    write_synthetic_shards(root, identities=4, images_per_identity=2, groups_per_shard=2, resolution=RES)
    run_add_latents(root, AddLatentsOptions(latents=LatentOptions(vae="tiny")))
    return root


# --- payloads -------------------------------------------------------------------------------------------------
class _Touch:
    """Unpickling this calls ``open(marker, "w")``: the marker file exists iff some reader unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _image(mode: str, size: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), 128).save(buf, format=fmt)
    return buf.getvalue()


def _tokens(sample: dict) -> np.ndarray:
    return np.load(io.BytesIO(sample["00.tokens.npy"]), allow_pickle=False)


def _latent(sample: dict) -> np.ndarray:
    return np.load(io.BytesIO(sample["00.latent.npy"]), allow_pickle=False)


def _set(name: str, value):
    def change(sample: dict, marker: Path) -> None:
        sample[name] = value(sample, marker) if callable(value) else value
    return change


def _with_nan(array: np.ndarray, value: float) -> np.ndarray:
    array = array.copy()
    array.flat[3] = value
    return array


def _forged_header(sample: dict, marker: Path) -> bytes:
    """A .npy header that claims a 10^16-element float16 array over 8 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False, "shape": (10**8, 10**8)})
    return buf.getvalue() + bytes(8)


PICKLE = lambda sample, marker: pickle.dumps(_Touch(marker))  # noqa: E731

# name -> (change of the victim group's raw sample, what inspect's message must say)
ATTACKS = {
    # members the schema does not name, each holding a pickle that would create the marker if unpickled
    "pickle_pyd": (_set("00.extra.pyd", PICKLE), "00.extra.pyd"),
    "pickle_ext": (_set("00.extra.pickle", PICKLE), "00.extra.pickle"),
    "torch_pth": (_set("00.weights.pth", PICKLE), "00.weights.pth"),
    "msgpack": (_set("00.extra.mp", PICKLE), "00.extra.mp"),
    "cbor": (_set("00.extra.cbor", PICKLE), "00.extra.cbor"),
    "text": (_set("00.notes.txt", PICKLE), "00.notes.txt"),
    "group_level_pyd": (_set("extra.pyd", PICKLE), "extra.pyd"),
    "known_field_other_ext": (_set("00.tokens.pyd", PICKLE), "00.tokens.pyd"),
    "upper_case_name": (_set("00.CROP.JPG", PICKLE), "00.CROP.JPG"),
    "image_index_past_the_end": (_set("05.tokens.npy", lambda s, m: s["00.tokens.npy"]), "group.json"),
    # known members whose bytes are not what the schema says
    "pickled_object_npy": (_set("00.tokens.npy", lambda s, m: _npy(np.array([_Touch(m)], dtype=object), True)),
                           "00.tokens.npy"),
    "forged_npy_header": (_set("00.tokens.npy", _forged_header), "00.tokens.npy"),
    "nan_tokens": (_set("00.tokens.npy", lambda s, m: _npy(_with_nan(_tokens(s), np.nan))), "non-finite"),
    "inf_tokens": (_set("00.tokens.npy", lambda s, m: _npy(_with_nan(_tokens(s), np.inf))), "non-finite"),
    "empty_tokens": (_set("00.tokens.npy", b""), "0 bytes"),
    "tokens_wrong_shape": (_set("00.tokens.npy", lambda s, m: _npy(np.zeros((144, 32), np.float16))),
                           "00.tokens.npy"),
    "tokens_float32": (_set("00.tokens.npy", lambda s, m: _npy(_tokens(s).astype(np.float32))), "float32"),
    "nan_latents": (_set("01.latent.npy", lambda s, m: _npy(_with_nan(_latent(s), np.nan))), "non-finite"),
    "int64_latents": (_set("00.latent.npy", lambda s, m: _npy(_latent(s).astype(np.int64))), "int64"),
    "latents_wrong_shape": (_set("00.latent.npy", lambda s, m: _npy(np.zeros((2, 4, 4, 4), np.float16))),
                            "00.latent.npy"),
    "empty_mask": (_set("00.mask.png", b""), "0 bytes"),
    "mask_wrong_size": (_set("01.mask.png", _image("L", 10, "PNG")), "01.mask.png is 10x10"),
    "mask_rgb": (_set("00.mask.png", _image("RGB", RES, "PNG")), "00.mask.png is mode RGB"),
    "garbage_jpeg": (_set("00.crop.jpg", b"\xff\xd8\xff" + b"garbage" * 50), "00.crop.jpg does not decode"),
    "truncated_jpeg": (_set("00.crop.jpg", lambda s, m: s["00.crop.jpg"][:200]), "00.crop.jpg does not decode"),
    "crop_grayscale": (_set("00.crop.jpg", _image("L", RES, "JPEG")), "00.crop.jpg is mode L"),
    "crop_wrong_size": (_set("00.crop.jpg", _image("RGB", RES // 2, "JPEG")), "00.crop.jpg is 32x32"),
    "png_as_crop": (_set("00.crop.jpg", _image("RGB", RES, "PNG")), "00.crop.jpg does not decode"),
    "face_wrong_size": (_set("00.face.png", _image("RGB", 100, "PNG")), "00.face.png is 100x100"),
    "meta_not_an_object": (_set("00.meta.json", b"[1, 2]"), "00.meta.json"),
    "meta_nan_constant": (_set("00.meta.json", b'{"caption": NaN}'), "00.meta.json holds NaN"),
    "meta_not_utf8": (_set("00.meta.json", b'{"caption": "caf\xe9"}'), "00.meta.json does not decode"),
    "group_count_wrong": (_set("group.json", lambda s, m: s["group.json"].replace(b'"num_images":2',
                                                                                b'"num_images":3')), "group.json"),
    "missing_face": (lambda s, m: s.pop("00.face.png"), "00.face.png is missing"),
}
# what `inspect --quick` cannot see: it decodes no image
IMAGE_ONLY = {"mask_wrong_size", "mask_rgb", "garbage_jpeg", "truncated_jpeg", "crop_grayscale", "crop_wrong_size",
              "png_as_crop", "face_wrong_size"}


def _rewrite(root: Path, index: int, change, marker: Path) -> None:
    """Rewrite one shard with ``change`` applied to the victim's raw sample (only the content is bad)."""
    rewrite_shard(root, index, lambda sample: change(sample, marker) if sample["__key__"] == VICTIM else None)


def _reader_args(root: Path, handler: SkipAndCount) -> dict:
    manifest = shards.read_manifest(root)
    return dict(resolution=RES, token_shape=tuple(manifest["encoder"]["token_shape"]), handler=handler,
                latent_shape=tuple(manifest["vae"]["latent_shape"]),
                expected_counts=shards.expected_counts(root, manifest))


def _keys(root: Path) -> set[str]:
    return {f"{s['__key__']}/{i:02d}" for p in sorted(root.glob("shard-*.tar")) for s in shards.iter_raw_samples(p)
            for i in range(len(schema.split_group(s)[1]))}


def _read_both_ways(root: Path) -> list[tuple[set[str], int]]:
    """(keys, skip count) of the in-memory reader and of the shuffled streaming pipeline."""
    urls = shards.shard_urls(root, shards.read_manifest(root))
    out = []
    for streaming in (False, True):
        handler = SkipAndCount()
        if streaming:
            samples = list(build_pipeline(urls, resampled=False, shuffle_groups=3, shuffle_samples=5, seed=1,
                                          **_reader_args(root, handler)))
        else:
            samples = read_all(urls, **_reader_args(root, handler))
        assert all(np.isfinite(s["tokens"].numpy()).all() and np.isfinite(s["latent_mean"].numpy()).all()
                   for s in samples)
        out.append(({s["key"] for s in samples}, handler.count))
    return out


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_damaged_member_is_named_by_inspect_and_skipped_and_counted_by_training(clean, tmp_path, attack):
    change, says = ATTACKS[attack]
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    good = {k for k in _keys(root) if not k.startswith(VICTIM + "/")}
    marker = tmp_path / "unpickled"
    _rewrite(root, 0, change, marker)

    report = inspect_dataset(root)
    assert not report.ok
    bad = {s.name: s.error for s in report.shards if not s.ok}
    assert list(bad) == [SHARD] and VICTIM in bad[SHARD] and says in bad[SHARD], bad
    assert "\n" not in bad[SHARD]
    assert inspect_dataset(root, quick=True).ok == (attack in IMAGE_ONLY)

    for keys, skipped in _read_both_ways(root):
        assert keys == good and skipped == 1, (attack, sorted(keys ^ good), skipped)
    assert not marker.exists(), "a reader unpickled a member"


def test_nothing_of_a_damaged_sample_is_decoded(clean, tmp_path, monkeypatch):
    """An unknown member stops the sample before any member of it is decoded."""
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    _rewrite(root, 0, ATTACKS["pickle_pyd"][0], tmp_path / "unpickled")
    sample = next(s for s in shards.iter_raw_samples(root / SHARD) if s["__key__"] == VICTIM)
    calls = []
    for table in ("IMAGE_MEMBERS", "GROUP_MEMBERS"):
        spy = {name: members.Member(m.kind, lambda data, exp, n=name: calls.append(n))
               for name, m in getattr(members, table).items()}
        monkeypatch.setattr(members, table, spy)
    with pytest.raises(members.SampleError, match=rf"^{SHARD}: sample {VICTIM}: 00\.extra\.pyd is not a member"):
        members.decode_sample(sample)
    assert calls == []


def _append(root: Path, info: tarfile.TarInfo, data: bytes | None) -> None:
    """Append one raw tar member after the samples of shard 0 (by hand: ShardWriter writes only samples)."""
    path = root / SHARD
    with tarfile.open(path, "a") as tar:
        tar.addfile(info, io.BytesIO(data) if data is not None else None)
    digest = sha256_file(path)
    shards.write_stats(root, 0, {**shards.read_stats(root, 0), "sha256": digest})
    manifest = shards.read_manifest(root)
    manifest["shards"][0]["sha256"] = digest
    shards.write_manifest(root, manifest)


@pytest.mark.parametrize("member,counted", [
    ("README", True),                    # no extension: webdataset would drop it; our grouping keeps it, to count
    ("__payload__.pyd", True),           # its own sample, key "__payload__"
    ("__payload__", False),              # a webdataset meta name: its tar reader drops it, undecoded
    ("000000_0001.00.link.jpg", False),  # a symlink, not a regular file: never read
])
def test_odd_tar_members_are_never_decoded_and_make_inspect_fail(clean, tmp_path, member, counted):
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    marker = tmp_path / "unpickled"
    info, data = tarfile.TarInfo(member), pickle.dumps(_Touch(marker))
    if "link" in member:
        info.type, info.linkname, data = tarfile.SYMTYPE, "/etc/passwd", None
    else:
        info.size = len(data)
    _append(root, info, data)
    report = inspect_dataset(root)
    bad = {s.name: s.error for s in report.shards if not s.ok}
    assert list(bad) == [SHARD] and repr(member) in bad[SHARD], bad
    for keys, skipped in _read_both_ways(root):
        assert keys == _keys(clean) and skipped == int(counted)
    assert not marker.exists()


@pytest.mark.parametrize("attack", ["pickle_pyd", "nan_latents"])
def test_the_streaming_datamodule_never_batches_a_damaged_group(clean, tmp_path, attack):
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    good = {k for k in _keys(root) if not k.startswith(VICTIM + "/")}
    marker = tmp_path / "unpickled"
    _rewrite(root, 0, ATTACKS[attack][0], marker)
    manifest = shards.read_manifest(root)
    dm = FactDataModule(str(root), batch_size=2, num_workers=0, streaming=True, shuffle_groups=2, shuffle_samples=3,
                        epoch_samples=24, token_dim=64, vae=manifest["vae"]["name"])
    dm.setup("fit")
    seen = {key for batch in dm.train_dataloader() for key in batch["key"]}
    assert seen and seen <= good
    assert dm.skipped >= 1 and not marker.exists()


def test_resizing_readers_still_check_crops_against_the_shards_resolution(clean, tmp_path):
    """A group of consistent 32 px crops and masks in 64 px shards: a resizing reader told the shards'
    resolution skips it; one that is not told has no size to check and resizes it like the rest."""
    root = tmp_path / "data"
    shutil.copytree(clean, root)

    def small(sample: dict, marker: Path) -> None:
        for i in range(2):
            sample[schema.image_key(i, schema.CROP)] = _image("RGB", RES // 2, "JPEG")
            sample[schema.image_key(i, schema.MASK)] = _image("L", RES // 2, "PNG")

    _rewrite(root, 0, small, tmp_path / "unpickled")
    urls = shards.shard_urls(root, shards.read_manifest(root))
    for shard_resolution, skipped in ((RES, 1), (None, 0)):
        handler = SkipAndCount()
        samples = read_all(urls, resolution=48, resize=True, shard_resolution=shard_resolution, handler=handler,
                           ignore_latents=True)
        assert handler.count == skipped and len(samples) == 8 - 2 * skipped
        assert all(s["pixels"].shape == (3, 48, 48) for s in samples)


# --- no regression: everything the writers produce reads back ------------------------------------------------
def test_the_table_names_exactly_the_schema_fields():
    assert set(members.IMAGE_MEMBERS) == {*schema.IMAGE_FIELDS, schema.LATENT}
    assert set(members.GROUP_MEMBERS) == {schema.GROUP}
    assert members.member_field("03.crop.jpg") == schema.CROP and members.member_field("group.json") == schema.GROUP
    assert members.member_field("03.crop.png") is None and members.member_field("crop.jpg") is None


def test_every_member_the_writers_produce_round_trips(clean, built):
    """Synthetic shards with add-latents, and a real `fact-data build` of the fixture photos."""
    out, manifest = built
    for root in (clean, out):
        assert inspect_dataset(root).ok and inspect_dataset(root, quick=True).ok
        names = set()
        for path in sorted(root.glob("shard-*.tar")):
            members.check_member_names(path)
            with tarfile.open(path) as tar:
                names |= {m.name.partition(".")[2] for m in tar}
            for sample in shards.iter_raw_samples(path):
                decoded = members.decode_sample(sample)
                assert set(decoded) == set(sample)
        assert all(members.member_field(n) for n in names)
        assert {members.member_field(n) for n in names} >= {*schema.IMAGE_FIELDS, schema.GROUP}
    handler = SkipAndCount()
    urls = shards.shard_urls(clean, shards.read_manifest(clean))
    assert {s["key"] for s in read_all(urls, **_reader_args(clean, handler))} == _keys(clean)
    assert handler.count == 0
    images = list(iter_images(out))
    assert len(images) == manifest["counts"]["images"]
    assert all(image[schema.CROP].ndim == 3 and image[schema.MASK].ndim == 2 for _, image in images)
