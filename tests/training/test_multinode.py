"""Two "nodes" of one process each, over gloo on this machine, through the real `fact-train` entry point:
the by-hand launch README gives (MASTER_ADDR, MASTER_PORT, NODE_RANK, trainer.num_nodes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from tests.training.runs import FACT_TRAIN, ROOT

CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  strategy: ddp
  devices: 1
  num_nodes: 2
  max_steps: 4
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {out}/run
  callbacks:
    - class_path: tests.training.recorder.RecordKeys
      init_args: {{out: {out}}}
    - class_path: fact_lightning.callbacks.export.AdapterExport
model:
  base: {{class_path: fact_lightning.training.base_spec.TinyBase}}
  projection: {{token_dim: 64, dim: 64, depth: 2, heads: 2, dim_head: 64, output_dim: 32}}
data:
  root: {shards}
  batch_size: 2
  encoder: tiny
  streaming: true
  num_workers: 0
  shuffle_groups: 2
  shuffle_samples: 4
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_together(processes: list[subprocess.Popen], timeout: float) -> None:
    """Waits for all; the first to fail ends the others at once (they would wait in a collective for the
    process group's 30-minute timeout), and none outlives ``timeout``. Logs go to files: no pipe can fill."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in processes):
            if any(p.poll() not in (None, 0) for p in processes) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.slow
def test_two_nodes_train_together_and_each_reads_its_own_data(shards, tmp_path):
    (tmp_path / "config.yaml").write_text(CONFIG.format(out=tmp_path, shards=shards))
    base_env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [subprocess.Popen([FACT_TRAIN, "fit", "--config", str(tmp_path / "config.yaml")], cwd=ROOT,
                              env={**base_env, "NODE_RANK": str(rank)}, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, text=True) for rank, log in zip((0, 1), logs)]
    wait_together(nodes, timeout=400)
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log.read_text()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [(r["node_rank"], r["global_rank"]) for r in ranks] == [(0, 0), (1, 1)]
    assert all(len(r["keys"]) == 4 for r in ranks)  # both trained the same 4 steps, in lockstep
    assert ranks[0]["keys"] != ranks[1]["keys"]  # each rank drew its own batches
    assert (tmp_path / "run" / "adapters" / "final" / "adapter.safetensors").is_file()  # rank 0 exported
