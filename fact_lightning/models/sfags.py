"""SFAGS: the gated self-attention that merges identity tokens into one UNet transformer block.

Paper Eq. 2 in the official two-gate form (the GLIGEN fuser):
    x = x + a * tanh(alpha_attn) * TS(SelfAttn(norm1([x, linear(e_id)])))
    x = x + a * tanh(alpha_dense) * FF(norm2(x))
TS keeps the visual tokens of the attention output. Each output row depends only on its own query, so we
compute queries for the visual tokens only (keys and values still run over ``[x, face]``): the same values,
without the face tokens' queries, outputs and the slicing copy. Both gates start at 0, so a freshly
attached adapter leaves the UNet unchanged. Parameter names are the official processor's (``linear``,
``attn.to_q``..., ``ff.net.0.proj``, ``ff.net.2``, ``norm1``, ``norm2``, ``alpha_attn``, ``alpha_dense``).
The gates are 1-element tensors, not the release's 0-d scalars, because FSDP2 cannot shard 0-d
parameters; scalar gates in a state dict are upgraded on load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# The adapter scale a of Eq. 2 while training (the paper); at inference the official apps use 0.5
# (inference.recipe.INFERENCE_ADAPTER_SCALE).
TRAINING_ADAPTER_SCALE = 1.0


@dataclass
class FaceCondition:
    """What the adapters need for one UNet call: identity tokens and the adapter scale a.

    embeddings: (B, T, cross_attention_dim), T = 16 per reference photo; a batch of 1 broadcasts.
    adapter_scale: a in Eq. 2; a float, or a (B,) tensor for a per-sample scale.
    """

    embeddings: torch.Tensor
    adapter_scale: float | torch.Tensor = TRAINING_ADAPTER_SCALE


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Queries from ``x`` (B, N, C) only; keys and values over ``[x, context]`` (context: (1 or B, T, C))."""
        b, n, d = x.shape
        tokens = torch.cat([x, context.expand(b, -1, -1)], dim=1)
        q = self._split_heads(self.to_q(x))
        out = F.scaled_dot_product_attention(q, self._split_heads(self.to_k(tokens)), self._split_heads(self.to_v(tokens)))
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class _GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Index 1 is an (empty) dropout slot, kept so that the output layer is ``net.2`` as in the release.
        self.net = nn.Sequential(_GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GatedFaceAttention(nn.Module):
    """One block's SFAGS. Called by diffusers' ``BasicTransformerBlock`` through its GLIGEN fuser slot."""

    def __init__(self, width: int, context_dim: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"block width {width} is not divisible by {heads} heads")
        self.linear = nn.Linear(context_dim, width)
        self.attn = _SelfAttention(width, heads)
        self.ff = _FeedForward(width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.alpha_attn = nn.Parameter(torch.zeros(1))
        self.alpha_dense = nn.Parameter(torch.zeros(1))
        # Where this block reports (input, increment) for FAIR during a forward pass; None = not recording.
        self.sink: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.name = ""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for gate in ("alpha_attn", "alpha_dense"):  # official files (and scalars) store 0-d gates
            key = prefix + gate
            if key in state_dict and state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, condition: FaceCondition) -> torch.Tensor:
        face = condition.embeddings
        if face.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"face embeddings have batch {face.shape[0]}, the UNet batch is {x.shape[0]}")
        # Compute in the adapter's own dtype: the frozen UNet may run in bf16/fp16 with an fp32 adapter.
        dtype = self.linear.weight.dtype
        h = x.to(dtype)
        scale = condition.adapter_scale
        if isinstance(scale, torch.Tensor):
            scale = scale.to(h).view(-1, 1, 1)
        # LayerNorm is per token, so norm1([x, face]) = [norm1(x), norm1(face)]; the face tokens (16 per photo)
        # are projected and normalised before being broadcast over the batch. They may come from a projection
        # on another device (the UNet moved by pipe.to / offload hooks, the projection not): follow the weights.
        context = self.norm1(self.linear(face.to(self.linear.weight.device, dtype)))
        out = h + scale * torch.tanh(self.alpha_attn) * self.attn(self.norm1(h), context)
        out = out + scale * torch.tanh(self.alpha_dense) * self.ff(self.norm2(out))
        if self.sink is not None:
            self.sink[self.name] = (h, out - h)
        return out.to(x.dtype)
