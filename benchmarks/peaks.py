"""Dense bf16 tensor-core peaks of the GPUs the MFU is computed against, and the one lookup that reads them.

The lookup refuses to guess: a name it does not know, or a MIG slice (a fraction of the GPU whose share of the
peak the name does not say), gives no peak, and MFU is then reported as null with the reason, unless the caller
passes ``--peak-tflops``.

Names are matched by whole words (``torch.cuda.get_device_name`` split at spaces and dashes), never by
substring, and the entry with the most words wins: "NVIDIA H200 NVL" is the H200 NVL (835.5), not the H200 SXM
(989.5); "NVIDIA L4" is not an L40S; "NVIDIA GH200 480GB" is not an H200.
"""

from __future__ import annotations

import re

import torch

# (model, words that must also be in the name, dense BF16 tensor-core TFLOP/s), most specific first.
# Source: NVIDIA's product datasheets ("BF16 Tensor Core" rows). Where a datasheet prints only the figure
# "with sparsity" (2:4 structured), the dense peak is half of it; that figure is given in the comment.
PEAK_TFLOPS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("B200", (), 2250.0),            # HGX B200 datasheet: 4.5 PFLOPS with sparsity
    ("H200", ("NVL",), 835.5),       # H200 NVL: 1,671 with sparsity
    ("H200", (), 989.5),             # H200 SXM: 1,979 with sparsity
    ("GH200", (), 989.5),            # GH200 Grace Hopper superchip: 1,979 with sparsity
    ("H100", ("NVL",), 835.5),       # H100 NVL: 1,671 with sparsity
    ("H100", ("PCIE",), 756.5),      # H100 PCIe: 1,513 with sparsity
    ("H100", (), 989.5),             # H100 SXM5 ("NVIDIA H100 80GB HBM3"): 1,979 with sparsity
    ("H800", ("PCIE",), 756.5),      # H800 PCIe: 1,513 with sparsity
    ("H800", (), 989.5),             # H800 SXM5: 1,979 with sparsity
    ("H20", (), 148.0),              # H20: 148 dense (296 with sparsity)
    ("A100", (), 312.0),             # A100 SXM4 and PCIe: 312 dense (624 with sparsity)
    ("A800", (), 312.0),             # A800: as the A100
    ("L40S", (), 362.05),            # L40S: 362.05 dense (733 with sparsity)
    ("L40", (), 181.05),             # L40: 181.05 dense (362.1 with sparsity)
    ("L4", (), 121.0),               # L4: 242 with sparsity
)


def _words(name: str) -> set[str]:
    return {w for w in re.split(r"[\s\-_/]+", name.upper()) if w}


def peak_for_name(name: str) -> tuple[float | None, str]:
    """The dense bf16 peak (TFLOP/s) of a GPU by its ``torch.cuda.get_device_name``, and where it came from
    (or why there is none)."""
    words = _words(name)
    if "MIG" in words:
        return None, (f"{name!r} is a MIG slice: its share of the GPU's peak is unknown (give --peak-tflops, "
                      "e.g. the full GPU's peak times the slice's fraction of its SMs)")
    for model, qualifiers, peak in PEAK_TFLOPS:
        if model in words and words.issuperset(qualifiers):
            label = " ".join((model, *qualifiers))
            return peak, f"table ({label}, dense bf16, vendor datasheet) for {name!r}"
    return None, f"no dense bf16 peak known for {name!r} (give --peak-tflops)"


def detect_peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The device's dense bf16 peak and where it came from: ``--peak-tflops``, else the table for a CUDA GPU."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, f"no peak for a {device.type} device (give --peak-tflops)"
    return peak_for_name(torch.cuda.get_device_name(device))


def device_name(device: torch.device) -> str:
    """What the benchmark ran on, as the JSON reports it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from benchmarks.sd15 import cpu_model

    return f"{device.type}: {cpu_model()}"
