"""Batched TransFace features for aligned reference faces. Model and device are passed in."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

RANDOM_ENCODER_SEED = 0
RANDOM_ENCODER_WARNING = (
    "features come from a RANDOMLY INITIALISED TransFace encoder: fine for tests and demos, "
    "useless for training a real adapter"
)


@dataclass(frozen=True)
class EncoderInfo:
    """What the manifest records about the encoder."""

    variant: str
    config: dict
    weights: str | None
    weights_sha256: str | None
    random: bool

    def to_dict(self) -> dict:
        return {"variant": self.variant, "config": self.config, "weights": self.weights,
                "weights_sha256": self.weights_sha256, "random": self.random}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_encoder(variant: str, weights: Path | None, allow_random: bool) -> tuple[torch.nn.Module, EncoderInfo]:
    """The TransFace encoder for a build: official weights, or (explicitly) seeded random weights.

    Raises FileNotFoundError / ValueError with a message meant for the user.
    """
    from fact_lightning.models.face_encoder import build_transface, transface_config

    cfg = transface_config(variant)
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"TransFace weights not found: {weights} (e.g. ms1mv2_model_TransFace_S.pt)")
        from fact_lightning.interop.official import load_transface  # lazy: owned by the interop module

        model = load_transface(weights, **cfg.to_dict())
        info = EncoderInfo(variant, model.config.to_dict(), str(weights), sha256_file(weights), False)
        return model.eval(), info
    if not allow_random:
        raise ValueError(
            "no TransFace weights given: pass --encoder-weights path/to/ms1mv2_model_TransFace_S.pt "
            "(the official file), or --random-encoder to use seeded random weights (tests and demos only)")
    logger.warning(RANDOM_ENCODER_WARNING)
    model = build_transface(variant, seed=RANDOM_ENCODER_SEED)
    return model, EncoderInfo(variant, cfg.to_dict(), None, None, True)


def faces_to_tensor(faces: np.ndarray) -> torch.Tensor:
    """uint8 (N, 112, 112, 3) RGB -> float (N, 3, 112, 112) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@torch.inference_mode()
def encode_faces(model: torch.nn.Module, faces: np.ndarray, device: torch.device | str = "cpu",
                 batch_size: int = 32) -> np.ndarray:
    """TransFace final-norm tokens for aligned faces: uint8 (N, 112, 112, 3) -> float16 (N, T, D).

    Batches are consecutive slices of ``faces``, so a given input order always gives the same batches.
    """
    if len(faces) == 0:
        return np.zeros((0, model.num_tokens, model.token_dim), np.float16)
    device = torch.device(device)
    use_amp = device.type == "cuda"
    out = []
    for start in range(0, len(faces), batch_size):
        x = faces_to_tensor(faces[start:start + batch_size]).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            tokens = model(x)
        out.append(tokens.float().cpu().numpy().astype(np.float16))
    return np.concatenate(out)


@torch.inference_mode()
def embed_tokens(model: torch.nn.Module, tokens: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """TransFace global embeddings (N, C), L2-normalised, from stored float16 tokens."""
    t = torch.from_numpy(tokens.astype(np.float32)).to(device)
    emb = model.embed_tokens(t).float()
    return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
