"""Tiny `fact-train` runs for the run-folder, preemption and chaos tests: one config, run in this process
(``fit_here``) or as the real program in a subprocess (``fact_train``).

The run is exact to the bit across a resume: in-memory data, float64 adapter, Adam, accumulation 2 over
batches of 2 (12 samples: 3 optimizer steps per epoch, so runs cross epoch boundaries), a fixed shuffle ramp
(one that follows ``max_steps`` changes when a resume changes ``max_steps``), checkpoints every 2 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).parents[2]
FACT_TRAIN = str(Path(sys.executable).parent / "fact-train")

CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: {steps}
  accumulate_grad_batches: 2
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: 2, save_last: true, save_top_k: 1, monitor: step, mode: max}}
    - class_path: fact_lightning.callbacks.export.AdapterExport
      init_args: {{dtype: null}}
model:
  base: {{class_path: fact_lightning.training.base_spec.TinyBase}}
  adapter_dtype: float64
  projection: {{token_dim: 64, dim: 64, depth: 2, heads: 2, dim_head: 64, output_dim: 32}}
  optimizer: {{class_path: torch.optim.Adam, init_args: {{lr: 0.001}}}}
  shuffle: {{start: 0.2, end: 0.6, ramp_steps: 8}}
data:
  root: {shards}
  resolution: 64
  batch_size: 2
  encoder: tiny
  streaming: false
  num_workers: 0
"""


def write_config(folder: Path, shards: Path, steps: int = 6) -> Path:
    path = folder / "tiny-run.yaml"
    path.write_text(CONFIG.format(steps=steps, shards=shards))
    return path


def callback(class_path: str, **init_args) -> str:
    """A ``--trainer.callbacks+=`` value that adds one callback to the config's."""
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def fit_here(config: Path, run: Path, *args: str) -> int:
    """``fact-train fit`` in this process; its exit status (0, 2 for a user error, 128 + N after signal N)."""
    from fact_lightning.cli import main

    try:
        main(["fit", "--config", str(config), "--trainer.default_root_dir", str(run), *args])
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 0
    return 0


def fact_train(config: Path, run: Path, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """The real program in a subprocess (test callbacks importable from ``tests``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **kwargs.pop("env", {})}
    return subprocess.run([FACT_TRAIN, "fit", "--config", str(config), "--trainer.default_root_dir", str(run), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kwargs)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def final_adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapters" / "final" / "adapter.safetensors")


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def leftovers(run: Path) -> list[str]:
    """Temporary files and staging folders a writer left in the run folder."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*") if p.name != ".fact-train.lock")


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
