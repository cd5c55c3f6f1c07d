"""Training throughput on the tiny config, and the cost of the adapters relative to the frozen UNet.

    python -m benchmarks.train_bench --out bench_results

``run(out_dir)`` returns and writes ``train_bench.json``: steps/s and samples/s of full training steps
(VAE + text encoder + UNet with adapters + losses + backward + Adam) through Lightning on synthetic
shards, and, measured in the same process on the same latents, the time of a UNet-with-adapters
forward+backward over a frozen-UNet forward+backward (gradients to its input, as adapter training needs),
medians of the two alternating in one loop. ``python -m benchmarks.full_size`` measures the same at SD1.5 size.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.timing import interleaved
from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.experiments.synthetic import write_synthetic_shards
from fact_lightning.models.resampler import TINY_RESAMPLER
from fact_lightning.training.base_spec import TinyBase
from fact_lightning.training.module import FactModule

PROJECTION = TINY_RESAMPLER


def unet_ratio(module: FactModule, batch: int, resolution: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8, generator=g)
    text = torch.randn(batch, 77, module.unet.config.cross_attention_dim, generator=g)
    tokens = torch.randn(batch, 144, PROJECTION.token_dim, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)

    def frozen():
        x = latents.clone().requires_grad_()
        module.unet(x, t, encoder_hidden_states=text).sample.square().mean().backward()

    def adapted():
        module.adapter.zero_grad()
        kwargs = module.adapter.condition(module.adapter.project(tokens), 1.0)
        with module.adapter.capture():
            module.unet(latents, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample.square().mean().backward()

    # One interleaved loop, medians: load from other processes falls on both variants alike.
    times = interleaved({"frozen": frozen, "adapted": adapted}, max(repeats, 3))
    frozen_s, adapted_s = statistics.median(times["frozen"]), statistics.median(times["adapted"])
    return {"frozen_unet_fwd_bwd_s": frozen_s, "adapter_unet_fwd_bwd_s": adapted_s, "adapter_over_frozen": adapted_s / frozen_s}


def run(out_dir: str | Path, steps: int = 12, warmup: int = 3, batch_size: int = 4, resolution: int = 128) -> dict:
    import lightning.pytorch as pl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_shards(tmp, identities=4, images_per_identity=3, resolution=resolution)
        pl.seed_everything(0)
        module = FactModule(TinyBase(), PROJECTION, optimizer=partial(torch.optim.Adam, lr=1e-4))
        data = FactDataModule(tmp, batch_size=batch_size, resolution=resolution, token_dim=64, streaming=False, num_workers=0)
        times: list[float] = []

        class Clock(pl.Callback):
            def on_train_batch_start(self, *args):
                self.t = time.perf_counter()

            def on_train_batch_end(self, *args):
                times.append(time.perf_counter() - self.t)

        trainer = pl.Trainer(accelerator="cpu", max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()])
        trainer.fit(module, data)
        step_s = sum(times[warmup:]) / len(times[warmup:])
        result = {
            "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "config": {"base": "tiny", "batch_size": batch_size, "resolution": resolution, "steps_timed": steps},
            "steps_per_s": 1 / step_s, "samples_per_s": batch_size / step_s,
            **unet_ratio(module, batch_size, resolution, repeats=steps // 2),
        }
    (out_dir / "train_bench.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="fact-lightning training benchmark")
    parser.add_argument("--out", default="bench_results")
    args = parser.parse_args()
    print(json.dumps(run(args.out), indent=1))
