"""TransFace: the ViT face-recognition encoder whose final-norm tokens condition FACT.

Module and parameter names follow the official TransFace release so that its state dicts load strictly
(``patch_embed.proj``, ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``norm``, ``feature``, ``mask_token``, ``senet``). Weights are never loaded here: see
``fact_lightning.interop.official.load_transface``.

In eval mode the forward pass computes what the official model computes: attention in float32, ReLU6
MLP, no token masking (the official random masking is a training-time augmentation only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransFaceConfig:
    """Architecture of a TransFace ViT, with the official constructor's argument names."""

    img_size: int = 112
    patch_size: int = 9
    num_classes: int = 512
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


# The released TransFace variants (ms1mv2 / glint360k checkpoints), plus a tiny one for tests and demos.
TRANSFACE_VARIANTS: dict[str, TransFaceConfig] = {
    "S": TransFaceConfig(embed_dim=512, depth=12, num_heads=8),
    "B": TransFaceConfig(embed_dim=512, depth=24, num_heads=8),
    "L": TransFaceConfig(embed_dim=768, depth=24, num_heads=8),
    "tiny": TransFaceConfig(num_classes=64, embed_dim=64, depth=2, num_heads=4),
}


def transface_config(variant: str) -> TransFaceConfig:
    try:
        return TRANSFACE_VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown TransFace variant {variant!r}; choose one of {sorted(TRANSFACE_VARIANTS)}") from None


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"TransFace expects aligned faces of {self.img_size}x{self.img_size}, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        # TransFace computes attention in float32 even under mixed precision.
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        out = out.transpose(1, 2).reshape(b, n, d).to(x.dtype)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: TransFaceConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.embed_dim)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransFaceEncoder(nn.Module):
    """Aligned faces (B, 3, S, S) in [-1, 1] -> tokens (B, num_patches, embed_dim) after the final norm."""

    def __init__(self, config: TransFaceConfig | None = None):
        super().__init__()
        cfg = config or TransFaceConfig()
        self.config = cfg
        n, d = cfg.num_patches, cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        # Recognition head: flattened, SE-weighted tokens -> identity embedding.
        self.feature = nn.Sequential(
            nn.Linear(d * n, d, bias=False),
            nn.BatchNorm1d(d, eps=2e-5),
            nn.Linear(d, cfg.num_classes, bias=False),
            nn.BatchNorm1d(cfg.num_classes, eps=2e-5),
        )
        # Only used by TransFace's masked training; kept so official state dicts load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.senet = nn.Sequential(
            nn.Linear(d * n, n, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(n, n, bias=False),
            nn.Sigmoid(),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_tokens(self) -> int:
        return self.config.num_patches

    @property
    def token_dim(self) -> int:
        return self.config.embed_dim

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block's final LayerNorm, before the feature head: (B, N, D)."""
        x = self.patch_embed(faces) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x.float())

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Global identity embedding (B, num_classes) from final-norm tokens, as the recognition head does."""
        b = tokens.shape[0]
        weights = self.senet(tokens.reshape(b, -1))  # one gate per token
        return self.feature((tokens * weights.unsqueeze(-1)).reshape(b, -1))

    def embed(self, faces: torch.Tensor) -> torch.Tensor:
        """Global identity embedding (B, num_classes), for face-similarity checks."""
        return self.embed_tokens(self.forward(faces))


def build_transface(variant: str = "S", seed: int | None = None, **overrides) -> TransFaceEncoder:
    """A randomly initialised encoder of a named variant (optionally seeded), in eval mode.

    Real weights come from ``fact_lightning.interop.official.load_transface``.
    """
    cfg = transface_config(variant)
    if overrides:
        cfg = TransFaceConfig(**{**cfg.to_dict(), **overrides})
    if seed is None:
        return TransFaceEncoder(cfg).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransFaceEncoder(cfg).eval()
