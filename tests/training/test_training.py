"""The tiny config learns; checkpoints hold only the adapter; resume continues steps, optimizer and curriculum."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import default_collate

from fact_lightning.callbacks.export import AdapterExport
from fact_lightning.training.conditioning import ShuffleSchedule
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.models.resampler import TINY_RESAMPLER
from fact_lightning.training.base_spec import TinyBase
from fact_lightning.errors import UserError
from fact_lightning.training.module import FactModule
from fact_lightning.training.nonfinite import TrainingDiverged

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
    schedule = ShuffleSchedule(start=0.2, end=0.6, ramp_steps=10)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_last=True)
    pl.seed_everything(0)
    first = make_module(shuffle=schedule)
    make_trainer(tmp_path, 3, [ckpt, AdapterExport(dirpath=str(tmp_path / "adapters"), official="always")]).fit(
        first, make_data(shards, 2))
    path = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    assert set(saved["state_dict"]) == first.adapter_keys()  # no frozen UNet/VAE/text weights
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.")) for k in saved["state_dict"])
    assert saved["global_step"] == 3
    assert saved["fact"]["shuffle"] == {"start": 0.2, "end": 0.6, "ramp_steps": 10, "warmup_steps": 0, "shape": "linear"}
    step3 = tmp_path / "adapters" / "step-000003"
    assert (step3 / "adapter.safetensors").is_file() and (step3 / "fact_adapter.bin").is_file()
    # The final export is the step-3 export, linked rather than written twice.
    final = tmp_path / "adapters" / "final"
    assert final.is_symlink() and final.resolve() == step3.resolve()

    pl.seed_everything(0)
    resumed = make_module(shuffle=schedule)
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(trainer.global_step)

    trainer = make_trainer(tmp_path, 5, [Watch(), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(resumed, make_data(shards, 2), ckpt_path=str(path))
    assert seen[0] == 4  # the first resumed step was step 3
    assert resumed.probabilities(3).p_shuffle == pytest.approx(0.2 + 0.4 * 3 / 10)  # the ramp picks up at step 3
    assert trainer.global_step == 5
    opt_state = trainer.optimizers[0].state_dict()["state"]
    assert all(int(s["step"]) == 5 for s in opt_state.values())  # Adam's moments continued from step 3


def test_resuming_on_another_base_model_is_refused(shards, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, 1, [ckpt]).fit(make_module(), make_data(shards, 2))
    other = FactModule(TinyBase(seed=1), PROJECTION)
    with pytest.raises(UserError, match="base model"):
        make_trainer(tmp_path, 2).fit(other, make_data(shards, 2), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    allowed = FactModule(TinyBase(seed=1), PROJECTION, check_base_on_resume=False)
    trainer = make_trainer(tmp_path, 2, enable_checkpointing=False)
    trainer.fit(allowed, make_data(shards, 2), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 2


def test_loading_a_foreign_checkpoint_fails_strictly(shards, tmp_path):
    module = make_module()
    module.configure_model()
    keys = sorted(module.adapter_keys())
    with pytest.raises(RuntimeError, match="missing"):
        module.on_load_checkpoint({"state_dict": {k: None for k in keys[1:]}})
    with pytest.raises(RuntimeError, match="unexpected"):
        module.on_load_checkpoint({"state_dict": {**{k: None for k in keys}, "unet.conv_in.weight": None}})


def _poison(module: FactModule, steps) -> FactModule:
    """Makes the loss NaN at the given global steps (a stand-in for a diverging batch)."""
    original = FactModule.compute_losses

    def poisoned(self, batch, step):
        out = original(self, batch, step)
        if step in steps:
            out["loss"] = out["loss"] * float("nan")
        return out

    module.compute_losses = poisoned.__get__(module)
    return module


@pytest.mark.parametrize("fused", [False, True], ids=["host-sync", "fused-on-device"])
def test_nonfinite_loss_is_skipped_and_counted(shards, tmp_path, fused):
    module = _poison(make_module(), {1})
    module.optimizer_factory = partial(torch.optim.Adam, lr=3e-3, fused=fused)
    before = {}

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                before.update({k: v.clone() for k, v in pl_module.adapter.state_dict().items()})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in (1, 2) and before:  # just after the poisoned step
                after = pl_module.adapter.state_dict()
                assert all(torch.equal(before[k], after[k]) for k in before), "a non-finite step changed weights"
                before.clear()

    make_trainer(tmp_path, 4, [Snapshot()], enable_checkpointing=False, log_every_n_steps=2).fit(
        module, make_data(shards, 2))
    assert module.nonfinite_steps == 1
    assert all(torch.isfinite(p).all() for p in module.adapter.parameters())
    opt_state = next(iter(module.trainer.optimizers[0].state.values()))
    assert int(opt_state["step"]) == 3  # four steps, one of them skipped
    assert torch.isfinite(opt_state["exp_avg"]).all()


def test_a_diverged_run_stops_with_an_error_and_exports_nothing(shards, tmp_path):
    module = _poison(make_module(max_nonfinite_steps=3), set(range(100)))
    export = AdapterExport(dirpath=str(tmp_path / "adapters"))
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite steps"):
        make_trainer(tmp_path, 20, [export], enable_checkpointing=False).fit(module, make_data(shards, 2))
    assert not (tmp_path / "adapters").exists()


def test_cached_latents_give_the_losses_of_the_vae_path(shards):
    """A batch carrying the VAE's latent distribution trains exactly as one the VAE encodes on the fly."""
    module, data = make_module(), make_data(shards, 4)
    module.configure_model()
    data.setup("fit")
    batch = default_collate(data._train.samples[:4])
    with torch.no_grad():
        dist = module.vae.encode(batch["pixels"]).latent_dist
        vae_path = module.compute_losses(batch, step=7)
        cached = module.compute_losses({**batch, "latent_mean": dist.mean, "latent_std": dist.std}, step=7)
        pixels_gone = {**batch, "pixels": torch.full_like(batch["pixels"], float("nan")),
                       "latent_mean": dist.mean, "latent_std": dist.std}
        no_vae = module.compute_losses(pixels_gone, step=7)  # the VAE is not run at all
    for name in ("loss", "diffusion", "fair_total"):
        assert torch.equal(vae_path[name], cached[name]), name
        assert torch.equal(vae_path[name], no_vae[name]), name


def test_fused_skip_covers_a_whole_accumulation_window(shards, tmp_path):
    """A non-finite first micro-batch spoils the accumulated gradient: the step is skipped even though the
    window's last micro-batch is finite."""
    module = make_module()
    module.optimizer_factory = partial(torch.optim.Adam, lr=3e-3, fused=True)
    original, calls = FactModule.compute_losses, []

    def first_call_poisoned(self, batch, step):
        out = original(self, batch, step)
        calls.append(step)
        if len(calls) == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    module.compute_losses = first_call_poisoned.__get__(module)
    make_trainer(tmp_path, 3, enable_checkpointing=False, accumulate_grad_batches=2, log_every_n_steps=1).fit(
        module, make_data(shards, 2))
    assert calls[:2] == [0, 0] and module.trainer.global_step == 3
    opt_state = next(iter(module.trainer.optimizers[0].state.values()))
    assert int(opt_state["step"]) == 2  # three optimizer steps, the first skipped as a whole
    assert all(torch.isfinite(p).all() for p in module.adapter.parameters())
    assert module.nonfinite_steps == 1
