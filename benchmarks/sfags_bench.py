"""The cost of one SFAGS block at SD1.5's full-resolution size, next to the frozen transformer block it sits in.

    python -m benchmarks.sfags_bench --out bench_results

``run(out_dir)`` returns (``main`` writes it to ``--out``/sfags_bench.json) the median and minimum wall time of one
forward+backward of a ``GatedFaceAttention`` at a 64x64 latent grid (4096 tokens, width 320, 8 heads, 16
face tokens of width 768, batch 1, float32, gates open) with gradients to its weights and its input, as in
training; the same for a frozen diffusers ``BasicTransformerBlock`` of that size (gradients to its input
only); and the FLOPs of both (``torch.utils.flop_counter``), so that time per FLOP can be compared. CPU
threads default to 2. Compare numbers only within one run: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fact_lightning.models.sfags import FaceCondition, GatedFaceAttention

WIDTH, HEADS, CONTEXT_DIM, GRID, FACE_TOKENS, TEXT_TOKENS = 320, 8, 768, 64, 16, 77


def _timed(step, repeats: int) -> dict:
    """Median and minimum wall time of ``step`` (the minimum is the steadier one on a shared machine)."""
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"fwd_bwd_s": statistics.median(times), "fwd_bwd_min_s": min(times)}


def _flops(step) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def sfags_step(block: torch.nn.Module, x: torch.Tensor, condition, grad: torch.Tensor):
    """One training-like forward+backward of an SFAGS block (weights and input get gradients)."""

    def step():
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x, condition).backward(grad)

    return step


def frozen_block_step(x: torch.Tensor, grad: torch.Tensor, seed: int = 0):
    """The frozen SD1.5 transformer block at the same size: forward+backward to its input only."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(seed)
    block = BasicTransformerBlock(WIDTH, HEADS, WIDTH // HEADS, cross_attention_dim=CONTEXT_DIM).requires_grad_(False)
    text = torch.randn(x.shape[0], TEXT_TOKENS, CONTEXT_DIM)

    def step():
        x.grad = None
        block(x, encoder_hidden_states=text).backward(grad)

    return step


def run(out_dir: Path | None = None, *, repeats: int = 5, threads: int = 2, batch: int = 1) -> dict:
    """``out_dir`` is unused (the signature of ``benchmarks.run``'s parts): nothing is written here."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, GRID * GRID, WIDTH, generator=g, requires_grad=True)
    grad = torch.randn(batch, GRID * GRID, WIDTH, generator=g)
    torch.manual_seed(0)
    block = GatedFaceAttention(WIDTH, CONTEXT_DIM, HEADS)
    with torch.no_grad():
        block.alpha_attn.fill_(0.5)
        block.alpha_dense.fill_(0.5)
    condition = FaceCondition(torch.randn(1, FACE_TOKENS, CONTEXT_DIM, generator=g), 1.0)
    adapter, frozen = sfags_step(block, x, condition, grad), frozen_block_step(x, grad)
    result = {
        "config": {"tokens": GRID * GRID, "width": WIDTH, "heads": HEADS, "face_tokens": FACE_TOKENS, "batch": batch,
                   "dtype": "float32", "threads": threads, "repeats": repeats, "torch": torch.__version__},
        "sfags": {**_timed(adapter, repeats), "gflop": _flops(adapter) / 1e9},
        "frozen_block": {**_timed(frozen, repeats), "gflop": _flops(frozen) / 1e9},
    }
    for part in ("sfags", "frozen_block"):
        result[part]["gflop_per_s"] = result[part]["gflop"] / result[part]["fwd_bwd_min_s"]
    result["time_ratio"] = result["sfags"]["fwd_bwd_min_s"] / result["frozen_block"]["fwd_bwd_min_s"]
    result["flop_ratio"] = result["sfags"]["gflop"] / result["frozen_block"]["gflop"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = run(args.out, repeats=args.repeats, threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sfags_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
