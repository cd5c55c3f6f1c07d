"""Geometry: ArcFace 5-point alignment and the face-aware square training crop. Pure numpy + cv2."""

from __future__ import annotations

import cv2
import numpy as np

# ArcFace template for 112x112 faces: image-left eye, image-right eye, nose tip, mouth corners.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping src -> dst.

    Umeyama's closed form (1991) without reflection. src, dst: (N, 2). Returns a 2x3 matrix.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c**2).sum() / len(src)
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1.0
    rot = u @ sign @ vt
    scale = np.trace(np.diag(sig) @ sign) / var_s if var_s > 0 else 1.0
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.asarray(points, np.float64) @ matrix[:, :2].T + matrix[:, 2]


def arcface_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """2x3 similarity from source pixels to an aligned ``size`` x ``size`` face (template scaled)."""
    return similarity_transform(landmarks, ARCFACE_TEMPLATE * (size / 112.0))


def warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Warp an image into a target frame; area-averaging when shrinking, zero outside the source."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale < 0.5:
        # Pre-shrink with area interpolation to avoid aliasing, then warp the small image.
        f = scale * 1.5
        small = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
        fx = small.shape[1] / image.shape[1]
        fy = small.shape[0] / image.shape[0]
        matrix = matrix @ np.diag([1 / fx, 1 / fy, 1.0])
        image = small
    return cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def crop_box(bbox: np.ndarray, image_size: tuple[int, int], face_fraction: float = 0.35,
             down_shift: float = 0.15) -> np.ndarray:
    """A face-aware square [x0, y0, x1, y1] in source pixels for the training crop.

    The square is sized so the face box's larger side is ``face_fraction`` of it, centred on the face and
    shifted down by ``down_shift`` of the side (shoulders rather than sky), then shrunk to fit the image
    and slid inside it; it only leaves the image when the face itself is larger than the image allows.
    """
    w, h = image_size
    face = max(bbox[2] - bbox[0], bbox[3] - bbox[1], 1.0)
    side = min(face / face_fraction, float(min(w, h)))
    side = max(side, face)  # never cut the face
    cx = (bbox[0] + bbox[2]) / 2
    cy = (bbox[1] + bbox[3]) / 2 + down_shift * side
    x0 = float(np.clip(cx - side / 2, 0, max(w - side, 0))) if side <= w else cx - side / 2
    y0 = float(np.clip(cy - side / 2, 0, max(h - side, 0))) if side <= h else cy - side / 2
    # Keep the whole face box inside vertically (the down shift must not cut the forehead).
    y0 = min(y0, float(bbox[1])) if side <= h else y0
    return np.array([x0, y0, x0 + side, y0 + side])


def crop_matrix(box: np.ndarray, resolution: int) -> np.ndarray:
    """2x3 affine from source pixels to the ``resolution`` x ``resolution`` crop of ``box``."""
    s = resolution / (box[2] - box[0])
    return np.array([[s, 0, -s * box[0]], [0, s, -s * box[1]]])


def box_fraction_outside(bbox: np.ndarray, image_size: tuple[int, int]) -> float:
    """Fraction of a box's area lying outside the image."""
    w, h = image_size
    area = max(bbox[2] - bbox[0], 0) * max(bbox[3] - bbox[1], 0)
    if area <= 0:
        return 1.0
    ix = max(0.0, min(bbox[2], w) - max(bbox[0], 0))
    iy = max(0.0, min(bbox[3], h) - max(bbox[1], 0))
    return float(1.0 - ix * iy / area)
