"""CLIP embeddings for CLIP-T, CLIP-I and CLIP style, from a local folder or hub id (or tiny and random).

Scores are ``100 * cosine`` as in the papers' tables (torchmetrics' ``CLIPScore`` is the same number clamped at
0; we keep the sign so that a random test model's scores stay comparable).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fact_lightning.weights import MissingWeightsError, Needed, check_source, resolve_source

log = logging.getLogger(__name__)

# What ``CLIPModel``/``CLIPProcessor.from_pretrained`` read from a folder such as openai/clip-vit-large-patch14.
CLIP_FILES = (
    Needed("config.json"),
    Needed("model.safetensors", ("pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")),
    Needed("preprocessor_config.json"),
    Needed("vocab.json", ("tokenizer.json",)),
    Needed("merges.txt", ("tokenizer.json",)),
)


def clip_problem(source: str | Path, *, local_files_only: bool = False) -> str | None:
    """Why :meth:`ClipScorer.from_pretrained` would not find CLIP at ``source`` (None when it would), checked
    without loading anything: a local folder must hold every file, a hub id must be cached or downloadable."""
    return check_source(source, "CLIP folder", CLIP_FILES, local_files_only=local_files_only, option="--clip").problem


def _pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


class ClipScorer(torch.nn.Module):
    """A ``transformers.CLIPModel`` with its processor: normalised image and text embeddings."""

    def __init__(self, model, processor):
        super().__init__()
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, source: str | Path, *, local_files_only: bool = False) -> ClipScorer:
        """e.g. a local copy of ``openai/clip-vit-large-patch14``; MissingWeightsError when unavailable."""
        from transformers import CLIPModel, CLIPProcessor

        location = resolve_source(source, "CLIP folder").location
        try:
            return cls(CLIPModel.from_pretrained(location, local_files_only=local_files_only),
                       CLIPProcessor.from_pretrained(location, local_files_only=local_files_only))
        except (OSError, ValueError) as err:
            raise MissingWeightsError(f"could not load CLIP from {str(source)!r}: {err}") from err

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        """(N, D) unit vectors for PIL images or uint8/float arrays."""
        pixels = self.processor(images=[_pil(i) for i in images], return_tensors="pt")["pixel_values"]
        feats = self.model.get_image_features(pixel_values=pixels.to(self.device))
        return F.normalize(_tensor(feats).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        feats = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                             attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(_tensor(feats).float(), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> (N, D) features: the FID feature extractor (see ``metrics.fid``)."""
        arrays = [x.permute(1, 2, 0).cpu().numpy().astype(np.uint8) for x in images]
        return self.image_features(arrays)


def _tensor(out) -> torch.Tensor:
    """transformers 5 may return a model output object from ``get_*_features``."""
    if isinstance(out, torch.Tensor):
        return out
    return getattr(out, "pooler_output", None) if getattr(out, "pooler_output", None) is not None else out[0]


def clip_t(scorer: ClipScorer, images: Sequence, prompts: Sequence[str]) -> float:
    """Mean over pairs of 100 * cos(image, its prompt)."""
    return float(100 * (scorer.image_features(images) * scorer.text_features(prompts)).sum(-1).mean())


def clip_i(scorer: ClipScorer, images: Sequence, others: Sequence) -> float:
    """Mean over pairs of 100 * cos(image, other image): CLIP-I (vs references) and CLIP style (vs base)."""
    return float(100 * (scorer.image_features(images) * scorer.image_features(others)).sum(-1).mean())
