"""DDP and FSDP2 (ModelParallelStrategy + fully_shard) on 2 CPU processes match a single-process run.

All three runs go through the real ``fact-train`` program in subprocesses. The data is read in memory
without shuffling, so Lightning's distributed sampler gives rank r the samples r, r+2, ...: each global
batch of 4 holds the same samples as the single process's batch of 4, and every per-sample draw is keyed
by the sample, not the rank. The runs use float64 and plain SGD: the zero-initialised gates' gradients are
sums with heavy cancellation, and in float32 they change by ~1% with the batch split and by ~25% with the
CPU thread count (the loss agrees to 1e-7), which three steps amplify; Adam's first steps would turn such
rounding into full-size updates.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 3

CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: {steps}
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  callbacks:
    - class_path: fact_lightning.callbacks.export.AdapterExport
      init_args: {{dirpath: {out}/adapters, dtype: null}}
model:
  base: {{class_path: fact_lightning.training.base_spec.TinyBase, init_args: {{dtype: float64}}}}
  adapter_dtype: float64
  projection: {{token_dim: 64, dim: 64, depth: 2, heads: 2, dim_head: 64, output_dim: 32}}
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


def write_run_config(tmp: Path, shards: Path, name: str) -> Path:
    out = tmp / name
    out.mkdir()
    config = out / "config.yaml"
    config.write_text(CONFIG.format(steps=STEPS, out=out, shards=shards))
    return config


def final_adapter(config: Path) -> dict[str, torch.Tensor]:
    return load_file(config.parent / "adapters" / "final" / "adapter.safetensors")


def run_cli(tmp: Path, shards: Path, name: str, *overrides: str, env: dict | None = None) -> dict[str, torch.Tensor]:
    """The real program, launched as a torchrun-free multi-process job would be (Lightning starts rank 1)."""
    config = write_run_config(tmp, shards, name)
    cmd = [sys.executable, "-m", "fact_lightning.cli", "fit", "--config", str(config), *overrides]
    result = subprocess.run(cmd, cwd=config.parent, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-4000:]
    return final_adapter(config)


@pytest.fixture(scope="module")
def single_process(shards, tmp_path_factory):
    """The reference: the same program on one process, run in this one (one interpreter start less)."""
    from fact_lightning.cli import main

    config = write_run_config(tmp_path_factory.mktemp("single"), shards, "single")
    main(["fit", "--config", str(config), "--data.batch_size", "4", "--trainer.default_root_dir", str(config.parent)])
    return final_adapter(config)


@pytest.fixture(scope="module")
def initial_weights():
    """The adapter the runs start from (seed_everything(0), then configure_model, as fact-train does)."""
    import lightning.pytorch as pl

    from fact_lightning.models.resampler import TINY_RESAMPLER
    from fact_lightning.training.base_spec import TinyBase
    from fact_lightning.training.module import FactModule

    pl.seed_everything(0)
    module = FactModule(TinyBase(), TINY_RESAMPLER)
    module.configure_model()
    return {k: v.detach().double() for k, v in module.adapter.state_dict().items()}


def flat(state: dict, keys) -> torch.Tensor:
    return torch.cat([state[k].flatten().double() for k in keys])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_single(strategy, single_process, initial_weights, shards, tmp_path):
    if strategy == "ddp":
        extra = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    else:
        extra = ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
                 "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
                 "--trainer.devices", "2"]
    got = run_cli(tmp_path, shards, strategy, "--data.batch_size", "2", *extra)
    want, init = single_process, initial_weights
    assert got.keys() == want.keys() == init.keys()
    keys = sorted(want)
    moved = flat(want, keys) - flat(init, keys)
    error = flat(got, keys) - flat(want, keys)
    assert moved.norm() > 1e-3  # the runs trained (init matches: a wrong init would fail the next line)
    # Measured: DDP 1e-8, FSDP2 3e-4 (the frozen UNet runs in float32 on other batch splits, and the
    # zero-initialised gates' first gradients amplify that noise). With the gates left out of the sync: 1.6.
    assert (error.norm() / moved.norm()).item() < 1e-3
    gates = [k for k in keys if k.endswith(("alpha_attn", "alpha_dense"))]
    assert (flat(got, gates) - flat(want, gates)).norm() < 1e-3 * flat(want, gates).norm()
