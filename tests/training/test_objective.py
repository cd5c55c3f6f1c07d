"""The training objective as the module computes it: FAIR's live denominator, the binary loss mask, and a
curriculum whose ramp follows the run's length."""

from __future__ import annotations

import logging
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.models.resampler import TINY_RESAMPLER
from fact_lightning.training import losses
from fact_lightning.training.base_spec import TinyBase
from fact_lightning.training.conditioning import ShuffleSchedule
from fact_lightning.training.module import FactModule


def make_data(shards, batch_size: int = 2) -> FactDataModule:
    return FactDataModule(str(shards), batch_size=batch_size, resolution=64, token_dim=64, encoder="tiny",
                          streaming=False, num_workers=0)


def soft_edged(mask: torch.Tensor) -> torch.Tensor:
    """The batch's 0/1 masks with a blurred rim (as a bilinear resize leaves them)."""
    return F.avg_pool2d(mask, 5, stride=1, padding=2, count_include_pad=False)


@pytest.fixture
def module_and_batch(two_image_shards):
    module = FactModule(TinyBase(), TINY_RESAMPLER, mask_loss_prob=1.0, fair_weight=0.01)
    module.configure_model()
    with torch.no_grad():  # a trained-like adapter: open gates, so increments (and FAIR) are non-zero
        for block in module.adapter.blocks.values():
            block.alpha_attn.fill_(1.0)
            block.alpha_dense.fill_(1.0)
    data = make_data(two_image_shards)
    data.setup("fit")
    batch = default_collate(data._train.samples[:2])
    batch["mask"] = soft_edged(batch["mask"])
    return module, batch


def test_the_loss_mask_is_the_binary_face_region_of_a_soft_mask(module_and_batch, monkeypatch):
    module, batch = module_and_batch
    fractional = ((batch["mask"] > 0) & (batch["mask"] < 1)).float().mean()
    assert fractional > 0.05
    seen = {}
    original = losses.masked_diffusion_loss

    def spy(pred, target, mask, normalize="all_pixels"):
        seen["mask"] = mask
        return original(pred, target, mask, normalize)

    monkeypatch.setattr(losses, "masked_diffusion_loss", spy)
    with torch.no_grad():
        out = module.compute_losses(batch, step=-1)
    used = out["decisions"].use_mask
    assert used.any()  # mask_loss_prob = 1
    region = losses.face_region(batch["mask"], (8, 8))
    assert set(seen["mask"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(seen["mask"][used], region[used])


def test_fair_gradient_reaches_prj_through_the_live_denominator(module_and_batch):
    """The default is Eq. 3 as written; the detached option changes the gradient of Prj (which feeds every
    block's x through the earlier blocks)."""
    module, batch = module_and_batch
    assert module.hparams.fair_denominator == "live"

    def fair_grad() -> torch.Tensor:
        module.adapter.zero_grad()
        module.compute_losses(batch, step=-1)["fair_total"].backward()
        return torch.cat([p.grad.flatten() for p in module.adapter.projection.parameters() if p.grad is not None])

    live = fair_grad()
    module.hparams.fair_denominator = "detached"
    detached = fair_grad()
    assert live.norm() > 0 and (live - detached).norm() > 1e-3 * live.norm()
    with pytest.raises(ValueError, match="fair_denominator"):
        FactModule(TinyBase(), TINY_RESAMPLER, fair_denominator="frozen")


def test_the_shuffle_ramp_follows_max_steps(two_image_shards, tmp_path, caplog):
    module = FactModule(TinyBase(), TINY_RESAMPLER, optimizer=partial(torch.optim.Adam, lr=1e-3),
                        shuffle=ShuffleSchedule(start=0.2, end=0.6))
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.probabilities(trainer.global_step).p_shuffle)

    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[Watch()])
    # Lightning's logger propagates to the root only when the root had handlers at import: listen on it directly.
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(caplog.handler)
    try:
        trainer.fit(module, make_data(two_image_shards))
    finally:
        rank_zero.removeHandler(caplog.handler)
    assert module.shuffle.ramp_steps == 4 and module.shuffle_config.ramp_steps is None
    assert seen == pytest.approx([0.2, 0.3, 0.4, 0.5])  # reaches 0.6 at step 4, the run's end
    records = {id(r): r for r in caplog.records if "shuffle curriculum" in r.getMessage()}  # seen once or twice
    lines = [r.getMessage() for r in records.values()]
    assert len(lines) == 1 and "at step 4 (trainer.max_steps)" in lines[0], lines
