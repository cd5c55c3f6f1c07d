"""SDXL's micro-conditioning: `fact-data build` records each crop's source size and corner, and the training
reader passes them into the batch (older shards without them: the crop's size and (0, 0))."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from dt_helpers import RAW, rewrite_shard
from fact_lightning.data import micro_conditioning, schema, shards
from fact_lightning.data.pipeline import SkipAndCount, read_all

FACT_DATA = str(Path(sys.executable).parent / "fact-data")
RESOLUTION = 96


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Two identities of the fixture photos, built by the console script."""
    src = tmp_path_factory.mktemp("src")
    for name in ("df_1", "df_2"):
        shutil.copytree(RAW / name, src / name)
    out = tmp_path_factory.mktemp("built") / "shards"
    done = subprocess.run([FACT_DATA, "build", "--src", str(src), "--out", str(out), "--encoder", "tiny",
                           "--random-encoder", "--resolution", str(RESOLUTION)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GLOG_minloglevel": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _images(root: Path) -> list[dict]:
    """Every image's raw fields (meta decoded) of the dataset in ``root``."""
    found = []
    for url in shards.shard_urls(root, shards.read_manifest(root)):
        for sample in shards.iter_raw_samples(url):
            _, images = schema.split_group(sample)
            found += [{**image, schema.META: json.loads(image[schema.META])} for image in images]
    return found


def _read(root: Path, resolution: int = RESOLUTION, **kw) -> list[dict]:
    manifest = shards.read_manifest(root)
    return read_all(shards.shard_urls(root, manifest), resolution=resolution, shard_resolution=RESOLUTION, **kw)


def test_each_crop_is_the_source_resized_then_cut_at_the_recorded_corner(built):
    images = _images(built)
    assert len(images) == 5
    compared = 0
    for image in images:
        meta = image[schema.META]
        source = ImageOps.exif_transpose(Image.open(RAW / meta["source"])).convert("RGB")
        assert meta["original_size"] == [source.height, source.width]
        x0, y0, x1, _ = meta["crop_box"]
        scale = RESOLUTION / (x1 - x0)
        top, left = meta["crop_top_left"]
        assert (top, left) == (max(0, round(y0 * scale)), max(0, round(x0 * scale)))
        # What SDXL's corner means: resize the whole photo to the crop's scale, cut R x R at (top, left).
        resized = source.resize((round(source.width * scale), round(source.height * scale)), Image.Resampling.LANCZOS)
        cut = np.asarray(resized.crop((left, top, left + RESOLUTION, top + RESOLUTION)), dtype=np.float32)
        crop = np.asarray(Image.open(io.BytesIO(image[schema.CROP])).convert("RGB"), dtype=np.float32)
        if x0 >= 0 and y0 >= 0 and x1 <= source.width and meta["crop_box"][3] <= source.height:
            assert np.abs(cut - crop).mean() < 12, meta["source"]  # JPEG and resampling differences only
            shifted = np.asarray(resized.crop((left + 8, top, left + 8 + RESOLUTION, top + RESOLUTION)), np.float32)
            assert np.abs(shifted - crop).mean() > np.abs(cut - crop).mean()  # the corner is where the crop is
            compared += 1
    assert compared >= 3  # the fixture photos' crops lie inside them


def test_the_reader_passes_them_into_the_samples(built):
    metas = {image[schema.META]["source"]: image[schema.META] for image in _images(built)}
    samples = _read(built)
    assert len(samples) == len(metas)
    by_size = {tuple(m["original_size"]): m for m in metas.values()}
    for sample in samples:
        assert bool(sample["micro_conditioning"])
        meta = by_size[tuple(int(v) for v in sample["original_size"])]
        assert sample["crop_top_left"].tolist() == [float(v) for v in meta["crop_top_left"]]
    # Training at another resolution (resize): the corner follows the crop's scale, the source size does not.
    halves = _read(built, resolution=RESOLUTION // 2, resize=True)
    for full, half in zip(samples, halves):
        assert half["original_size"].tolist() == full["original_size"].tolist()
        assert half["crop_top_left"].tolist() == (full["crop_top_left"] / 2).tolist()


def _without(fields: tuple[str, ...]):
    def change(sample: dict) -> None:
        for key in [k for k in sample if k.endswith("." + schema.META)]:
            meta = json.loads(sample[key])
            for field in fields:
                meta.pop(field, None)
            sample[key] = json.dumps(meta).encode()
    return change


def test_older_shards_read_with_the_crop_size_and_no_offset(built, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(built, old)
    for index in range(len(shards.read_manifest(old)["shards"])):
        rewrite_shard(old, index, _without((micro_conditioning.ORIGINAL_SIZE, micro_conditioning.CROP_TOP_LEFT)))
    samples = _read(old)
    assert samples and all(not bool(s["micro_conditioning"]) for s in samples)
    assert all(s["original_size"].tolist() == [RESOLUTION] * 2 and s["crop_top_left"].tolist() == [0, 0]
               for s in samples)


def test_a_malformed_value_skips_its_group_and_counts_it(built, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(built, bad)

    def change(sample: dict) -> None:
        key = sorted(k for k in sample if k.endswith("." + schema.META))[0]
        meta = json.loads(sample[key])
        meta[micro_conditioning.ORIGINAL_SIZE] = [-3, "wide"]
        sample[key] = json.dumps(meta).encode()

    rewrite_shard(bad, 0, change)
    handler = SkipAndCount()
    samples = _read(bad, handler=handler)
    assert handler.count >= 1 and len(samples) < len(_read(built))


def test_a_crop_past_the_photo_edge_records_zero_there():
    # A 100 px square starting 20 px above and 10 px right of the photo's corner, resized to 50 px.
    assert micro_conditioning.record([10, -20, 110, 80], (300, 200), 50) == {"original_size": [200, 300],
                                                                              "crop_top_left": [0, 5]}
