"""Trainable parameters and FLOPs of FACT on the real SDXL UNet, per choice of adapter sites (no download).

    python -m benchmarks.sdxl_sites --out bench_results [--resolution 1024]

Builds SDXL base 1.0's UNet from its config (benchmarks.sdxl) on the meta device: shapes without values, so neither its
2.6B weights nor any activation is allocated and the script takes seconds. Attaches a ``FaceAdapter`` (the
official Prj with SDXL's 2048-wide output, one ``GatedFaceAttention`` per site) for ``sites="stack"`` and
``sites="block"``, and counts with ``torch.utils.flop_counter.FlopCounterMode`` (which reads only shapes, so
meta tensors count exactly as real ones) the FLOPs of one sample (batch 1) at ``--resolution`` pixels:
the UNet forward alone (and its forward + backward to the input latents), with each adapter, and a training
step's forward + backward (base frozen: the backward reaches the adapters through the UNet's activations, no
gradient for the UNet's weights). Writes
``sdxl_sites.json``: per choice the sites (count, per width), trainable parameters (the sites; Prj; total)
and GFLOPs. FLOPs count a multiply-add as 2; attention counts its two matmuls (FlopCounterMode's rules).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.sdxl import POOLED_DIM, SDXL_RESAMPLER, SDXL_UNET
from fact_lightning.models.injection import FaceAdapter

FACE_TOKENS, FACE_TOKEN_DIM, TEXT_TOKENS = 144, 512, 77  # TransFace-S tokens; CLIP's context
CHOICES = ("stack", "block")


def meta_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    return unet.requires_grad_(False).eval()


def unet_inputs(resolution: int) -> dict:
    latent = resolution // 8
    with torch.device("meta"):
        return dict(
            sample=torch.empty(1, 4, latent, latent), timestep=torch.tensor([500]),
            encoder_hidden_states=torch.empty(1, TEXT_TOKENS, SDXL_UNET["cross_attention_dim"]),
            added_cond_kwargs={"text_embeds": torch.empty(1, POOLED_DIM), "time_ids": torch.empty(1, 6)},
        )


def count(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure_choice(unet, inputs: dict, choice: str) -> dict:
    """Sites, parameters and FLOPs of one adapter choice (attached for the count, detached after)."""
    with torch.device("meta"):
        adapter = FaceAdapter.for_unet(unet, SDXL_RESAMPLER, sites=choice)
        face = torch.empty(1, FACE_TOKENS, FACE_TOKEN_DIM)
    # Nothing requires a gradient for the forward counts (FlopCounterMode's module tracker trips over parameters
    # that require one inside torch.no_grad); the adapter's weights do for the training step.
    adapter.requires_grad_(False)
    try:
        def forward():
            embeddings = adapter.project(face)
            return unet(**inputs, cross_attention_kwargs=adapter.condition(embeddings)).sample

        def train_step():
            forward().sum().backward()

        prj_flops = count(lambda: adapter.project(face))
        forward_flops = count(forward)
        adapter.requires_grad_(True)
        train_flops = count(train_step)
    finally:
        adapter.detach()
    site_params = sum(params(block) for block in adapter.blocks.values())
    return {
        "sites": len(adapter.sites),
        "sites_per_width": {str(w): n for w, n in sorted(Counter(s.width for s in adapter.sites).items())},
        "site_names": [s.name for s in adapter.sites],
        "params_sites": site_params,
        "params_prj": params(adapter.projection),
        "params_trainable": params(adapter),
        "gflop_forward": forward_flops / 1e9,
        "gflop_forward_prj": prj_flops / 1e9,
        "gflop_train_step": train_flops / 1e9,
    }


def run(resolution: int = 1024) -> dict:
    start = time.perf_counter()
    unet = meta_unet()
    inputs = unet_inputs(resolution)
    base_forward = count(lambda: unet(**inputs))
    with torch.device("meta"):
        noisy = torch.empty_like(inputs["sample"], requires_grad=True)
    # The frozen UNet's forward + backward to its input: what a step costs without any trainable weight.
    base_backward = count(lambda: unet(**{**inputs, "sample": noisy}).sample.sum().backward())
    result = {
        "config": {"model": "SDXL base 1.0 UNet (config; meta device, no weights)", "resolution": resolution,
                   "batch": 1, "text_tokens": TEXT_TOKENS, "face_tokens": FACE_TOKENS,
                   "projection": SDXL_RESAMPLER.to_dict(), "torch": torch.__version__},
        "unet": {"params": params(unet), "gflop_forward": base_forward / 1e9,
                 "gflop_forward_backward_to_input": base_backward / 1e9},
        "choices": {choice: measure_choice(unet, inputs, choice) for choice in CHOICES},
    }
    for entry in result["choices"].values():
        entry["forward_over_unet"] = entry["gflop_forward"] / result["unet"]["gflop_forward"]
    result["seconds"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    parser.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args()
    result = run(args.resolution)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sdxl_sites.json").write_text(json.dumps(result, indent=2))
    summary = {k: {f: v[f] for f in ("sites", "sites_per_width", "params_sites", "params_trainable", "gflop_forward",
                                     "gflop_train_step")} for k, v in result["choices"].items()}
    print(json.dumps({"unet": result["unet"], **summary, "seconds": result["seconds"]}, indent=2))


if __name__ == "__main__":
    main()
