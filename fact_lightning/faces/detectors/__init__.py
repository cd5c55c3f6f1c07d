"""Face detector backends. Each backend module is imported lazily by :func:`create_detector`."""

from __future__ import annotations

from pathlib import Path

from fact_lightning.faces.detectors.base import Detection, FaceDetector, FaceRegions

BACKENDS = ("mediapipe", "facexlib")

__all__ = ["BACKENDS", "Detection", "FaceDetector", "FaceRegions", "create_detector", "start_detector"]


def create_detector(backend: str, weights_dir: Path | None = None, device: str = "cpu") -> FaceDetector:
    """Build a detector backend by name; heavy imports happen here, not at package import."""
    if backend == "mediapipe":
        from fact_lightning.faces.detectors.mediapipe import MediaPipeDetector

        return MediaPipeDetector()
    if backend == "facexlib":
        from fact_lightning.faces.detectors.facexlib import FacexlibDetector

        return FacexlibDetector.from_weights_dir(weights_dir, device=device)
    raise ValueError(f"unknown detector backend {backend!r}; choose one of {BACKENDS}")


def start_detector(backend: str, weights_dir: Path | None = None, device: str = "cpu") -> FaceDetector:
    """:func:`create_detector`, then its start-up finished (a backend with ``warm_up`` runs it once), so that a
    command can wrap the whole start in one place (e.g. to keep native start-up lines off the terminal)."""
    detector = create_detector(backend, weights_dir, device)
    warm_up = getattr(detector, "warm_up", None)
    if warm_up is not None:
        warm_up()
    return detector
