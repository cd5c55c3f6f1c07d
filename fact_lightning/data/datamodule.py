"""LightningDataModule over ``fact-data build`` shards: wiring only (stages: ``pipeline.py``, files: ``shards.py``).

Resume: the module counts the training batches this rank consumed (``on_before_batch_transfer``) and keeps
the count in the checkpoint (``state_dict``). In memory, the next run skips the batches of the interrupted
epoch that were already seen, so it continues with exactly the batches an uninterrupted run would have;
streaming, it seeds the resumed stream from that count, so it draws new batches instead of replaying.

Checked before training starts (``check``, and ``setup`` again with the world size): every number argument
is finite and in range; a batch fits in what one epoch yields (``epoch_samples`` streaming, the data set's
share of each process in memory), since with ``drop_last`` a larger batch never forms (a stream would spin
forever, an in-memory run would end without one step); and a data set whose identity groups all hold one
image, which leaves the same-identity shuffle without a partner for any sample, is said so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..checks import SEED, Range, count, number
from . import shards
from .pipeline import SkipAndCount, StreamSeed, build_pipeline, read_all

log = logging.getLogger(__name__)

# The ranges of the numeric arguments (data.<name> in a fact-train config).
_RANGES: dict[str, Range] = {
    "batch_size": count(1), "resolution": Range(int, 8, 8192, multiple_of=8), "token_dim": count(1),
    "num_workers": count(0, 1024), "shuffle_groups": count(0), "shuffle_samples": count(0),
    "epoch_samples": count(1), "seed": SEED, "max_consecutive_errors": count(1),
    "worker_timeout": number(above=0.0, max=7 * 24 * 3600.0),
}


class _InMemory(Dataset):
    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose first epoch after a resume starts ``skip[1]`` samples into epoch ``skip[0]``'s
    permutation; its length stays the whole epoch's, as Lightning counts batches from the epoch start."""

    def __init__(self, dataset: Dataset, *, skip: tuple[int, int] | None = None, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())
        if self.skip is not None and self.skip[0] == self.epoch:
            indices = indices[self.skip[1]:]
            self.skip = None
        return iter(indices)


class FactDataModule(pl.LightningDataModule):
    """Identity-grouped shards -> batches of (target, paired reference, shuffled reference).

    Args:
        root: the dataset folder (``manifest.json`` and the shards it lists).
        batch_size: per process; the global batch is batch_size x processes x accumulation.
        resolution: training crop size in pixels; None takes the shards' (``manifest.json``). Another value
            than the shards' is an error unless ``resize`` is set.
        resize: resize crops to ``resolution`` when it differs from the shards'.
        token_dim: the projection's token width; checked against the manifest (linked from the model by fact-train).
        encoder: the face encoder variant the shards must have been encoded with (None: any).
        vae: the model's VAE (``BaseModelSpec.describe_vae()``; linked from ``model.base`` by fact-train). Shards
            that cache latents (``fact-data ... --vae``) must name the same VAE; shards without train as before.
        cached_latents: use the shards' cached latents when they have them (the model then skips its VAE);
            False encodes every crop with the model's VAE (and does not compare VAEs).
        streaming: True reads a resampled infinite stream (large sets, multi-GPU); False decodes every sample
            into memory once and lets Lightning's distributed sampler split it (small sets; deterministic).
        shuffle: shuffle the in-memory set each epoch (``streaming=False`` only; the stream always shuffles).
        max_consecutive_errors: stop with an error after this many unreadable samples or shards in a row.
        pin_memory: page-locked batches, for faster asynchronous copies to a GPU.
        val_root: an optional second dataset folder read in memory for validation: held-out identities
            (``fact-data build --val-identities``: ``<root>/val``) or any other shards of the same encoder.
        worker_timeout: seconds a reader process (``num_workers > 0``) may take for one batch before the run
            stops with an error: a stuck read never hangs training.
    """

    def __init__(
        self,
        root: str,
        batch_size: int = 4,
        resolution: int | None = None,
        resize: bool = False,
        token_dim: int | None = None,
        encoder: str | None = None,
        vae: str | None = None,
        cached_latents: bool = True,
        streaming: bool = True,
        shuffle: bool = True,
        num_workers: int = 4,
        shuffle_groups: int = 100,
        shuffle_samples: int = 500,
        epoch_samples: int = 10_000,
        seed: int = 0,
        max_consecutive_errors: int = 100,
        pin_memory: bool = False,
        val_root: str | None = None,
        worker_timeout: float = 600.0,
    ):
        super().__init__()
        values = locals()
        for name, range_ in _RANGES.items():  # NaN, inf and negative counts stop here, naming the argument
            if values[name] is not None:
                range_.check(values[name], f"data.{name}")
        self.save_hyperparameters()
        self.root = Path(root)
        self.handler = SkipAndCount(max_consecutive_errors)
        self.manifest: dict | None = None
        self.resolution: int | None = resolution
        self.seeds = StreamSeed(seed)
        self._train = None
        self._val = None
        self._consumed = 0                    # training batches this rank consumed, over all runs
        self._epoch, self._in_epoch = 0, 0    # the epoch of the last consumed batch, and batches in it
        self._said_no_partner = False

    def _read(self, root: Path) -> dict:
        """The checked manifest of ``root``, and the shard list with their group counts."""
        manifest = shards.read_manifest(root)
        shards.check_manifest(manifest, token_dim=self.hparams.token_dim, encoder=self.hparams.encoder, source=str(root))
        theirs = shards.manifest_resolution(manifest)
        wanted = self.hparams.resolution
        if wanted is None and theirs is None:
            raise shards.ManifestError(f"{root / shards.MANIFEST_NAME} records no resolution: set data.resolution")
        if wanted is not None and theirs is not None and wanted != theirs and not self.hparams.resize:
            raise shards.ManifestError(f"data.resolution is {wanted} but the shards in {root} are {theirs} px: "
                                       "leave data.resolution unset to use the shards', or set data.resize: true")
        if root == self.root:
            if self.manifest is None and (manifest.get("encoder") or {}).get("random"):
                log.warning("the shards in %s were encoded with a random-weight face encoder: fine for tests and "
                            "demos, useless for real training", root)
            self.manifest = manifest
            self.resolution = wanted if wanted is not None else theirs
        shape = (manifest.get("encoder") or {}).get("token_shape")
        latent_shape = None
        if self.hparams.cached_latents:
            side = self.resolution if self.resolution is not None else theirs  # what training reads
            latent_shape = shards.check_latents(manifest, vae=self.hparams.vae, resolution=side, source=str(root))
        return {"urls": shards.shard_urls(root, manifest), "expected_counts": shards.expected_counts(root, manifest),
                "token_shape": tuple(shape) if shape else None,
                "latents": dict(latent_shape=latent_shape, ignore_latents=not self.hparams.cached_latents,
                                shard_resolution=theirs)}

    def check(self) -> None:
        """Reads and checks the manifests (cheap): a bad data folder fails before a run starts writing anything."""
        self._read(self.root)
        self._check_batches(self.manifest, processes=1)
        if self.hparams.val_root:
            self._read(Path(self.hparams.val_root))

    def _check_batches(self, manifest: dict, processes: int, loaded: int | None = None) -> None:
        """A batch must fit in what one epoch yields; a data set without a same-identity pair is said so."""
        hp = self.hparams
        entries = manifest.get("shards") or []
        if hp.streaming and hp.batch_size > hp.epoch_samples:
            raise ValueError(f"data.batch_size {hp.batch_size} is larger than data.epoch_samples {hp.epoch_samples}: "
                             "no full batch is ever drawn (the run would wait forever); lower data.batch_size or "
                             "raise data.epoch_samples")
        if not hp.streaming:
            samples = loaded if loaded is not None else sum(e.get("images", 0) for e in entries)
            if hp.batch_size > samples // processes:
                share = f" ({samples // processes} per process on {processes})" if processes > 1 else ""
                raise ValueError(f"data.batch_size {hp.batch_size} is larger than the data set: {samples} samples in "
                                 f"{self.root}{share}, so no full batch is ever drawn and nothing would train; lower "
                                 "data.batch_size")
        # A group of n images is n samples; only a group of two or more gives a sample a same-identity partner.
        if entries and all(e.get("images") == e.get("samples") for e in entries) and not self._said_no_partner:
            self._said_no_partner = True
            log.warning("every identity group in %s holds one image: the same-identity shuffle will have no partner "
                        "for any sample (each is paired with itself), so the curriculum cannot act; add identities "
                        "with two or more photos", self.root)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if self._train is None and stage in (None, "fit"):
            data = self._read(self.root)
            common = dict(resolution=self.resolution, token_shape=data["token_shape"], resize=hp.resize,
                          handler=self.handler, expected_counts=data["expected_counts"], **data["latents"])
            if hp.streaming:
                self._train = build_pipeline(data["urls"], resampled=True, shuffle_groups=hp.shuffle_groups,
                                             shuffle_samples=hp.shuffle_samples, seed=self.seeds,
                                             epoch_samples=hp.epoch_samples, **common)
            else:
                self._train = _InMemory(read_all(data["urls"], seed=hp.seed, **common))
                log.info("loaded %d training samples from %s", len(self._train), self.root)
            world = self.trainer.world_size if self.trainer is not None else 1
            self._check_batches(self.manifest, world, None if hp.streaming else len(self._train))
        if self._val is None and hp.val_root and stage in (None, "fit", "validate"):
            if self.manifest is None:  # validate alone: the training shards' resolution is what the model trained at
                self._read(self.root)
            data = self._read(Path(hp.val_root))
            self._val = _InMemory(read_all(data["urls"], resolution=self.resolution, token_shape=data["token_shape"],
                                           resize=hp.resize, seed=hp.seed, handler=self.handler,
                                           expected_counts=data["expected_counts"], **data["latents"]))

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if hp.streaming:
            self.seeds.start = self._consumed  # a resumed stream draws new batches, not the first ones again
            # torch notices a dead reader process by itself; ``timeout`` bounds the wait on a live, stuck one
            # (a hung network mount), so no wait of the run is unbounded.
            return DataLoader(self._train, batch_size=hp.batch_size, num_workers=hp.num_workers,
                              persistent_workers=hp.num_workers > 0, drop_last=True, pin_memory=hp.pin_memory,
                              timeout=hp.worker_timeout if hp.num_workers > 0 else 0)
        # Our own sampler, also with one process: the same (seed, epoch) permutation split r::world, so a run
        # on N processes sees the same global batches as one process with an N times larger batch.
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        skip = (self._epoch, self._in_epoch * hp.batch_size) if self._in_epoch else None
        sampler = ResumableSampler(self._train, skip=skip, num_replicas=world, rank=rank, shuffle=hp.shuffle,
                                   seed=hp.seed, drop_last=True)
        return DataLoader(self._train, batch_size=hp.batch_size, sampler=sampler, drop_last=True, num_workers=0,
                          pin_memory=hp.pin_memory)

    def val_dataloader(self):
        if self._val is None:
            return []
        # In order, every sample; Lightning's distributed sampler splits it over ranks (repeating a few samples
        # to even them out: the module counts each sample once). No draw here: validation is the same every time.
        return DataLoader(self._val, batch_size=self.hparams.batch_size, shuffle=False, num_workers=0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            if trainer.current_epoch != self._epoch:
                self._epoch, self._in_epoch = trainer.current_epoch, 0
            self._in_epoch += 1
            self._consumed += 1
            if self.hparams.streaming:
                self.seeds.start = self._consumed  # non-persistent workers pick it up at their next epoch
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self._consumed, "epoch": self._epoch, "batches_in_epoch": self._in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._consumed = int(state.get("consumed_batches", 0))
        self._epoch = int(state.get("epoch", 0))
        self._in_epoch = int(state.get("batches_in_epoch", 0))

    @property
    def skipped(self) -> int:
        """Unreadable samples or shards skipped in this process (workers report theirs in each batch)."""
        return self.handler.count
