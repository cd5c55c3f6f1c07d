"""Cached VAE latents: load the VAE that ``--vae`` names, encode crops, and `fact-data add-latents`.

A crop's latents are the VAE's ``latent_dist`` mean and std of the crop as training decodes it (the stored
JPEG, ``pixels / 127.5 - 1``), float16 (2, C, R/8, R/8), scaling factor not applied (``schema.LATENT``).
They are computed in float32, in consecutive batches of ``vae_batch_size`` images in shard order, so
`build --vae` and `add-latents` give the same bytes.

add-latents rewrites each shard that lacks the requested latents, one at a time, keeping the build's
guarantees: the new tar is written beside the old one (``.tmp``, fsync), the shard's stats first record
it as pending, then it is renamed over the old tar and the stats are rewritten; ``manifest.json`` last. A
killed run resumes: a shard whose tar matches its stats (or its pending entry) is kept, anything else is
recomputed from the tar, and the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from data_tools.options import AddLatentsOptions, LatentOptions, tiny_seed
from data_tools.output import clean_tmp, locked_output, resolve_device
from fact_lightning.data import schema, shards
from fact_lightning.errors import UserError
from fact_lightning.files import sha256_file
from fact_lightning.training.base_spec import tiny_vae_name, vae_name

logger = logging.getLogger(__name__)
ProgressFn = Callable[[int], None]


# --- the VAE -----------------------------------------------------------------------------------------
def state_sha256(module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes, in name order): the same weights give
    the same hash whatever file or folder they came from."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_vae(opts: LatentOptions):
    """(the frozen float32 VAE, its description for ``manifest["vae"]`` without ``latent_shape``)."""
    import torch

    from fact_lightning.models.single_file import is_single_file

    seed = tiny_seed(opts.vae)
    if seed is not None:
        from fact_lightning.tiny import tiny_base_model

        vae = tiny_base_model(seed=seed).vae
        info = {"name": tiny_vae_name(seed), "source": "tiny", "subfolder": None, "revision": None, "seed": seed}
    elif is_single_file(opts.vae):
        # A community single-file checkpoint: its VAE alone, named as the single-file base names it in training.
        from fact_lightning.models.single_file import single_file_vae_name
        from fact_lightning.models.single_file_vae import load_single_file_vae

        vae = load_single_file_vae(opts.vae, option="--vae")
        info = {"name": single_file_vae_name(opts.vae), "source": str(opts.vae), "subfolder": None, "revision": None,
                "seed": None}
    else:
        from diffusers import AutoencoderKL

        from fact_lightning.weights import MissingWeightsError, resolve_source

        try:
            where = resolve_source(opts.vae, "--vae")
        except MissingWeightsError as exc:
            raise UserError(str(exc)) from None
        own = where.local and (Path(where.location) / "config.json").is_file() and not (Path(where.location) / "vae").is_dir()
        subfolder = None if own else "vae"
        try:
            vae = AutoencoderKL.from_pretrained(where.location, subfolder=subfolder, revision=opts.vae_revision,
                                                torch_dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the VAE from --vae {opts.vae!r}: {exc}".splitlines()[0]) from None
        info = {"name": vae_name(opts.vae, opts.vae_revision), "source": opts.vae, "subfolder": subfolder,
                "revision": opts.vae_revision, "seed": None}
    torch.nn.Module.to(vae, torch.float32)  # diffusers' own .to warns about an empty fp32 list
    vae.requires_grad_(False).eval()
    info.update(weights_sha256=state_sha256(vae), scaling_factor=float(vae.config.scaling_factor),
                latent_dtype=schema.LATENT_DTYPE)
    return vae, info


def with_shape(info: dict, vae, resolution: int) -> dict:
    """``info`` with the ``latent_shape`` of ``resolution`` px crops."""
    side = resolution // schema.LATENT_DOWNSAMPLE
    return {**info, "latent_shape": [2, int(vae.config.latent_channels), side, side]}


def decode_crop(jpg: bytes) -> np.ndarray:
    """A stored crop as training decodes it: RGB uint8 (R, R, 3)."""
    from PIL import Image

    with Image.open(io.BytesIO(jpg)) as im:
        return np.asarray(im.convert("RGB"))


def encode_latents(vae, crops: list[bytes], device: str, batch_size: int) -> list[np.ndarray]:
    """Stored JPEG crops -> their float16 (2, C, R/8, R/8) latent mean and std, in consecutive batches."""
    import torch

    out: list[np.ndarray] = []
    for start in range(0, len(crops), batch_size):
        arrays = np.stack([decode_crop(c) for c in crops[start:start + batch_size]])
        x = torch.from_numpy(arrays.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1.0
        with torch.no_grad():
            dist = vae.encode(x.to(device)).latent_dist
        both = torch.stack([dist.mean, dist.std], dim=1).float().cpu().numpy().astype(np.float16)
        out.extend(both)
    return out


# --- add-latents -------------------------------------------------------------------------------------
def _with_latents(samples: Iterable[dict[str, bytes]], vae, device: str, batch_size: int) -> list[dict]:
    """The shard's samples with fresh latent fields (old ones replaced), computed over the whole shard."""
    samples = [{k: v for k, v in s.items() if (k == "__key__" or not k.startswith("__"))
                and not k.endswith("." + schema.LATENT)} for s in samples]
    keys = [(n, k) for n, s in enumerate(samples) for k in sorted(s)
            if k.endswith("." + schema.CROP) and k[:2].isdigit()]
    keys.sort(key=lambda nk: (nk[0], int(nk[1][:2])))  # file order, image index order
    latents = encode_latents(vae, [samples[n][k] for n, k in keys], device, batch_size)
    for (n, k), latent in zip(keys, latents):
        index = int(k[:2])
        samples[n][schema.image_key(index, schema.LATENT)] = shards.npy_bytes(latent)
    return samples


def _index(name: str) -> int:
    return int(name[len("shard-"):len("shard-") + 6])


def _pending_tar(root: Path, name: str) -> Path:
    return root / f"{name}.latents{shards.TMP_SUFFIX}"  # ends with .tmp: removed by a resume, flagged by inspect


def _verified(root: Path, entry: dict, stats: dict) -> dict:
    """The shard's stats, finished if a killed run had renamed its new tar; UserError for a tar that matches
    neither its stats nor their pending entry (damaged)."""
    tar = root / entry["name"]
    digest = sha256_file(tar)
    pending = stats.get("pending_latents")
    if pending and digest == pending["sha256"]:  # killed between the rename and the stats
        return _finished(stats, pending)
    if digest != stats.get("sha256"):
        raise UserError(f"{tar} does not match its stats (sha256): damaged? run `fact-data build` to rebuild it")
    return {k: v for k, v in stats.items() if k != "pending_latents"}


def _finished(stats: dict, pending: dict) -> dict:
    done = {k: v for k, v in stats.items() if k != "pending_latents"}
    done.update(sha256=pending["sha256"], tar_bytes=pending["tar_bytes"], vae=pending["vae"])
    return done


def _rewrite(root: Path, entry: dict, stats: dict, vae, info: dict, device: str, batch_size: int) -> dict:
    name = entry["name"]
    samples = _with_latents(shards.iter_raw_samples(root / name), vae, device, batch_size)
    staged = _pending_tar(root, name)
    with shards.ShardWriter(staged) as writer:  # written at staged + .tmp, fsynced, renamed to staged
        for sample in samples:
            writer.write(sample)
    pending = {"sha256": writer.sha256, "tar_bytes": writer.tar_bytes, "vae": info}
    index = _index(name)
    shards.write_stats(root, index, {**stats, "pending_latents": pending})  # a kill from here on keeps the work
    _install(staged, root / name)
    done = _finished(stats, pending)
    shards.write_stats(root, index, done)
    return done


def _install(staged: Path, tar: Path) -> None:
    os.replace(staged, tar)


def run_add_latents(root: str | Path, opts: AddLatentsOptions, progress: ProgressFn | None = None) -> dict:
    """Add (or replace) every image's cached latents in the finished dataset ``root``; returns the new manifest."""
    progress = progress or (lambda n: None)
    root = Path(root)
    manifest = shards.read_manifest(root)
    if manifest.get("format_version") != schema.FORMAT_VERSION:
        raise UserError(f"{root}: format version {manifest.get('format_version')}, this tool writes "
                        f"{schema.FORMAT_VERSION}: rebuild it with `fact-data build`")
    resolution = shards.manifest_resolution(manifest)
    if resolution is None:
        raise UserError(f"{root / shards.MANIFEST_NAME} records no resolution")
    with locked_output(root):
        clean_tmp(root)
        vae, info = load_vae(opts.latents)
        info = with_shape(info, vae, resolution)
        device = resolve_device(opts.device)
        import torch

        torch.nn.Module.to(vae, device)
        all_stats, resumed = [], 0
        for entry in manifest["shards"]:
            start = time.perf_counter()
            stats = shards.read_stats(root, _index(entry["name"]))
            if stats is None or not (root / entry["name"]).is_file():
                raise UserError(f"{entry['name']} or its stats are missing in {root}: run `fact-data build` again")
            checked = _verified(root, entry, stats)
            if opts.resume and checked.get("vae") == info:
                resumed += 1
                done = checked
                if done != stats:
                    shards.write_stats(root, _index(entry["name"]), done)
            else:
                done = _rewrite(root, entry, checked, vae, info, device, opts.latents.vae_batch_size)
                logger.info("%s: latents added in %.1f s", entry["name"], time.perf_counter() - start)
            all_stats.append(done)
            progress(int(entry.get("images", 0)))
        manifest = {**manifest, "vae": info, "shards": [shards.shard_entry(s) for s in all_stats],
                    "options": {**(manifest.get("options") or {}), "latents": opts.latents.to_dict()},
                    "resumed_shards": resumed}
        shards.write_manifest(root, manifest)  # last
    return manifest
