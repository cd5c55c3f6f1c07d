"""FAIR ablation: train the tiny config twice from one seed, lambda = 0 and lambda > 0, and compare where the
adapters act. Writes JSON.

    python -m fact_lightning.experiments.fair_ablation --out fair.json [--data SHARDS] [--steps 30]
        [--fair-denominator live|detached]

Without ``--data`` it writes synthetic identity shards (moving ellipse faces with masks) to a temp folder.
The measure is, per block, the RMS of the adapter's increment GSA(x) per token outside the face mask divided
by the one inside, averaged over blocks and a fixed evaluation set (fixed noise and timesteps): FAIR should
lower it. ``--fair-denominator detached`` trains the lambda > 0 run with FAIR's denominator detached (not Eq. 3),
to measure what the live denominator changes.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from ..commands.console import quiet_library_noise
from ..training import losses
from ..data.datamodule import FactDataModule
from ..models.resampler import TINY_RESAMPLER
from ..training.base_spec import TinyBase
from ..training.module import FactModule
from .synthetic import write_synthetic_shards

log = logging.getLogger(__name__)

PROJECTION = TINY_RESAMPLER


def area_tokens(face_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The face mask's share of each token, (B, N, 1). The measure weighs tokens by it rather than using the
    training's binary region: it stays defined on grids too coarse for any token to be half face (the 1x1 mid
    block of a 64 px crop), and comparable with measurements taken before the region was made binary."""
    return F.interpolate(face_mask, size=grid, mode="area").flatten(2).transpose(1, 2)


@torch.no_grad()
def increment_ratio(module: FactModule, samples: list[dict], batch_size: int = 4) -> dict:
    """Outside/inside RMS ratio of each block's increment over ``samples`` (fixed draws)."""
    inside, outside = {}, {}
    for start in range(0, len(samples), batch_size):
        batch = default_collate(samples[start:start + batch_size])
        records = module.compute_losses(batch, step=-1 - start)["records"]
        latent_hw = (batch["pixels"].shape[-2] // 8, batch["pixels"].shape[-1] // 8)
        for path, (x, inc) in records.items():
            mask = area_tokens(batch["mask"], losses.token_grid(x.shape[1], latent_hw))
            i, o = losses.increment_inside_outside(inc, mask)
            inside.setdefault(path, []).append(i)
            outside.setdefault(path, []).append(o)
    per_block = {p: (torch.cat(outside[p]).mean() / torch.cat(inside[p]).mean().clamp_min(1e-12)).item() for p in inside}
    return {"mean_outside_over_inside": sum(per_block.values()) / len(per_block), "per_block": per_block}


def train_once(data_root: str, fair_weight: float, steps: int, seed: int, lr: float, batch_size: int, resolution: int,
               fair_denominator: str = "live"):
    import lightning.pytorch as pl

    pl.seed_everything(seed)
    module = FactModule(TinyBase(seed=seed), PROJECTION, optimizer=partial(torch.optim.Adam, lr=lr),
                        fair_weight=fair_weight, fair_denominator=fair_denominator, seed=seed)
    data = FactDataModule(data_root, batch_size=batch_size, resolution=resolution, token_dim=64, streaming=False,
                          num_workers=0, seed=seed)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    return module, data


def run(out: str | Path, data: str | None = None, steps: int = 30, fair_weight: float = 0.1, seed: int = 0,
        lr: float = 1e-2, batch_size: int = 4, resolution: int = 64, fair_denominator: str = "live") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = str(Path(tmp) / "shards")
            write_synthetic_shards(data, identities=4, images_per_identity=3, groups_per_shard=2,
                                   resolution=resolution, seed=seed)
        result = {"steps": steps, "seed": seed, "lr": lr, "batch_size": batch_size, "resolution": resolution,
                  "fair_denominator": fair_denominator, "data": data, "runs": {}}
        for weight in (0.0, fair_weight):
            module, datamodule = train_once(data, weight, steps, seed, lr, batch_size, resolution, fair_denominator)
            ratio = increment_ratio(module, datamodule._train.samples)
            with torch.no_grad():
                fair = module.compute_losses(default_collate(datamodule._train.samples[:batch_size]), step=-1)
            result["runs"][f"lambda={weight}"] = {
                "fair_weight": weight, **ratio, "fair_total_eval": fair["fair_total"].item(),
                "diffusion_eval": fair["diffusion"].item(),
            }
    runs = list(result["runs"].values())
    result["fair_lowers_outside_over_inside"] = runs[1]["mean_outside_over_inside"] < runs[0]["mean_outside_over_inside"]
    Path(out).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--fair-weight", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--fair-denominator", choices=losses.FAIR_DENOMINATORS, default="live")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    quiet_library_noise()  # what fact-train drops: advertising, warnings about states that are intended
    result = run(args.out, args.data, args.steps, args.fair_weight, args.seed, args.lr,
                 fair_denominator=args.fair_denominator)
    for name, r in result["runs"].items():
        log.info("%s: outside/inside increment %.4f, FAIR %.4f", name, r["mean_outside_over_inside"], r["fair_total_eval"])


if __name__ == "__main__":
    main()
