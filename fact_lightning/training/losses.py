"""Pure loss helpers for FACT training (paper Eq. 3-4). No module state and no randomness: draws come in as tensors.

Shapes use B = batch, C = channels, h x w = latent grid, N = a transformer block's token count (its own
grid flattened row-major, as diffusers' ``Transformer2DModel`` does), D = a block's width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32 for reductions; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def random_loss_masks(face_mask: torch.Tensor, use_mask: torch.Tensor) -> torch.Tensor:
    """M_r(p) of Eq. 4: the face mask for samples with ``use_mask``, all ones for the others.

    face_mask: (B, 1, h, w), the latent face region (:func:`face_region`); use_mask: (B,) bool. Returns (B, 1, h, w).
    """
    ones = torch.ones_like(face_mask)
    return torch.where(use_mask.view(-1, 1, 1, 1).to(face_mask.device), face_mask, ones)


def masked_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                          normalize: str = "all_pixels") -> torch.Tensor:
    """Per-sample masked MSE ``||(pred - target) * M_r||^2`` of Eq. 4: (B,).

    pred, target: (B, C, h, w); mask: (B, 1, h, w) (M_r(p)). The mask multiplies the difference before it is
    squared, as Eq. 4 writes it: training passes a binary face region (:func:`face_region`), where this is
    the same as selecting the face's elements; a soft mask would weigh its elements by M^2, not M.
    ``normalize="all_pixels"`` (the paper's plain norm, as PhotoMaker-style code computes it): the mean over
    all C*h*w elements, so a masked sample weighs less, in proportion to its face area.
    ``normalize="mask_area"``: divided by the mask's area (sum of M^2) instead, keeping a masked sample's loss
    on the scale of an unmasked one (face pixels then weigh about 5-10x); an all-zero mask contributes 0.
    """
    m = _upcast(mask)
    se = ((_upcast(pred) - _upcast(target)) * m).pow(2)
    if normalize == "all_pixels":
        return se.mean(dim=(1, 2, 3))
    if normalize == "mask_area":
        area = m.pow(2).sum(dim=(1, 2, 3)) * pred.shape[1]
        return se.sum(dim=(1, 2, 3)) / area.clamp_min(1e-6)
    raise ValueError(f"normalize must be 'all_pixels' or 'mask_area', got {normalize!r}")


def token_grid(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of a block with ``num_tokens`` tokens in a UNet whose latent is ``latent_hw``.

    The UNet halves its grid per level with ceil rounding (stride-2 convs with padding 1).
    """
    h0, w0 = latent_hw
    for level in range(8):
        h, w = h0, w0
        for _ in range(level):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w == num_tokens:
            return h, w
    raise ValueError(f"{num_tokens} tokens match no downsampling of the {h0}x{w0} latent grid")


def face_region(face_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The face mask on a coarser grid (the latent, a block's tokens) as a binary region: (B, 1, h, w) in {0, 1}.

    A cell is face when at least half of its pixels are, the rule the pixel masks follow (``>= 128``). Area
    resizing alone leaves the cells along the face's edge fractional (about 18% of a 512 px crop's latent),
    and Eq. 3-4 multiply by M and then square: binary cells make M^2 = M, so the edge is in or out, never
    weighted by a squared fraction.
    """
    return (F.interpolate(face_mask, size=grid, mode="area") >= 0.5).to(face_mask.dtype)


def mask_tokens(face_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """M_x of Eq. 3: the binary face region on a block's token grid, (B, 1, H, W) -> (B, h*w, 1) row-major."""
    return face_region(face_mask, grid).flatten(2).transpose(1, 2)


FAIR_DENOMINATORS = ("live", "detached")


def fair(x: torch.Tensor, increment: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6,
         denominator: str = "live") -> torch.Tensor:
    """FAIR of Eq. 3 for one block: ``||GSA(x) * (1 - M_x)||_2 / ||x * (1 - M_x)||_2`` per sample.

    x: (B, N, D) the block's input tokens; increment: (B, N, D) the adapter's whole increment GSA(x);
    mask: (B, N, 1) the face region on the block's grid (:func:`mask_tokens`). Returns (B,).
    ``denominator="live"`` is Eq. 3 as written: x of a deep block depends on Prj and on every earlier
    block's adapter, so the denominator's gradient reaches them too (FAIR can then also fall by those adapters
    raising x outside the face). ``"detached"`` treats x as a constant normaliser: gradient through the
    increment only, a different objective, kept for ablations.
    """
    if denominator not in FAIR_DENOMINATORS:
        raise ValueError(f"FAIR denominator must be one of {FAIR_DENOMINATORS}, got {denominator!r}")
    outside = 1.0 - mask.to(x.dtype)
    if denominator == "detached":
        x = x.detach()
    num = _upcast(increment * outside).flatten(1).norm(dim=1)
    den = _upcast(x * outside).flatten(1).norm(dim=1)
    return num / (den + eps)


def fair_per_block(
    records: dict[str, tuple[torch.Tensor, torch.Tensor]], face_mask: torch.Tensor, latent_hw: tuple[int, int],
    denominator: str = "live",
) -> dict[str, torch.Tensor]:
    """FAIR for every block that recorded (x, GSA(x)) in one forward pass.

    records: {block path: (x (B, N, D), increment (B, N, D))}, as ``FaceAdapter.capture`` fills it;
    face_mask: (B, 1, H, W) at any resolution. Returns {block path: (B,)}.
    """
    out = {}
    for path, (x, increment) in records.items():
        grid = token_grid(x.shape[1], latent_hw)
        out[path] = fair(x, increment, mask_tokens(face_mask.to(x.device), grid), denominator=denominator)
    return out


def increment_inside_outside(
    increment: torch.Tensor, mask: torch.Tensor, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """Root-mean-square norm per token of the increment inside and outside the face: each (B,).

    increment: (B, N, D); mask: (B, N, 1), the face region (:func:`mask_tokens`; a soft mask weighs tokens).
    """
    sq = _upcast(increment).pow(2).sum(dim=-1, keepdim=True)
    m = _upcast(mask)
    inside = (sq * m).sum(dim=(1, 2)) / (m.sum(dim=(1, 2)) + eps)
    outside = (sq * (1 - m)).sum(dim=(1, 2)) / ((1 - m).sum(dim=(1, 2)) + eps)
    return inside.sqrt(), outside.sqrt()
