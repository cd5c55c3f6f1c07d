"""The shard reader: expansion into training samples, corrupt shards, manifest checks."""

import json
import logging
import shutil

import pytest
import torch

from fact_lightning.data import schema
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.data.pipeline import (
    ManifestError, SkipAndCount, build_pipeline, expected_counts, read_all, shard_urls,
)

RESOLUTION = 64  # as conftest.py writes the shards


def test_groups_expand_into_paired_and_shuffled_samples(shards):
    manifest = json.loads((shards / schema.MANIFEST_NAME).read_text())
    samples = read_all(shard_urls(shards, manifest), resolution=RESOLUTION)
    assert len(samples) == 12
    s = samples[0]
    assert s["pixels"].shape == (3, RESOLUTION, RESOLUTION) and -1 <= s["pixels"].min() and s["pixels"].max() <= 1
    assert s["mask"].shape == (1, RESOLUTION, RESOLUTION) and set(s["mask"].unique().tolist()) <= {0.0, 1.0}
    assert s["tokens"].shape == (144, 64) and s["tokens"].dtype == torch.float32
    assert s["face"].shape == (3, 112, 112)
    assert s["caption"].startswith("a photo of person")
    # the shuffled reference is another image of the same identity: same group, different tokens
    group = [x for x in samples if x["key"].split("/")[0] == s["key"].split("/")[0]]
    others = [x["tokens"] for x in group if x["key"] != s["key"]]
    assert bool(s["shuffle_available"]) and any(torch.equal(s["shuffled_tokens"], t) for t in others)


def test_resized_when_resolution_differs(shards):
    manifest = json.loads((shards / schema.MANIFEST_NAME).read_text())
    sample = next(iter(build_pipeline(shard_urls(shards, manifest), resolution=32, resampled=True)))
    assert sample["pixels"].shape == (3, 32, 32) and sample["mask"].shape == (1, 32, 32)


def test_truncated_shard_is_skipped_counted_and_named(shards, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(shards, root)
    bad = root / schema.SHARD_PATTERN.format(index=0)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    manifest = json.loads((root / schema.MANIFEST_NAME).read_text())
    handler = SkipAndCount()
    with caplog.at_level(logging.WARNING):
        samples = read_all(shard_urls(root, manifest), resolution=RESOLUTION, handler=handler,
                           expected_counts=expected_counts(root, manifest))
    assert handler.count >= 1
    assert any(bad.name in s for s in handler.sources)
    assert any(bad.name in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    # the intact shard is read in full, and no partial group makes it through
    keys = {s["key"].split("/")[0] for s in samples}
    assert {"000001_0000", "000001_0001"} <= keys
    assert all(s["tokens"].shape == (144, 64) for s in samples)


def _datamodule(root, **kw):
    return FactDataModule(str(root), batch_size=2, resolution=RESOLUTION, num_workers=0, streaming=False, **kw)


def test_manifest_mismatch_errors(shards, tmp_path):
    with pytest.raises(ManifestError, match="width 512"):
        _datamodule(shards, token_dim=512).setup("fit")
    with pytest.raises(ManifestError, match="encoder variant is 'tiny', the config expects 'S'"):
        _datamodule(shards, encoder="S").setup("fit")
    root = tmp_path / "data"
    shutil.copytree(shards, root)
    manifest = json.loads((root / schema.MANIFEST_NAME).read_text())
    manifest["format_version"] = schema.FORMAT_VERSION + 1
    (root / schema.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="format_version"):
        _datamodule(root).setup("fit")
    (root / schema.MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match="manifest.json not found"):
        _datamodule(root).setup("fit")


def test_datamodule_batches(shards):
    dm = _datamodule(shards, token_dim=64, encoder="tiny", shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (2, 3, RESOLUTION, RESOLUTION)
    assert len(batch["key"]) == 2 and isinstance(batch["caption"][0], str)
