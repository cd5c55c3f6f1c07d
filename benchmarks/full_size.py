"""Speed at full SD1.5 size on the CPU (``make bench-full``; minutes, not in CI).

    python -m benchmarks.full_size --out bench_results [--resolution 256] [--repeats 3] [--threads N] [--tiny]

SD1.5-size UNet, VAE and text encoder with random weights (``benchmarks.sd15``), the official Prj and 16
SFAGS, float32, batch 1. Four variants run interleaved in ONE loop (medians of ``--repeats``):

- ``frozen_unet``: the frozen UNet forward + backward, gradients to its input latents only;
- ``adapter_unet``: the UNet with the adapters forward + backward into the adapter (Prj included);
- ``step_cached``: the whole training step with cached latents: ``FactModule.compute_losses`` on a batch
  holding ``latent_mean``/``latent_std``, ``loss.backward()``, an Adam step;
- ``step_vae``: the same step with the VAE encoding the pixels in it.

Writes ``full_size.json``: the times, FLOP counts (``FlopCounterMode``, one call each), and the ratios
``adapter_over_frozen`` (target <= 1.6), ``vae_over_cached`` (about 1.15-1.25 expected on a CPU) and
``step_over_adapter_unet`` (the whole cached-latent step over the adapted UNet's forward + backward: what the
step adds around the UNet), from the medians, from the fastest calls and from the FLOP counts. On a machine shared with other jobs use ``--threads 1``: with more torch
threads than free cores every parallel region waits for its slowest thread, and calls vary 3-5x.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.sd15 import SD15RandomBase, environment, projection_config, synthetic_batch
from benchmarks.timing import count_flops, interleaved, summary
from fact_lightning.training.module import LATENT_MEAN, LATENT_STD, FactModule

ADAPTER_TARGET = 1.6
VARIANTS = ("frozen_unet", "adapter_unet", "step_cached", "step_vae")


def build_module(tiny: bool, seed: int = 0) -> FactModule:
    module = FactModule(SD15RandomBase(seed=seed, tiny=tiny), projection_config(tiny),
                        optimizer=partial(torch.optim.Adam, lr=1e-4))
    module.configure_model()
    return module.train()


def make_variants(module: FactModule, batch: dict, cached: dict) -> dict:
    """The four timed closures, on the same batch (the cached one adds the VAE's mean/std for its crops)."""
    optimizer = module.configure_optimizers()
    with torch.no_grad():
        mean, std = module.latent_distribution(batch)
        latents = mean * module.vae.config.scaling_factor
        text = module.encode_text(batch["caption"])
    t = torch.full((latents.shape[0],), 500, dtype=torch.long)
    step = [0]

    def frozen_unet():
        x = latents.clone().requires_grad_()
        module.unet(x, t, encoder_hidden_states=text).sample.square().mean().backward()

    def adapter_unet():
        module.adapter.zero_grad(set_to_none=True)
        kwargs = module.adapter.condition(module.adapter.project(batch["tokens"]), module.hparams.adapter_scale)
        pred = module.unet(latents, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs).sample
        pred.square().mean().backward()

    def training_step(b):
        step[0] += 1
        module.compute_losses(b, step[0])["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cached = {**batch, LATENT_MEAN: mean, LATENT_STD: std}
    return {"frozen_unet": frozen_unet, "adapter_unet": adapter_unet,
            "step_cached": partial(training_step, cached), "step_vae": partial(training_step, batch)}


def run(out_dir: str | Path | None = None, *, tiny: bool = False, resolution: int | None = None, batch_size: int = 1,
        repeats: int = 3, threads: int | None = None, flops: bool = True, seed: int = 0) -> dict:
    """Runs the benchmark; returns the result dict (``main`` writes it)."""
    resolution = resolution or (64 if tiny else 256)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    start = time.perf_counter()
    module = build_module(tiny, seed)
    build_s = time.perf_counter() - start
    logging.info("built %s components in %.1f s", "tiny" if tiny else "SD1.5-size", build_s)
    batch = synthetic_batch(batch_size, resolution, module.projection_config.token_dim, seed=seed)
    variants = make_variants(module, batch, batch)
    times = interleaved(variants, repeats, warmup=1, progress=logging.info)
    result = {
        "config": {"base": "tiny" if tiny else "sd15-size random weights", "resolution": resolution,
                   "batch_size": batch_size, "dtype": "float32", "repeats": repeats, "interleaved": True,
                   "adapter_params_m": round(sum(p.numel() for p in module.adapter.parameters()) / 1e6, 2),
                   "step": "compute_losses + loss.backward() + Adam step"},
        "environment": environment(),
        "build_s": round(build_s, 2),
        "variants": {name: summary(times[name]) for name in VARIANTS},
    }
    if flops:
        logging.info("counting FLOPs (one more call of each variant)")
        for name in VARIANTS:
            gflop = count_flops(variants[name]) / 1e9
            entry = result["variants"][name]
            entry["gflop"] = round(gflop, 2)
            entry["gflop_per_s"] = round(gflop / entry["median_s"], 2)
    med = {name: result["variants"][name]["median_s"] for name in VARIANTS}
    ratios = {
        "adapter_over_frozen": med["adapter_unet"] / med["frozen_unet"],
        "adapter_target": ADAPTER_TARGET,
        "vae_over_cached": med["step_vae"] / med["step_cached"],
        "step_cached_over_frozen": med["step_cached"] / med["frozen_unet"],
        "step_over_adapter_unet": med["step_cached"] / med["adapter_unet"],
    }
    ratios["adapter_meets_target"] = ratios["adapter_over_frozen"] <= ADAPTER_TARGET
    # Interference from other processes only adds time: ratios of the fastest calls are a second estimate.
    low = {name: result["variants"][name]["min_s"] for name in VARIANTS}
    ratios["adapter_over_frozen_min"] = low["adapter_unet"] / low["frozen_unet"]
    ratios["vae_over_cached_min"] = low["step_vae"] / low["step_cached"]
    ratios["step_over_adapter_unet_min"] = low["step_cached"] / low["adapter_unet"]
    if flops:
        gf = {name: result["variants"][name]["gflop"] for name in VARIANTS}
        ratios["adapter_over_frozen_flops"] = gf["adapter_unet"] / gf["frozen_unet"]
        ratios["vae_over_cached_flops"] = gf["step_vae"] / gf["step_cached"]
        ratios["step_over_adapter_unet_flops"] = gf["step_cached"] / gf["adapter_unet"]
    result["ratios"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in ratios.items()}
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "full_size.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="folder for full_size.json")
    parser.add_argument("--tiny", action="store_true", help="tiny components (checks the script in seconds)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default 256; 64 with --tiny)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each variant (medians)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("fact_lightning").setLevel(logging.WARNING)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every cast
    result = run(args.out, tiny=args.tiny, resolution=args.resolution, batch_size=args.batch_size,
                 repeats=args.repeats, threads=args.threads, flops=args.flops)
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'full_size.json'}")


if __name__ == "__main__":
    main()
