"""Training on shards with cached VAE latents equals training through the VAE on the same shards without."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import default_collate

from data_tools.latents import run_add_latents
from data_tools.options import AddLatentsOptions, LatentOptions
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.models.resampler import TINY_RESAMPLER
from fact_lightning.training.base_spec import TinyBase, spec_vae_name
from fact_lightning.training.module import FactModule

TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _data(root, **kw) -> FactDataModule:
    data = FactDataModule(str(root), batch_size=4, token_dim=64, encoder="tiny", streaming=False, num_workers=0, **kw)
    data.setup("fit")
    return data


def test_a_step_on_cached_latents_equals_the_vae_path(shards, tmp_path):
    cached_root = tmp_path / "cached"
    shutil.copytree(shards, cached_root)
    run_add_latents(cached_root, AddLatentsOptions(latents=LatentOptions(vae="tiny")))
    base = TinyBase(seed=0)
    plain = default_collate(_data(shards)._train.samples[:4])
    cached = default_collate(_data(cached_root, vae=base.describe_vae())._train.samples[:4])
    assert "latent_mean" not in plain and cached["latent_mean"].shape == (4, 4, 8, 8)
    assert list(plain["key"]) == list(cached["key"]) and torch.equal(plain["pixels"], cached["pixels"])

    module = FactModule(base, TINY_RESAMPLER, optimizer=partial(torch.optim.Adam, lr=1e-3))
    module.configure_model()
    with torch.no_grad():
        dist = module.vae.encode(plain["pixels"]).latent_dist
        vae_path = module.compute_losses(plain, step=3)
        from_cache = module.compute_losses(cached, step=3)
    torch.testing.assert_close(cached["latent_mean"], dist.mean.half().float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(cached["latent_std"], dist.std.half().float(), atol=2e-3, rtol=2e-3)
    for name in ("loss", "diffusion", "fair_total"):  # equal up to the float16 rounding of mean and std
        torch.testing.assert_close(from_cache[name], vae_path[name], atol=1e-4, rtol=1e-3)


def test_fact_train_links_the_models_vae_to_the_data():
    from jsonargparse import Namespace

    assert spec_vae_name(Namespace(class_path="fact_lightning.training.base_spec.TinyBase",
                                   init_args=Namespace(seed=3, cross_attention_dim=32))) == "tiny(seed=3)"
    assert spec_vae_name(Namespace(class_path="fact_lightning.training.base_spec.PretrainedBase",
                                   init_args=Namespace(source="sd15/vae/", revision=None))) == "sd15"
    from fact_lightning.cli import FactCLI

    cli = FactCLI(FactModule, FactDataModule, run=False, save_config_callback=None,
                  args=["--config", str(TINY_CONFIG), "--model.base.init_args.seed", "5",
                        "--trainer.callbacks", "[]", "--data.root", "unused"])
    assert cli.datamodule.hparams.vae == "tiny(seed=5)"
