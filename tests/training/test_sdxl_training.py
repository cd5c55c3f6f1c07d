"""FACT-XL training on the tiny SDXL stand-in: it learns, resumes exactly, exports, logs FAIR per site and passes
each sample's micro-conditioning to the UNet; the SD1.5 path is the same code (``text_conditioning.py``)."""

from __future__ import annotations

import json
import logging
import shutil
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import default_collate

from fact_lightning.data import micro_conditioning, schema
from fact_lightning.data import shards as shard_files
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.models.adapter_io import load_adapter, read_adapter_metadata
from fact_lightning.models.sdxl_base import add_time_ids
from fact_lightning.tiny_sdxl import TINY_SDXL_RESAMPLER, tiny_sdxl_unet
from fact_lightning.training.base_spec import PretrainedSDXLBase, TinySDXLBase, spec_vae_name
from fact_lightning.training.module import FactModule
from tests.training.runs import CONFIG, error_lines, final_adapter, fit_here, same_weights

SDXL_CONFIG = CONFIG.replace(
    "  base: {{class_path: fact_lightning.training.base_spec.TinyBase}}\n",
    "  base: {{class_path: fact_lightning.training.base_spec.TinySDXLBase}}\n  sites: stack\n",
).replace("output_dim: 32}}", "output_dim: 96}}")


def write_sdxl_config(folder: Path, shards_root: Path, steps: int) -> Path:
    path = folder / "tiny-sdxl-run.yaml"
    path.write_text(SDXL_CONFIG.format(steps=steps, shards=shards_root))
    return path


def make_module(**kw) -> FactModule:
    return FactModule(TinySDXLBase(), TINY_SDXL_RESAMPLER, sites="stack",
                      optimizer=partial(torch.optim.Adam, lr=kw.pop("lr", 1e-2)), **kw)


def make_data(root: Path, batch_size: int = 2) -> FactDataModule:
    return FactDataModule(str(root), batch_size=batch_size, resolution=64, token_dim=64, encoder="tiny",
                          streaming=False, num_workers=0)


def first_batch(root: Path, size: int = 2) -> dict:
    data = make_data(root)
    data.setup("fit")
    return default_collate(data._train.samples[:size])


@pytest.fixture(scope="module")
def micro_shards(shards, tmp_path_factory) -> Path:
    """The synthetic shards with SDXL's micro-conditioning in every meta (each image its own size and corner),
    rewritten as a writer would (stats and manifest hashes updated)."""
    root = tmp_path_factory.mktemp("micro") / "shards"
    shutil.copytree(shards, root)
    manifest = shard_files.read_manifest(root)
    for index, entry in enumerate(manifest["shards"]):
        path = root / entry["name"]
        samples = list(shard_files.iter_raw_samples(path))
        for n, sample in enumerate(samples):
            for key in sorted(k for k in sample if k.endswith("." + schema.META)):
                meta = json.loads(sample[key])
                image = int(key[:2])
                meta[micro_conditioning.ORIGINAL_SIZE] = [300 + 10 * n + image, 200 + index]
                meta[micro_conditioning.CROP_TOP_LEFT] = [image, 3 * image + index]
                sample[key] = json.dumps(meta).encode()
        with shard_files.ShardWriter(path) as writer:
            for sample in samples:
                writer.write({k: v for k, v in sample.items() if k != "__url__"})
        shard_files.write_stats(root, index, {**shard_files.read_stats(root, index), "sha256": writer.sha256,
                                         "tar_bytes": writer.tar_bytes})
        entry["sha256"] = writer.sha256
    shard_files.write_manifest(root, manifest)
    return root


def test_the_tiny_sdxl_adapter_learns_on_a_fixed_batch(micro_shards):
    """The module's own objective (text conditions, time ids, Eq. 4 with FAIR) on one batch with fixed draws
    (step -1): a few Adam steps of its own optimizer lower it."""
    pl.seed_everything(0)
    module = make_module(face_drop=0.0, text_drop=0.0)
    module.configure_model()
    assert len(module.adapter.sites) == 11  # one per transformer stack
    module.train()
    optimizer = module.configure_optimizers()
    batch = first_batch(micro_shards)
    first = None
    for _ in range(8):
        out = module.compute_losses(batch, step=-1)
        first = out["diffusion"].item() if first is None else first
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    with torch.no_grad():
        last = module.compute_losses(batch, step=-1)["diffusion"].item()
    assert last < 0.98 * first, (first, last)
    assert all(abs(a) > 1e-4 for a, _ in module.gate_values().values())  # every site's gate opened


class _Metrics(Callback):
    def __init__(self):
        self.seen: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen |= set(trainer.callback_metrics)


def test_fair_is_logged_per_site_and_equals_the_reference(two_image_shards, tmp_path):
    module = make_module()
    module.configure_model()
    batch = first_batch(two_image_shards)
    out = module.compute_losses(batch, step=-1)
    assert len(out["fair"]) == 11
    # Eq. 3 per site from the captured increments, each with the mask on its own token grid.
    for path, value in out["fair"].items():
        x, increment = out["records"][path]
        side = int(round(x.shape[1] ** 0.5))  # square crops: a square token grid
        mask = torch.nn.functional.interpolate(batch["mask"], size=(side, side), mode="area")
        outside = (1 - (mask >= 0.5).float()).flatten(1).unsqueeze(-1)
        want = (increment * outside).flatten(1).norm(dim=1) / (x * outside).flatten(1).norm(dim=1)
        torch.testing.assert_close(value, want.mean(), rtol=1e-4, atol=1e-6)
    metrics = _Metrics()
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[metrics])
    trainer.fit(module, make_data(two_image_shards))
    assert len([k for k in metrics.seen if k.startswith("fair/")]) == 11, sorted(metrics.seen)


def test_each_samples_micro_conditioning_reaches_the_unet(micro_shards):
    module = make_module()
    module.configure_model()
    batch = first_batch(micro_shards)
    seen = []
    hook = module.unet.add_time_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    try:
        module.compute_losses(batch, step=-1)
    finally:
        hook.remove()
    want = add_time_ids(batch["original_size"], batch["crop_top_left"], (64, 64))
    assert batch["micro_conditioning"].all() and len({tuple(r) for r in want.tolist()}) == 2  # two different samples
    assert torch.equal(seen[0], want.flatten())


def test_older_shards_train_with_the_crop_size_said_once(two_image_shards, caplog):
    module = make_module()
    module.configure_model()
    batch = first_batch(two_image_shards)
    seen = []
    hook = module.unet.add_time_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    with caplog.at_level(logging.WARNING, logger="fact_lightning.training.text_conditioning"):
        for _ in range(2):  # two logging steps: the flag is read there (no host sync on other steps)
            module.compute_losses(batch, step=-1)
            module.text.report_missing()
    hook.remove()
    assert seen[0].tolist() == [64, 64, 0, 0, 64, 64] * 2
    said = [r for r in caplog.records if "micro-conditioning" in r.getMessage()]
    assert len(said) == 1


def test_a_dropped_caption_is_the_encoded_empty_prompt(two_image_shards):
    module = make_module(text_drop=1.0)
    module.configure_model()
    batch = first_batch(two_image_shards)
    captured = {}

    def grab(_, args, kwargs):
        captured.update(tokens=kwargs["encoder_hidden_states"], pooled=kwargs["added_cond_kwargs"]["text_embeds"])

    hook = module.unet.register_forward_pre_hook(grab, with_kwargs=True)
    module.compute_losses(batch, step=0)
    hook.remove()
    empty = module.text.base.encode_prompt(["", ""])
    assert torch.equal(captured["tokens"], empty.tokens) and torch.equal(captured["pooled"], empty.pooled)
    assert captured["pooled"].abs().sum() > 0  # not the stock pipeline's zeros


@pytest.mark.slow
def test_resume_is_exact_and_the_export_round_trips(micro_shards, tmp_path):
    config = write_sdxl_config(tmp_path, micro_shards, steps=4)
    assert fit_here(config, tmp_path / "whole") == 0
    assert fit_here(config, tmp_path / "cut", "--trainer.max_steps", "2") == 0
    assert fit_here(config, tmp_path / "cut", "--ckpt_path", "last") == 0
    whole = final_adapter(tmp_path / "whole")
    assert same_weights(final_adapter(tmp_path / "cut"), whole)
    # The export loads onto a fresh tiny SDXL UNet as the adapter that was trained (the checkpoint's weights).
    path = tmp_path / "whole" / "adapters" / "final" / "adapter.safetensors"
    meta = read_adapter_metadata(path)
    assert len(json.loads(meta["sites"])) == 11 and meta["base_model"] == "tiny_sdxl(seed=0)"
    unet = tiny_sdxl_unet(0)
    loaded = load_adapter(path, unet)  # float32, as inference loads it
    saved = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    trained = {k.removeprefix("adapter."): v.float() for k, v in saved.items()}  # the float64 training weights
    assert same_weights(loaded.state_dict(), trained)
    assert sum(getattr(unet.get_submodule(s.path), "fuser", None) is not None for s in loaded.sites) == 11


def test_a_missing_sdxl_folder_is_one_error_line(shards, tmp_path, capsys):
    config = write_sdxl_config(tmp_path, shards, steps=1)
    missing = tmp_path / "no-sdxl"
    code = fit_here(config, tmp_path / "run", "--model.base", "fact_lightning.training.base_spec.PretrainedSDXLBase",
                    "--model.base.source", str(missing), "--model.base.local_files_only", "true")
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and str(missing) in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_the_sdxl_specs_name_their_vaes():
    assert spec_vae_name(TinySDXLBase(seed=3)) == "tiny_sdxl(seed=3)" != spec_vae_name(TinySDXLBase(seed=0))
    spec = PretrainedSDXLBase("stabilityai/stable-diffusion-xl-base-1.0", revision="abc")
    assert spec.describe_vae() == "stabilityai/stable-diffusion-xl-base-1.0@abc" and spec.base_type == "sdxl"


FSDP_CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: fact_lightning.callbacks.export.AdapterExport
      init_args: {{dirpath: {out}/adapters, dtype: null, official: never}}
model:
  base: {{class_path: fact_lightning.training.base_spec.TinySDXLBase, init_args: {{dtype: float64}}}}
  sites: stack
  adapter_dtype: float64
  projection: {{token_dim: 64, dim: 64, depth: 2, heads: 2, dim_head: 64, output_dim: 96}}
  optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 0.1}}}}
  fair_weight: 0.1
  shuffle: {{start: 0.2, end: 0.6, ramp_steps: 4}}
data:
  root: {shards}
  resolution: 64
  encoder: tiny
  streaming: false
  shuffle: false
  num_workers: 0
"""


@pytest.mark.slow
def test_two_fsdp2_processes_match_one(micro_shards, tmp_path):
    """As test_distributed.py does for SD1.5 (float64, SGD, in-memory data split by Lightning's sampler): FSDP2
    over 2 CPU processes through the real program ends where one process does."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    def config(name: str) -> Path:
        out = tmp_path / name
        out.mkdir()
        path = out / "config.yaml"
        path.write_text(FSDP_CONFIG.format(out=out, shards=micro_shards))
        return path

    one = config("one")
    assert fit_here(one, one.parent, "--data.batch_size", "4") == 0
    two = config("two")
    done = subprocess.run([sys.executable, "-m", "fact_lightning.cli", "fit", "--config", str(two),
                           "--trainer.default_root_dir", str(two.parent), "--data.batch_size", "2",
                           "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
                           "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
                           "--trainer.devices", "2"], cwd=two.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    want, got = (load_file(p.parent / "adapters" / "final" / "adapter.safetensors") for p in (one, two))
    pl.seed_everything(0)
    module = FactModule(TinySDXLBase(), TINY_SDXL_RESAMPLER, sites="stack")
    module.configure_model()
    init = {k: v.detach().double() for k, v in module.adapter.state_dict().items()}
    keys = sorted(want)
    assert got.keys() == want.keys() == init.keys()
    flat = lambda state: torch.cat([state[k].flatten().double() for k in keys])  # noqa: E731
    moved, error = flat(want) - flat(init), flat(got) - flat(want)
    assert moved.norm() > 1e-3
    assert (error.norm() / moved.norm()).item() < 1e-3
