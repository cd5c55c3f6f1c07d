"""Held-out validation: fixed draws keyed by the sample, the same numbers for any batch split, rank split or
checkpoint replay, and `fact-train validate --ckpt_path` agreeing with the fit's own validation."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import default_collate

from fact_lightning.callbacks.tensorboard import scalars_layout
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.experiments.synthetic import write_synthetic_shards
from fact_lightning.models.resampler import TINY_RESAMPLER
from fact_lightning.models.unet_layout import site_name
from fact_lightning.training.base_spec import TinyBase
from fact_lightning.training.conditioning import (VALIDATION_STEP, FaceChoice, decide, sample_generators,
                                                  validation_probabilities)
from fact_lightning.training.module import FactModule
from fact_lightning.training.step_logging import ValidationTally

ROOT = Path(__file__).parents[2]
FACT_TRAIN = str(Path(sys.executable).parent / "fact-train")

CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 4
  val_check_interval: 2
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: 2, save_last: true, save_top_k: -1, monitor: step, mode: max}}
    - class_path: fact_lightning.callbacks.previews.Previews
      init_args: {{every_n_steps: 4, num_identities: 1, inference_steps: 1, face_similarity: false}}
model:
  base: {{class_path: fact_lightning.training.base_spec.TinyBase, init_args: {{dtype: float64}}}}
  adapter_dtype: float64
  projection: {{token_dim: 64, dim: 64, depth: 2, heads: 2, dim_head: 64, output_dim: 32}}
  optimizer: {{class_path: torch.optim.Adam, init_args: {{lr: 0.01}}}}
  shuffle: {{start: 0.2, end: 0.6, ramp_steps: 4}}
data:
  root: {shards}
  val_root: {val}
  resolution: 64
  batch_size: 4
  encoder: tiny
  streaming: false
  num_workers: 0
"""


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> Path:
    """Three other people, nine images: an odd count, so two ranks need a repeated sample to even out."""
    root = tmp_path_factory.mktemp("val_shards")
    write_synthetic_shards(root, identities=3, images_per_identity=3, groups_per_shard=2, resolution=64, seed=7)
    return root


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def fact_train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([FACT_TRAIN, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# -- in one process: what the module computes ------------------------------------------------------------
@pytest.fixture(scope="module")
def module_and_samples(shards, val_shards):
    module = FactModule(TinyBase(), TINY_RESAMPLER, fair_weight=0.01)
    module.configure_model()
    module.eval()
    with torch.no_grad():  # a trained-like adapter: open gates, so FAIR is non-zero
        for block in module.adapter.blocks.values():
            block.alpha_attn.fill_(0.7)
            block.alpha_dense.fill_(0.7)
    data = FactDataModule(str(shards), batch_size=4, resolution=64, token_dim=64, encoder="tiny", streaming=False,
                          num_workers=0, val_root=str(val_shards))
    data.setup("validate")
    return module, data._val.samples


def validate(module: FactModule, batches: list[list[dict]]) -> dict[str, float]:
    module.on_validation_epoch_start()
    with torch.no_grad():
        for i, samples in enumerate(batches):
            module.validation_step(default_collate(samples), i)
    return module._val_tally.means(module.hparams.fair_weight)


def test_validation_draws_are_fixed_per_sample_and_unconditional():
    keys = [f"{i:06d}_0000/{j:02d}" for i in range(200) for j in range(2)]
    decisions = decide(sample_generators(0, VALIDATION_STEP, keys), validation_probabilities(0.5))
    assert (decisions.face == FaceChoice.PAIRED).all() and not decisions.drop_text.any()
    assert 0.3 < decisions.use_mask.float().mean() < 0.7  # M_r(p) stays Eq. 4's, fixed by the key
    again = decide(sample_generators(0, VALIDATION_STEP, keys[::-1]), validation_probabilities(0.5))
    assert torch.equal(again.use_mask, decisions.use_mask.flip(0))  # a sample's draw is its own, not its slot's


def test_validation_does_not_depend_on_batches_order_or_repeats(module_and_samples):
    module, samples = module_and_samples
    assert len(samples) == 9
    reference = validate(module, [samples[:4], samples[4:8], samples[8:]])
    assert reference["val/samples"] == 9 and reference["val/fair_total"] > 0
    assert set(reference) >= {"val/loss", "val/diffusion", "val/fair_total"}
    assert sum(1 for name in reference if name.startswith("val/fair/")) == len(module.adapter.sites)
    again = validate(module, [samples[:4], samples[4:8], samples[8:]])
    assert again == reference  # bit for bit
    # Another batch size, reverse order, and a repeated sample (what a distributed sampler pads with).
    other = validate(module, [samples[::-1][:3], samples[::-1][3:6], samples[::-1][6:], samples[:1]])
    for name, value in reference.items():
        assert math.isclose(other[name], value, rel_tol=1e-5, abs_tol=1e-9), (name, other[name], value)
    # After training-like steps the draws are still the validation ones (not keyed by the step).
    module.compute_losses(default_collate(samples[:2]), step=17)
    assert validate(module, [samples[:4], samples[4:8], samples[8:]]) == reference


def test_validation_tally_counts_a_repeated_key_once():
    tally = ValidationTally()
    path = "down_blocks.0.attentions.0.transformer_blocks.0"
    tally.add(["a", "b"], torch.tensor([1.0, 3.0]), {path: torch.tensor([0.5, 1.5])})
    tally.add(["a"], torch.tensor([100.0]), {path: torch.tensor([100.0])})  # a padded repeat
    means = tally.means(fair_weight=0.1)
    assert means["val/diffusion"] == 2.0 and means["val/fair_total"] == 1.0 and means["val/samples"] == 2
    assert math.isclose(means["val/loss"], 2.1)
    assert means[f"val/fair/{site_name(path)}"] == 1.0


def test_tensorboard_layout_puts_train_and_val_side_by_side():
    import re

    paths = ["down_blocks.0.attentions.0.transformer_blocks.0", "up_blocks.1.attentions.2.transformer_blocks.0"]
    layout = scalars_layout({paths[0]: "res1_down", paths[1]: "res2_up"})
    side = layout["train vs val"]
    for chart, (train, val) in (("loss (Eq. 4)", ("train/loss", "val/loss")),
                                ("diffusion", ("train/diffusion", "val/diffusion")),
                                ("FAIR total", ("train/fair_total", "val/fair_total"))):
        patterns = side[chart][1]
        assert any(re.search(p, train) for p in patterns) and any(re.search(p, val) for p in patterns)
        assert not any(re.search(p, "val/samples") for p in patterns)
    by_depth = layout["FAIR by depth, train vs val"]["res2_up"][1]
    for tag in (f"fair/{site_name(paths[1])}", f"val/fair/{site_name(paths[1])}"):
        assert any(re.search(p, tag) for p in by_depth), tag
    assert not any(re.search(p, f"val/fair/{site_name(paths[0])}") for p in by_depth)


# -- through the console script ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(shards, val_shards, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fit")
    config = folder / "fit.yaml"
    config.write_text(CONFIG.format(shards=shards, val=val_shards))
    run = folder / "run"
    fact_train("fit", "--config", str(config), "--trainer.default_root_dir", str(run))
    return run


@pytest.mark.slow
def test_fit_validates_every_n_steps_on_the_held_out_set(fitted, val_shards):
    import json

    logged = scalars(fitted)
    # Validations after optimizer steps 2 and 4, at Lightning's logging step of that batch (1 and 3).
    for name in ("val/loss", "val/diffusion", "val/fair_total"):
        assert sorted(logged[name]) == [1, 3], (name, logged[name])
    assert logged["val/samples"] == {1: 9.0, 3: 9.0}
    assert logged["val/loss"][1] != logged["val/loss"][3]  # the adapter trained in between
    assert any(tag.startswith("val/fair/") for tag in logged) and "train/diffusion" in logged
    # The previews take the held-out identities when data.val_root is set.
    assert json.loads((fitted / "previews" / "previews.json").read_text())["root"] == str(val_shards)


@pytest.mark.slow
def test_validate_gives_the_fits_numbers_for_its_checkpoint(fitted):
    fit_logged = scalars(fitted)
    out = fitted.parent / "validate-step2"
    # The mid-run checkpoint of step 2, which the fit validated at Lightning's logging step 1.
    fact_train("validate", "--config", str(fitted / "config.yaml"), "--trainer.default_root_dir", str(out),
               "--ckpt_path", str(fitted / "checkpoints" / "epoch=0-step=2.ckpt"))
    logged = scalars(out / "validate")  # its own folder: the fit's curves and config stay as they were
    val_tags = [t for t in fit_logged if t.startswith("val/")]
    assert sorted(t for t in logged if t.startswith("val/")) == sorted(val_tags)
    for tag in val_tags:
        assert logged[tag] == {1: fit_logged[tag][1]}, tag  # the same value, at the same step
    assert not (fitted / "validate").exists()


@pytest.mark.slow
def test_validation_is_the_same_on_two_processes(fitted):
    """DDP on 2 CPU processes, batches of 3 (9 samples: one padded repeat) against 1 process, batches of 4."""
    checkpoint = str(fitted / "checkpoints" / "last.ckpt")
    runs = {}
    for name, args in (("one", ["--data.batch_size", "4"]),
                       ("two", ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "3"])):
        out = fitted.parent / f"world-{name}"
        fact_train("validate", "--config", str(fitted / "config.yaml"), "--trainer.default_root_dir", str(out),
                   "--ckpt_path", checkpoint, *args)
        runs[name] = {tag: values[3] for tag, values in scalars(out / "validate").items() if tag.startswith("val/")}
    assert runs["two"]["val/samples"] == runs["one"]["val/samples"] == 9
    assert runs["one"].keys() == runs["two"].keys()
    for tag, value in runs["one"].items():
        assert math.isclose(runs["two"][tag], value, rel_tol=1e-6, abs_tol=1e-12), (tag, runs["two"][tag], value)
