"""MediaPipe backend (the default): full-range face detector + 468-point face mesh, all offline.

Detection runs on a copy downscaled to ``detect_max_side``; the face mesh runs on a square crop around
each detected face, so landmarks stay precise on large photos. The 5 ArcFace points come from the mesh
(eye-contour centres, nose tip, mouth corners); the face mask is the mesh's face-oval polygon and the head
mask that oval widened a little and stretched upward over forehead and hair.
"""

from __future__ import annotations

import logging
import warnings

import cv2
import numpy as np

from fact_lightning.faces.detectors.base import Detection, PolygonRegions, downscale_for_detection

logger = logging.getLogger(__name__)

NOSE_TIP = 1
MOUTH_IMAGE_LEFT, MOUTH_IMAGE_RIGHT = 61, 291  # the subject's right / left mouth corners


def _ordered_cycle(edges) -> list[int]:
    """Order the vertices of a closed polygon given as an unordered set of (a, b) edges."""
    neighbours: dict[int, list[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    start = min(neighbours)
    cycle, prev, cur = [start], None, start
    while True:
        nxt = next(n for n in sorted(neighbours[cur]) if n != prev)
        if nxt == start:
            return cycle
        cycle.append(nxt)
        prev, cur = cur, nxt


def head_polygon(oval: np.ndarray, eyes_mid: np.ndarray, mouth_mid: np.ndarray,
                 widen: float = 1.2, up: float = 1.8) -> np.ndarray:
    """The face oval widened by ``widen`` and stretched by ``up`` along the face's upward axis."""
    axis = eyes_mid - mouth_mid
    axis = axis / max(np.linalg.norm(axis), 1e-6)
    centre = oval.mean(axis=0)
    d = oval - centre
    along = d @ axis
    perp = d - along[:, None] * axis
    stretch = np.where(along > 0, up, 1.05)
    return centre + perp * widen + (along * stretch)[:, None] * axis


class MediaPipeDetector:
    name = "mediapipe"

    def __init__(self, model_selection: int = 1, min_confidence: float = 0.2, detect_max_side: int = 1024,
                 mesh_size: int = 384, mesh_margin: float = 2.0):
        import mediapipe as mp  # lazy: heavy import

        solutions = mp.solutions
        self._detector = solutions.face_detection.FaceDetection(
            model_selection=model_selection, min_detection_confidence=min_confidence)
        self._mesh = solutions.face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=1, refine_landmarks=False, min_detection_confidence=0.3)
        fm = solutions.face_mesh
        self._oval = np.array(_ordered_cycle(fm.FACEMESH_FACE_OVAL))
        # The subject's right eye appears on the image's left.
        self._eye_left = np.array(sorted({i for e in fm.FACEMESH_RIGHT_EYE for i in e}))
        self._eye_right = np.array(sorted({i for e in fm.FACEMESH_LEFT_EYE for i in e}))
        self.detect_max_side = detect_max_side
        self.mesh_size = mesh_size
        self.mesh_margin = mesh_margin

    def close(self) -> None:
        self._detector.close()
        self._mesh.close()

    def warm_up(self) -> None:
        """Runs both models once on a blank image: their native start-up (threads, and the lines they print on
        file descriptor 2) happens now rather than during the first real photo."""
        blank = np.zeros((64, 64, 3), np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self._detector.process(blank)
            self._mesh.process(blank)

    def detect(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        small, scale = downscale_for_detection(image, self.detect_max_side)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # protobuf deprecation noise
            result = self._detector.process(np.ascontiguousarray(small))
        out = []
        for det in result.detections or []:
            box = det.location_data.relative_bounding_box
            bbox = np.array([box.xmin * w, box.ymin * h, (box.xmin + box.width) * w, (box.ymin + box.height) * h])
            kp = np.array([[k.x * w, k.y * h] for k in det.location_data.relative_keypoints])
            # Detector keypoints: subject's right eye, left eye, nose tip, mouth centre, ears. Mouth corners
            # are approximated here; analyze() replaces all five with face-mesh points.
            eye_vec = kp[1] - kp[0]
            mouth = np.stack([kp[3] - 0.35 * eye_vec, kp[3] + 0.35 * eye_vec])
            landmarks = np.vstack([kp[0], kp[1], kp[2], mouth])
            out.append(Detection(bbox=bbox, landmarks=landmarks, score=float(det.score[0])))
        return sorted(out, key=lambda d: -d.score)

    def analyze(self, image: np.ndarray, detection: Detection):
        cx, cy = (detection.bbox[:2] + detection.bbox[2:]) / 2
        side = self.mesh_margin * max(detection.width, detection.height, 1.0)
        s = self.mesh_size / side
        to_crop = np.array([[s, 0, self.mesh_size / 2 - s * cx], [0, s, self.mesh_size / 2 - s * cy]])
        crop = cv2.warpAffine(image, to_crop, (self.mesh_size, self.mesh_size), flags=cv2.INTER_AREA
                              if s < 1 else cv2.INTER_LINEAR, borderValue=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = self._mesh.process(crop)
        if not result.multi_face_landmarks:
            return None
        lm = result.multi_face_landmarks[0].landmark
        pts = np.array([[p.x * self.mesh_size, p.y * self.mesh_size] for p in lm])
        pts = (pts - to_crop[:, 2]) / s  # back to source pixels
        eyes = pts[self._eye_left].mean(axis=0), pts[self._eye_right].mean(axis=0)
        five = np.vstack([eyes[0], eyes[1], pts[NOSE_TIP], pts[MOUTH_IMAGE_LEFT], pts[MOUTH_IMAGE_RIGHT]])
        oval = pts[self._oval]
        head = head_polygon(oval, (five[0] + five[1]) / 2, (five[3] + five[4]) / 2)
        refined = Detection(bbox=detection.bbox, landmarks=five, score=detection.score)
        return refined, PolygonRegions(face=oval, head=head)
