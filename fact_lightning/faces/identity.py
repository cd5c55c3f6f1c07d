"""Identity verification: flag images whose face does not match the rest of their identity.

Embedders: the offline dlib ResNet of ``face-recognition-models`` (128-d, Euclidean distance, the usual
threshold 0.6), or TransFace's global embedding computed from stored tokens (cosine distance) when real
TransFace weights are available.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DLIB_THRESHOLD = 0.6
TRANSFACE_THRESHOLD = 0.6  # cosine distance


def face_recognition_models_dir() -> Path:
    """Folder with the dlib model files, found without importing the package (its __init__ needs
    pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("face-recognition-models is not installed: pip install 'fact-lightning[dlib]'")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class DlibEmbedder:
    """128-d dlib face descriptors for a face box in an RGB image."""

    name = "dlib"
    metric = "euclidean"
    threshold = DLIB_THRESHOLD

    def __init__(self, models_dir: Path | None = None):
        import dlib  # lazy: optional dependency

        models = Path(models_dir) if models_dir else face_recognition_models_dir()
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def embed_image(self, image: np.ndarray, bbox) -> np.ndarray:
        x0, y0, x1, y1 = (int(round(v)) for v in bbox)
        rect = self._dlib.rectangle(x0, y0, x1, y1)
        image = np.ascontiguousarray(image)
        shape = self._shape(image, rect)
        return np.asarray(self._net.compute_face_descriptor(image, shape), np.float32)


@dataclass(frozen=True)
class Check:
    distance: float | None
    ok: bool


def _distance(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    if metric == "cosine":
        return float(1.0 - a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    return float(np.linalg.norm(a - b))


def check_identity(embeddings: list[np.ndarray], threshold: float, metric: str = "euclidean") -> list[Check]:
    """Per image: does it match (pair distance <= threshold) at least half of the identity's other images?

    A majority vote over pairwise distances, so one intruder cannot drag the others out (as it would a
    mean). ``distance`` is the median distance to the others. With two images a mismatch flags both
    (either may be the odd one out); a single image cannot be checked and passes.
    """
    n = len(embeddings)
    if n < 2:
        return [Check(None, True) for _ in embeddings]
    dist = np.array([[_distance(a, b, metric) for b in embeddings] for a in embeddings])
    checks = []
    for i in range(n):
        others = np.delete(dist[i], i)
        matches = int((others <= threshold).sum())
        checks.append(Check(round(float(np.median(others)), 4), 2 * matches >= n - 1))
    return checks


# -- TransFace: the identity curve of training previews ------------------------------------------------
def reference_embedding(encoder, tokens: np.ndarray, device="cpu") -> np.ndarray:
    """The L2-normalised TransFace embedding (C,) of one reference's stored tokens (T, D)."""
    from .encoding import embed_tokens

    return embed_tokens(encoder, np.asarray(tokens)[None], device=device)[0]


def face_embedding(image: np.ndarray, encoder, detector, device="cpu") -> np.ndarray | None:
    """The L2-normalised TransFace embedding (C,) of the main face of ``image`` (RGB uint8), None without one.

    The face is found and aligned as a reference photo is (``prepare_reference`` with ``LENIENT_POLICY``) and
    encoded to tokens as shards cache them, so it compares with :func:`reference_embedding`.
    """
    from .encoding import embed_tokens, encode_faces
    from .reference import LENIENT_POLICY, NoFaceError, prepare_reference

    try:
        face = prepare_reference(np.ascontiguousarray(image), detector, LENIENT_POLICY).face
    except NoFaceError:
        return None
    return embed_tokens(encoder, encode_faces(encoder, face[None], device=device), device=device)[0]


def face_similarity(image: np.ndarray, reference: np.ndarray, encoder, detector,
                    device="cpu") -> float | None:
    """Cosine similarity between the face in ``image`` and a :func:`reference_embedding`; None without a face."""
    embedding = face_embedding(image, encoder, detector, device)
    return None if embedding is None else float(np.dot(embedding, reference))
