"""Face similarity and FID; the CLIP scores live in ``clip.py``.

Face similarity: cosine between a generated face's embedding and the mean embedding of the reference photos,
over generated images where a face is found (the detection rate is reported beside it). Embedders: TransFace's
global embedding of the aligned, head-masked face (``fact_lightning.faces.reference`` path) or the offline dlib ResNet.

FID: ``torchmetrics.image.fid.FrechetInceptionDistance`` with a custom feature extractor, CLIP's image
embedding by default, because Inception weights cannot be downloaded here (FID on CLIP features, as in
Kynkaanniemi et al. 2023, "The Role of ImageNet Classes in Frechet Inception Distance"). Numbers are
comparable only between runs using the same feature extractor; pass ``feature=2048`` (torchmetrics' Inception,
needs ``torch-fidelity`` and its weights) for the paper's FID.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


class TransFaceEmbedder:
    """TransFace global embedding of the main face; ``None`` when no face is found."""

    name = "transface"

    def __init__(self, encoder: torch.nn.Module, detector):
        self.encoder = encoder.eval()
        self.detector = detector

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        from fact_lightning.faces.identity import face_embedding

        return face_embedding(image, self.encoder, self.detector, next(self.encoder.parameters()).device)


class DlibFaceEmbedder:
    """The offline dlib ResNet (``face-recognition-models``) on the detector's main face box."""

    name = "dlib"

    def __init__(self, detector, models_dir=None):
        from fact_lightning.faces.identity import DlibEmbedder

        self.detector = detector
        self._dlib = DlibEmbedder(models_dir)

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        from fact_lightning.faces.reference import LENIENT_POLICY, NoFaceError, prepare_reference

        try:
            ref = prepare_reference(image, self.detector, LENIENT_POLICY)
        except NoFaceError:
            return None
        return self._dlib.embed_image(image, ref.detection.bbox)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def face_similarity(embedder, generated: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> dict:
    """{"face_sim": mean cosine (None if no face found), "face_detect_rate": fraction with a face}."""
    refs = [e for e in (embedder.embed(r) for r in references) if e is not None]
    if not refs:
        raise ValueError("no face found in any reference photo")
    target = np.mean([r / np.linalg.norm(r) for r in refs], axis=0)
    sims = [_cos(e, target) for e in (embedder.embed(g) for g in generated) if e is not None]
    return {"face_sim": float(np.mean(sims)) if sims else None, "face_detect_rate": len(sims) / max(len(generated), 1)}


def _uint8_batch(images: Sequence) -> torch.Tensor:
    arrays = []
    for image in images:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
        arrays.append(arr[..., :3])
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def fid(real: Sequence, fake: Sequence, feature: torch.nn.Module | int) -> float:
    """Frechet distance between two image sets (same size within a set), via torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError("FID needs at least two images per set")
    metric = FrechetInceptionDistance(feature=feature, normalize=False)
    if isinstance(feature, torch.nn.Module):
        metric.inception = feature  # keep our module (torchmetrics stores it as-is; no download)
    metric.update(_uint8_batch(real), real=True)
    metric.update(_uint8_batch(fake), real=False)
    return float(metric.compute())

