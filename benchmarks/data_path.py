"""The data path of ``benchmarks.gpu``: ``FactDataModule`` over synthetic shards with cached latents.

The shards come from the project's own writers (``write_synthetic_shards``, then ``fact-data add-latents``
with the tiny VAE, on the CPU), at the benchmark's resolution and token width, so the batches have the
shapes of the synthetic ones. Measured:

- ``reader``: samples/s of the streaming data loader alone (tar reading, decoding, checks, collation, with
  ``workers`` reader processes), after its first batch (process start-up, reported apart);
- ``bytes_per_sample``: what one sample ships to the device (every tensor of a batch, as Lightning moves a
  batch), by key, and the part the training step reads (recorded by running it on the batch);
- ``step_from_loader``: the training step fed by the loader, each batch copied to the device as Lightning does
  (pinned memory on a GPU, non-blocking copies), samples/s.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("benchmarks.gpu")


class ReadKeys(dict):
    """A batch that records which of its keys are read (``batch[key]``, ``batch.get(key)``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def write_shards(root: Path, resolution: int, token_dim: int, num_tokens: int, seed: int = 0) -> str:
    """Synthetic shards with cached latents of the tiny VAE in ``root``; returns the VAE's name."""
    from data_tools.latents import run_add_latents
    from data_tools.options import AddLatentsOptions, LatentOptions
    from fact_lightning.experiments.synthetic import write_synthetic_shards

    write_synthetic_shards(root, identities=4, images_per_identity=4, groups_per_shard=2, resolution=resolution,
                           num_tokens=num_tokens, token_dim=token_dim, seed=seed)
    manifest = run_add_latents(root, AddLatentsOptions(latents=LatentOptions(vae="tiny"), device="cpu"))
    return manifest["vae"]["name"]


def to_device(batch: dict, device: torch.device) -> dict:
    """As Lightning moves a batch: every tensor, non-blocking (blocking on the CPU)."""
    return {k: v.to(device, non_blocking=device.type == "cuda") if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def bytes_per_sample(batch: dict, read: set[str]) -> dict:
    """Bytes per sample of every tensor in a collated batch, in total, by key, and in the keys ``read``."""
    size = len(batch["key"])
    by_key = {k: v.element_size() * v.nelement() / size for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return {"total": sum(by_key.values()), "read_by_step": sum(v for k, v in by_key.items() if k in read),
            "by_key": {k: round(v) for k, v in sorted(by_key.items(), key=lambda kv: -kv[1])},
            "keys_read_by_step": sorted(read), "keys_not_read": sorted(set(by_key) - read)}


def measure(trainer, *, batch_size: int, resolution: int, workers: int, batches: int, seconds: float,
            seed: int = 0) -> dict:
    """The data-path figures for ``trainer`` (a ``benchmarks.gpu.Trainer`` with cached latents); the reader and
    the loader-fed steps each get at most ``seconds``."""
    from benchmarks.timing import synchronize
    from fact_lightning.data.datamodule import FactDataModule

    device = trainer.device
    out: dict = {"batch": batch_size, "workers": workers, "streaming": True, "cached_latents": True}
    with tempfile.TemporaryDirectory(prefix="fact-bench-shards-") as tmp:
        start = time.monotonic()
        vae = write_shards(Path(tmp), resolution, trainer.token_dim, num_tokens=144, seed=seed)
        out["write_shards_s"] = round(time.monotonic() - start, 2)
        data = FactDataModule(tmp, batch_size=batch_size, resolution=resolution, token_dim=trainer.token_dim,
                              vae=vae, streaming=True, num_workers=workers, pin_memory=device.type == "cuda",
                              epoch_samples=1_000_000, seed=seed)
        data.setup("fit")
        loader = data.train_dataloader()
        it = iter(loader)
        start = time.monotonic()
        first = next(it)
        out["reader_first_batch_s"] = round(time.monotonic() - start, 3)

        until, n = time.monotonic() + seconds, 0
        start = time.monotonic()
        while n < batches and (n == 0 or time.monotonic() < until):
            next(it)
            n += 1
        elapsed = time.monotonic() - start
        out["reader"] = {"batches": n, "seconds": round(elapsed, 3), "samples_per_s": batch_size * n / elapsed}

        recorded = ReadKeys(to_device(first, device))
        trainer.step(recorded)  # also the warm-up of the loader-fed steps
        out["bytes_per_sample"] = bytes_per_sample(first, recorded.read)

        until, n = time.monotonic() + seconds, 0
        synchronize(device)
        start = time.monotonic()
        while n < batches and (n == 0 or time.monotonic() < until):
            trainer.step(to_device(next(it), device))
            n += 1
        synchronize(device)
        elapsed = time.monotonic() - start
        out["step_from_loader"] = {"steps": n, "seconds": round(elapsed, 3), "samples_per_s": batch_size * n / elapsed}
        del it, loader, data, first, recorded
        gc.collect()
    log.info("[data path] reader %.1f samples/s (%d workers), %.0f KiB/sample to the device (%.0f KiB read by the "
             "step), step from the loader %.2f samples/s", out["reader"]["samples_per_s"], workers,
             out["bytes_per_sample"]["total"] / 1024, out["bytes_per_sample"]["read_by_step"] / 1024,
             out["step_from_loader"]["samples_per_s"])
    return out
