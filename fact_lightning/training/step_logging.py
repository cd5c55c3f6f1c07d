"""What a training step logs besides its loss: losses by part, the curriculum, condition fractions, FAIR per
block and each block's gates under their short site names, throughput. Written only at Lightning's logging
steps (one host sync there)."""

from __future__ import annotations

import time

import torch

from ..models.injection import FaceAdapter
from ..models.unet_layout import site_name


def log_step(module, batch: dict, out: dict) -> None:
    """Logs ``out`` (``FactModule.compute_losses``' result for ``batch``) through ``module.log``."""
    size = len(batch["key"])
    module.log("train/diffusion", out["diffusion"], batch_size=size)
    module.log("train/fair_total", out["fair_total"], batch_size=size)
    module.log("curriculum/p_shuffle", out["p_shuffle"], batch_size=size)
    for name, value in out["decisions"].fractions().items():
        module.log(f"conditions/{name}", value, batch_size=size)
    if "data_errors" in batch:
        module.log("data/skipped_in_batch_worker", batch["data_errors"].max().float(), batch_size=size)
    # Per site under its short name (``fair/down1.a0.b0``): whole in TensorBoard's card titles.
    for path, value in out["fair"].items():
        module.log(f"fair/{site_name(path)}", value, batch_size=size)
    for path, (attn, ff) in gate_values(module.adapter).items():
        module.log(f"gate_attn/{site_name(path)}", attn, batch_size=size)
        module.log(f"gate_ff/{site_name(path)}", ff, batch_size=size)
    trainer = module.trainer
    batches = trainer.fit_loop.epoch_loop._batches_that_stepped
    now = time.perf_counter()
    if module._throughput is not None and batches > module._throughput[1]:
        samples = (batches - module._throughput[1]) * size * trainer.world_size * trainer.accumulate_grad_batches
        module.log("perf/samples_per_sec", samples / (now - module._throughput[0]), batch_size=size)
    module._throughput = (now, batches)


def gate_values(adapter: FaceAdapter) -> dict[str, tuple[float, float]]:
    """tanh of each block's two gates (gathers sharded parameters: call on every rank under FSDP)."""
    out = {}
    for site in adapter.sites:
        block = adapter.blocks[site.key]
        out[site.path] = tuple(torch.tanh(_full(p).detach()).item() for p in (block.alpha_attn, block.alpha_dense))
    return out


def _full(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if hasattr(param, "full_tensor") else param
