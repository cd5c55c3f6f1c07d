"""LightningDataModule over ``fact-data build`` shards: wiring only (the stages live in ``pipeline.py``)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .pipeline import SkipAndCount, build_pipeline, check_manifest, expected_counts, read_all, read_manifest, shard_urls

log = logging.getLogger(__name__)


class _InMemory(Dataset):
    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


class FactDataModule(pl.LightningDataModule):
    """Identity-grouped shards -> batches of (target, paired reference, shuffled reference).

    Args:
        root: the dataset folder (``manifest.json`` and the shards it lists).
        batch_size: per process; the global batch is batch_size x processes x accumulation.
        resolution: training crop size in pixels (crops of another size are resized).
        token_dim: the projection's token width; checked against the manifest (linked from the model by fact-train).
        encoder: the face encoder variant the shards must have been encoded with (None: any).
        streaming: True reads a resampled infinite stream (large sets, multi-GPU); False decodes every sample
            into memory once and lets Lightning's distributed sampler split it (small sets; deterministic).
        shuffle: shuffle the in-memory set each epoch (``streaming=False`` only; the stream always shuffles).
        val_root: an optional second dataset folder read in memory for validation.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 4,
        resolution: int = 512,
        token_dim: int | None = None,
        encoder: str | None = None,
        streaming: bool = True,
        shuffle: bool = True,
        num_workers: int = 4,
        shuffle_groups: int = 100,
        shuffle_samples: int = 500,
        epoch_samples: int = 10_000,
        seed: int = 0,
        val_root: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.handler = SkipAndCount()
        self.manifest: dict | None = None
        self._train = None
        self._val = None

    def _urls(self, root: Path) -> tuple[list[str], dict[str, int]]:
        manifest = read_manifest(root)
        check_manifest(manifest, token_dim=self.hparams.token_dim, encoder=self.hparams.encoder, source=str(root))
        if root == self.root:
            self.manifest = manifest
        return shard_urls(root, manifest), expected_counts(root, manifest)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self._train is None and stage in (None, "fit"):
            urls, counts = self._urls(self.root)
            if hp.streaming:
                self._train = build_pipeline(
                    urls, resolution=hp.resolution, resampled=True, shuffle_groups=hp.shuffle_groups,
                    shuffle_samples=hp.shuffle_samples, seed=hp.seed, handler=self.handler,
                    epoch_samples=hp.epoch_samples, expected_counts=counts,
                )
            else:
                self._train = _InMemory(read_all(urls, resolution=hp.resolution, seed=hp.seed, handler=self.handler,
                                                 expected_counts=counts))
                log.info("loaded %d training samples from %s", len(self._train), self.root)
        if self._val is None and hp.val_root and stage in (None, "fit", "validate"):
            root = Path(hp.val_root)
            urls, counts = self._urls(root)
            self._val = _InMemory(read_all(urls, resolution=hp.resolution, seed=hp.seed, handler=self.handler,
                                           expected_counts=counts))

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if hp.streaming:
            return DataLoader(self._train, batch_size=hp.batch_size, num_workers=hp.num_workers,
                              persistent_workers=hp.num_workers > 0, drop_last=True)
        # Our own sampler, also with one process: the same (seed, epoch) permutation split r::world, so a run
        # on N processes sees the same global batches as one process with an N times larger batch.
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        sampler = DistributedSampler(self._train, num_replicas=world, rank=rank, shuffle=hp.shuffle, seed=hp.seed,
                                     drop_last=True)
        return DataLoader(self._train, batch_size=hp.batch_size, sampler=sampler, drop_last=True, num_workers=0)

    def val_dataloader(self):
        if self._val is None:
            return []
        return DataLoader(self._val, batch_size=self.hparams.batch_size, shuffle=False, num_workers=0)

    @property
    def skipped(self) -> int:
        """Unreadable samples or shards skipped in this process (workers report theirs in each batch)."""
        return self.handler.count
