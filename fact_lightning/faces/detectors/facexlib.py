"""facexlib backend: RetinaFace (ResNet-50) detection + BiSeNet face parsing for the masks.

Weights come from a local folder only (no download here): ``detection_Resnet50_Final.pth`` and
``parsing_bisenet.pth``, the files facexlib itself downloads on first use. The parsing runs on a 512x512
face aligned with a widened ArcFace template (room for hair); its CelebAMask-HQ labels give the face
mask (skin, brows, eyes, glasses, nose, mouth, lips) and the head mask (those plus ears, earrings, hair, hat).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fact_lightning.faces.alignment import ARCFACE_TEMPLATE, similarity_transform, warp
from fact_lightning.faces.detectors.base import Detection, LabelMapRegions, downscale_for_detection

logger = logging.getLogger(__name__)

DETECTION_FILE = "detection_Resnet50_Final.pth"
PARSING_FILE = "parsing_bisenet.pth"
FACE_LABELS = (1, 2, 3, 4, 5, 6, 10, 11, 12, 13)
HEAD_LABELS = FACE_LABELS + (7, 8, 9, 17, 18)
PARSE_SIZE = 512
# ArcFace template placed in a 512 frame at half the full-frame scale: the face sits in the centre with
# margin for hair and ears, as facexlib's own 512 face template does.
PARSE_TEMPLATE = ARCFACE_TEMPLATE * (PARSE_SIZE / 112.0) * 0.5 + np.array([128.0, 120.0])
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _load_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "params" in state:
        state = state["params"]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


class FacexlibDetector:
    name = "facexlib"

    def __init__(self, detection_model: torch.nn.Module, parsing_model: torch.nn.Module,
                 device: str | torch.device = "cpu", min_confidence: float = 0.2, nms_threshold: float = 0.4,
                 detect_max_side: int = 1280):
        self.device = torch.device(device)
        self.detection_model = detection_model.to(self.device).eval()
        self.parsing_model = parsing_model.to(self.device).eval()
        self.min_confidence = min_confidence
        self.nms_threshold = nms_threshold
        self.detect_max_side = detect_max_side

    @classmethod
    def from_weights_dir(cls, weights_dir: Path | None, device: str | torch.device = "cpu") -> FacexlibDetector:
        """Build RetinaFace and BiSeNet from facexlib's classes and load local weights strictly."""
        if weights_dir is None:
            raise ValueError("the facexlib backend needs --detector-weights DIR holding "
                             f"{DETECTION_FILE} and {PARSING_FILE} (no downloads here)")
        weights_dir = Path(weights_dir)
        for name in (DETECTION_FILE, PARSING_FILE):
            if not (weights_dir / name).is_file():
                raise FileNotFoundError(f"facexlib weights missing: {weights_dir / name}")
        from facexlib.detection.retinaface import RetinaFace
        from facexlib.parsing.bisenet import BiSeNet

        detection = RetinaFace(network_name="resnet50", half=False, phase="test", device=torch.device(device))
        detection.load_state_dict(_load_state(weights_dir / DETECTION_FILE), strict=True)
        parsing = BiSeNet(num_class=19)
        parsing.load_state_dict(_load_state(weights_dir / PARSING_FILE), strict=True)
        return cls(detection, parsing, device=device)

    @torch.inference_mode()
    def detect(self, image: np.ndarray) -> list[Detection]:
        small, scale = downscale_for_detection(image, self.detect_max_side)
        bgr = np.ascontiguousarray(small[..., ::-1]).astype(np.float32)
        dets = self.detection_model.detect_faces(bgr, conf_threshold=self.min_confidence,
                                                 nms_threshold=self.nms_threshold, use_origin_size=True)
        out = []
        for row in np.asarray(dets, np.float64).reshape(-1, 15):
            # RetinaFace landmarks: image-left eye, image-right eye, nose, mouth left, mouth right.
            out.append(Detection(bbox=row[:4] / scale, landmarks=row[5:15].reshape(5, 2) / scale,
                                 score=float(row[4])))
        return sorted(out, key=lambda d: -d.score)

    @torch.inference_mode()
    def analyze(self, image: np.ndarray, detection: Detection):
        to_parse = similarity_transform(detection.landmarks, PARSE_TEMPLATE)
        face = warp(image, to_parse, (PARSE_SIZE, PARSE_SIZE)).astype(np.float32) / 255.0
        x = torch.from_numpy(((face - _MEAN) / _STD).transpose(2, 0, 1)).unsqueeze(0).to(self.device)
        logits = self.parsing_model(x)[0]
        labels = logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
        return detection, LabelMapRegions(labels, to_parse, FACE_LABELS, HEAD_LABELS)
