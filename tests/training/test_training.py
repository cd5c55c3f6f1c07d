"""The tiny config learns; checkpoints hold only the adapter; resume continues steps, optimizer and curriculum."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import default_collate

from fact_lightning.callbacks.curriculum import ShuffleCurriculum
from fact_lightning.callbacks.export import AdapterExport
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.models.resampler import TINY_RESAMPLER
from fact_lightning.training.base_spec import TinyBase
from fact_lightning.training.module import FactModule

PROJECTION = TINY_RESAMPLER


def make_module(lr: float = 3e-3, **kw) -> FactModule:
    return FactModule(TinyBase(), PROJECTION, optimizer=partial(torch.optim.Adam, lr=lr), fair_weight=0.01, **kw)


def make_data(shards, batch_size=4) -> FactDataModule:
    return FactDataModule(str(shards), batch_size=batch_size, resolution=64, token_dim=64, encoder="tiny",
                          streaming=False, num_workers=0)


def make_trainer(root, max_steps, callbacks=(), **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(root), callbacks=list(callbacks), **kw)


def test_learns_and_the_adapter_only_acts_after_training(two_image_shards, tmp_path):
    pl.seed_everything(0)
    module, data = make_module(lr=1e-2, face_drop=0.0, text_drop=0.0), make_data(two_image_shards, batch_size=2)
    module.configure_model()
    data.setup("fit")
    batch = default_collate(data._train.samples[:2])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = module.encode_text(["a photo of a person"] * 2)

    def adapter_effect() -> float:
        with torch.no_grad():
            kwargs = module.adapter.condition(module.adapter.project(batch["tokens"][:2]), 1.0)
            with_adapter = module.unet(latents, 500, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample
            base = module.unet(latents, 500, encoder_hidden_states=text).sample
        return (with_adapter - base).abs().max().item()

    def fixed_loss() -> float:
        with torch.no_grad():
            return module.compute_losses(batch, step=-1)["diffusion"].item()

    assert adapter_effect() == 0.0  # zero gates: the untrained adapter leaves the UNet unchanged
    before = fixed_loss()
    make_trainer(tmp_path, 15, enable_checkpointing=False).fit(module, data)
    after = fixed_loss()
    assert after < 0.99 * before, (before, after)  # measured here: 1.149 -> 1.113
    gates = module.gate_values()
    # Every block's gates left 0 (a single gate may be crossing zero at any given step).
    assert all(abs(a) + abs(f) > 1e-3 for a, f in gates.values()), gates
    assert adapter_effect() > 1e-3


def test_checkpoint_holds_only_the_adapter_and_resume_continues(shards, tmp_path):
    curriculum = dict(start=0.2, end=0.6, ramp_steps=10)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_last=True)
    pl.seed_everything(0)
    first = make_module()
    make_trainer(tmp_path, 3, [ShuffleCurriculum(**curriculum), ckpt,
                               AdapterExport(dirpath=str(tmp_path / "adapters"))]).fit(first, make_data(shards, 2))
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    assert set(saved["state_dict"]) == first.adapter_keys()  # no frozen UNet/VAE/text weights
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.")) for k in saved["state_dict"])
    assert saved["global_step"] == 3
    state = saved["callbacks"]["ShuffleCurriculum"]
    assert state["step"] == 2 and state["p_shuffle"] == pytest.approx(0.2 + 0.4 * 2 / 10)
    assert (tmp_path / "adapters" / "step-000003" / "adapter.safetensors").is_file()

    pl.seed_everything(0)
    resumed, curr = make_module(), ShuffleCurriculum(**curriculum)
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.global_step, pl_module.p_shuffle))

    trainer = make_trainer(tmp_path, 5, [curr, Watch(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(resumed, make_data(shards, 2), ckpt_path=str(path))
    assert seen[0][0] == 3 and seen[0][1] == pytest.approx(0.2 + 0.4 * 3 / 10)  # the ramp picks up at step 3
    assert trainer.global_step == 5
    opt_state = trainer.optimizers[0].state_dict()["state"]
    assert all(int(s["step"]) == 5 for s in opt_state.values())  # Adam's moments continued from step 3
    # (A fresh optimizer would count 2 steps. Bit-equality with an uninterrupted run is not asserted:
    # Lightning restarts a map-style loader's epoch on a mid-epoch resume, so the batches differ.)


def test_loading_a_foreign_checkpoint_fails_strictly(shards, tmp_path):
    module = make_module()
    module.configure_model()
    keys = sorted(module.adapter_keys())
    with pytest.raises(RuntimeError, match="missing"):
        module.on_load_checkpoint({"state_dict": {k: None for k in keys[1:]}})
    with pytest.raises(RuntimeError, match="unexpected"):
        module.on_load_checkpoint({"state_dict": {**{k: None for k in keys}, "unet.conv_in.weight": None}})


def test_nonfinite_loss_is_skipped_and_counted(shards, tmp_path):
    module, data = make_module(), make_data(shards, 2)
    original = FactModule.compute_losses

    def poisoned(self, batch, step):
        out = original(self, batch, step)
        if step == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    module.compute_losses = poisoned.__get__(module)
    make_trainer(tmp_path, 3, enable_checkpointing=False).fit(module, data)
    assert module.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in module.adapter.parameters())
