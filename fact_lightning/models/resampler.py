"""Prj: the perceiver resampler that turns face tokens into identity tokens for the UNet.

Parameter names follow the official release (``latents``, ``proj_in``, ``layers.N.0`` attention,
``layers.N.1`` feed-forward, ``proj_out``, ``norm_out``) so official weights load without renaming.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ResamplerConfig:
    """Sizes of the projection; defaults are the official FACT ones for SD1.5 and TransFace-S."""

    token_dim: int = 512  # width of the face encoder's tokens
    dim: int = 1024
    depth: int = 4
    heads: int = 12
    dim_head: int = 64
    num_queries: int = 16
    output_dim: int = 768  # the UNet's cross-attention width
    ff_mult: int = 4

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"ResamplerConfig.{name} must be positive, got {value}")

    def to_dict(self) -> dict:
        return asdict(self)


# The projection of the tiny CPU configs (tests, demo): the tiny TransFace's 64-wide tokens -> 32-wide UNet.
# Its heads are 64 wide as the official ones, so that its official-format export loads back unchanged.
TINY_RESAMPLER = ResamplerConfig(token_dim=64, dim=64, depth=2, heads=2, dim_head=64, output_dim=32)


class PerceiverAttention(nn.Module):
    """Latent queries attend over [face tokens, latents]."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        tokens, latents = self.norm1(tokens), self.norm2(latents)
        q = self._split_heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat([tokens, latents], dim=1)).chunk(2, dim=-1)
        # Softmax in float32: the resampler runs in half precision at inference.
        out = F.scaled_dot_product_attention(q.float(), self._split_heads(k).float(), self._split_heads(v).float())
        b, _, n, _ = out.shape
        return self.to_out(out.to(latents.dtype).transpose(1, 2).reshape(b, n, -1))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class PerceiverResampler(nn.Module):
    """Face tokens (B, N, token_dim) -> identity tokens (B, num_queries, output_dim)."""

    def __init__(self, config: ResamplerConfig | None = None):
        super().__init__()
        cfg = config or ResamplerConfig()
        self.config = cfg
        self.latents = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.dim) / cfg.dim**0.5)
        self.proj_in = nn.Linear(cfg.token_dim, cfg.dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(cfg.dim, cfg.heads, cfg.dim_head), _feed_forward(cfg.dim, cfg.ff_mult)])
            for _ in range(cfg.depth)
        )
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.config.token_dim:
            raise ValueError(f"face tokens have width {tokens.shape[-1]}, the projection expects {self.config.token_dim}")
        x = self.proj_in(tokens)
        latents = self.latents.expand(tokens.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))

    @staticmethod
    def config_from_state_dict(state: dict[str, torch.Tensor], dim_head: int = 64) -> ResamplerConfig:
        """Infers the sizes of a resampler from its weights (official or ours; no prefix).

        The head split is not stored in the weights: ``dim_head`` (the official 64) decides it.
        """
        try:
            _, num_queries, dim = state["latents"].shape
            token_dim = state["proj_in.weight"].shape[1]
            output_dim = state["proj_out.weight"].shape[0]
            depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
            inner = state["layers.0.0.to_q.weight"].shape[0]
            ff_inner = state["layers.0.1.1.weight"].shape[0]
        except (KeyError, ValueError) as err:
            raise ValueError(f"not a perceiver-resampler state dict: missing or malformed {err}") from None
        if inner % dim_head:
            raise ValueError(f"attention width {inner} is not a multiple of dim_head {dim_head}")
        return ResamplerConfig(
            token_dim=token_dim, dim=dim, depth=depth, heads=inner // dim_head, dim_head=dim_head,
            num_queries=num_queries, output_dim=output_dim, ff_mult=ff_inner // dim,
        )
