"""What a training step logs besides its loss: losses by part, the curriculum, condition fractions, FAIR per
block and each block's gates under their short site names, throughput. Written only at Lightning's logging
steps (one host sync there). And what a validation logs (``ValidationTally``): the same terms, as exact means
over the held-out samples."""

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


class ValidationTally:
    """Per-sample validation terms, gathered over ranks and averaged once per validation.

    Each sample's diffusion loss and FAIR per block are kept under its key (float64, CPU). At the end every
    rank's samples are gathered; a key seen twice (a distributed sampler repeats samples to even out the
    ranks) counts once, and sums run over the keys in sorted order, so the means are the same for any world
    size, rank split, batch size or batch order.
    """

    def __init__(self) -> None:
        self.rows: dict[str, tuple[float, dict[str, float]]] = {}

    def add(self, keys: list[str], diffusion: torch.Tensor, fair: dict[str, torch.Tensor]) -> None:
        """``diffusion`` (B,) and ``fair`` {block path: (B,)} for the samples ``keys``."""
        diffusion = diffusion.detach().double().cpu().tolist()
        fair = {path: value.detach().double().cpu().tolist() for path, value in fair.items()}
        for i, key in enumerate(keys):
            self.rows.setdefault(key, (diffusion[i], {path: values[i] for path, values in fair.items()}))

    def gathered(self) -> dict[str, tuple[float, dict[str, float]]]:
        """Every rank's rows (a collective under torch.distributed: call on every rank); lower ranks win a repeat."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return dict(self.rows)
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.rows)
        rows: dict = {}
        for part in parts:
            for key, row in part.items():
                rows.setdefault(key, row)
        return rows

    def means(self, fair_weight: float) -> dict[str, float]:
        """``val/loss``, ``val/diffusion``, ``val/fair_total`` and ``val/fair/<site>``: means over the samples."""
        rows = self.gathered()
        if not rows:
            return {}
        keys = sorted(rows)
        n = len(keys)
        diffusion = sum(rows[k][0] for k in keys) / n
        fair = {path: sum(rows[k][1][path] for k in keys) / n for path in rows[keys[0]][1]}
        fair_total = sum(fair.values())
        loss = diffusion + fair_weight * fair_total if fair_weight > 0 else diffusion
        out = {"val/loss": loss, "val/diffusion": diffusion, "val/fair_total": fair_total, "val/samples": float(n)}
        out.update({f"val/fair/{site_name(path)}": value for path, value in fair.items()})
        return out

    def log(self, module, fair_weight: float) -> None:
        """Logs :meth:`means` through ``module.log`` (the same values on every rank: no further reduction)."""
        for name, value in self.means(fair_weight).items():
            module.log(name, value, prog_bar=name == "val/loss", sync_dist=False, rank_zero_only=False)
