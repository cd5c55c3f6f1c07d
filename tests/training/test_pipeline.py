"""The shard reader: expansion into training samples, corrupt shards, manifest checks, seeds per rank,
bounded failures, resolution, malformed samples, and data order across a resume."""

import json
import logging
import shutil

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, default_collate

from fact_lightning.data import schema
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.data.pipeline import DataError, SkipAndCount, build_pipeline, read_all
from fact_lightning.data.shards import (
    MANIFEST_NAME, ManifestError, ShardWriter, expected_counts, iter_raw_samples, read_manifest, read_stats,
    shard_name, shard_urls, write_manifest, write_stats,
)

RESOLUTION = 64  # as conftest.py writes the shards


def _urls(root):
    return shard_urls(root, read_manifest(root))


def test_groups_expand_into_paired_and_shuffled_samples(shards):
    samples = read_all(_urls(shards), resolution=RESOLUTION)
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


def test_other_sizes_are_resized_only_when_asked(shards):
    sample = next(iter(build_pipeline(_urls(shards), resolution=32, resize=True, resampled=True)))
    assert sample["pixels"].shape == (3, 32, 32) and sample["mask"].shape == (1, 32, 32)
    handler = SkipAndCount()
    assert read_all(_urls(shards), resolution=32, handler=handler) == [] and handler.count == 4  # per group


def test_truncated_shard_is_skipped_counted_and_named(shards, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(shards, root)
    bad = root / shard_name(0)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    manifest = read_manifest(root)
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
    kw.setdefault("resolution", RESOLUTION)
    return FactDataModule(str(root), batch_size=2, num_workers=0, streaming=False, **kw)


def test_manifest_mismatch_errors(shards, tmp_path):
    with pytest.raises(ManifestError, match="width 512"):
        _datamodule(shards, token_dim=512).setup("fit")
    with pytest.raises(ManifestError, match="encoder variant is 'tiny', the config expects 'S'"):
        _datamodule(shards, encoder="S").setup("fit")
    root = tmp_path / "data"
    shutil.copytree(shards, root)
    manifest = read_manifest(root)
    manifest["format_version"] = schema.FORMAT_VERSION + 1
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="format_version"):
        _datamodule(root).setup("fit")
    (root / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match="manifest.json not found"):
        _datamodule(root).setup("fit")


def test_a_shard_rewritten_after_the_manifest_is_refused(shards, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(shards, root)
    stats = read_stats(root, 1)
    write_stats(root, 1, {**stats, "sha256": "0" * 64})  # what a re-build leaves before its new manifest
    with pytest.raises(ManifestError, match=f"{shard_name(1)}.*re-build"):
        _datamodule(root).setup("fit")
    (root / shard_name(1).replace(".tar", ".stats.json")).unlink()
    with pytest.raises(ManifestError, match="stats are missing"):
        _datamodule(root).setup("fit")


def test_datamodule_batches(shards):
    dm = _datamodule(shards, token_dim=64, encoder="tiny", shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (2, 3, RESOLUTION, RESOLUTION)
    assert len(batch["key"]) == 2 and isinstance(batch["caption"][0], str)


def test_resolution_comes_from_the_shards_and_a_different_one_needs_resize(shards):
    dm = _datamodule(shards, resolution=None)
    dm.setup("fit")
    assert dm.resolution == RESOLUTION and dm._train[0]["pixels"].shape[-1] == RESOLUTION
    with pytest.raises(ManifestError, match=r"data.resolution is 32 but the shards .* are 64 px"):
        _datamodule(shards, resolution=32).setup("fit")
    dm = _datamodule(shards, resolution=32, resize=True)
    dm.setup("fit")
    assert dm._train[0]["pixels"].shape[-1] == 32


# --- one order per (seed, epoch, rank, worker) ---------------------------------------------------------
def _draw(urls, n=12):
    pipe = build_pipeline(urls, resolution=RESOLUTION, resampled=True, shuffle_groups=4, shuffle_samples=6, seed=3)
    out = []
    for sample in pipe:
        out.append((sample["key"], round(float(sample["shuffled_tokens"].sum()), 3)))
        if len(out) == n:
            return out


def test_ranks_reading_one_shard_draw_different_orders_and_partners(shards, monkeypatch):
    one_shard = _urls(shards)[:1]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    rank0, rank0_again = _draw(one_shard), _draw(one_shard)
    monkeypatch.setenv("RANK", "1")
    rank1 = _draw(one_shard)
    assert rank0 == rank0_again  # reproducible per rank
    assert [k for k, _ in rank0] != [k for k, _ in rank1]  # different order
    # and different partners for the same target somewhere in the stream
    partners0, partners1 = {}, {}
    for draws, partners in ((rank0, partners0), (rank1, partners1)):
        for key, partner in draws:
            partners.setdefault(key, set()).add(partner)
    assert any(partners0[k] != partners1[k] for k in set(partners0) & set(partners1))


# --- bounded failures -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_unreadable_shards_stop_with_an_error_naming_one(shards, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(shards, root)
    urls = _urls(root)
    for url in urls:
        with open(url, "wb") as f:
            f.write(b"not a tar" * 200)
    handler = SkipAndCount(max_consecutive=50)
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match=r"50 consecutive .*shard-00000[01]\.tar"):
        for _ in build_pipeline(urls, resolution=RESOLUTION, resampled=True, handler=handler):
            pass
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "skipping" in r.getMessage()]
    assert 1 <= len(warnings) <= 6  # the first five, then rate-limited
    assert "shard-00000" in warnings[0].getMessage() and "?" not in warnings[0].getMessage().split(" (")[0]
    assert len(handler.sources) <= 16  # bounded memory


@pytest.mark.timeout(60)
def test_shards_deleted_while_training_stop_the_worker_with_an_error(shards, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(shards, root)
    urls = _urls(root)
    pipe = build_pipeline(urls, resolution=RESOLUTION, resampled=True, shuffle_groups=0, shuffle_samples=0,
                          handler=SkipAndCount(max_consecutive=20))
    loader = DataLoader(pipe, batch_size=2, num_workers=1)
    it = iter(loader)
    assert next(it)["pixels"].shape[0] == 2
    for url in urls:
        (root / url.rsplit("/", 1)[1]).unlink()
    with pytest.raises(DataError, match="consecutive"):
        for _ in range(1000):  # a few batches were read ahead; then the worker runs out of readable shards
            next(it)


def test_malformed_samples_are_skipped_before_collation(shards, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(shards, root)
    path = root / shard_name(0)
    samples = list(iter_raw_samples(path))
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    np.save(buf, np.zeros((144, 32), np.float16))
    samples[0]["00.tokens.npy"] = buf.getvalue()  # tokens of the wrong width
    buf = io.BytesIO()
    Image.new("L", (10, 10)).save(buf, format="PNG")
    samples[1]["01.mask.png"] = buf.getvalue()  # a mask of the wrong size
    with ShardWriter(path) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if k != "__url__"})
    write_stats(root, 0, {**read_stats(root, 0), "sha256": writer.sha256})
    manifest = read_manifest(root)
    manifest["shards"][0]["sha256"] = writer.sha256
    write_manifest(root, manifest)

    dm = _datamodule(root, token_dim=64)
    dm.setup("fit")
    keys = {s["key"] for s in dm._train.samples}
    # a damaged member makes its whole group damaged: skipped and counted once, its partners with it
    assert not {k for k in keys if k.startswith(("000000_0000/", "000000_0001/"))}
    assert dm.skipped == 2 and len(keys) == 6
    batch = default_collate(dm._train.samples)  # collation no longer crashes
    assert batch["tokens"].shape[1:] == (144, 64)


# --- resume: no replay ------------------------------------------------------------------------------------
class _Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, tuple[str, ...]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, tuple(batch["key"])))
        return (self.w * batch["tokens"].mean() - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(root, data, steps, ckpt_dir=None, ckpt_path=None, every=None):
    pl.seed_everything(0)
    module = _Recorder()
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_last=True)] if ckpt_dir else []
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=bool(ckpt_dir), callbacks=callbacks,
                         default_root_dir=str(root))
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return [keys for _, keys in module.seen]


@pytest.mark.parametrize("stop", [4, 8])  # inside the first epoch (6 batches), and inside the second
def test_in_memory_resume_continues_with_the_batches_of_an_uninterrupted_run(shards, tmp_path, stop):
    whole = _fit(tmp_path / "a", _datamodule(shards), 11)
    first = _fit(tmp_path / "b", _datamodule(shards), stop, ckpt_dir=tmp_path / "ckpt", every=stop)
    resumed = _fit(tmp_path / "b", _datamodule(shards), 11, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert first == whole[:stop]
    assert resumed == whole[stop:]  # not a replay of the first batches


def test_streaming_resume_draws_new_batches(shards, tmp_path):
    def data():
        return FactDataModule(str(shards), batch_size=2, num_workers=0, streaming=True, shuffle_groups=2,
                              shuffle_samples=4, epoch_samples=100)

    first = _fit(tmp_path, data(), 4, ckpt_dir=tmp_path / "ckpt", every=4)
    resumed = _fit(tmp_path, data(), 8, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    again = _fit(tmp_path, data(), 8, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert len(resumed) == 4 and resumed != first
    assert resumed == again  # deterministic
