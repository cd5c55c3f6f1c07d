"""Batched face-encoder tokens and embeddings for aligned faces. Model and device are passed in."""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

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
