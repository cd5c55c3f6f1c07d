"""The facexlib backend's code path with random-weight RetinaFace and BiSeNet (no downloads here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fact_lightning.faces.alignment import crop_matrix
from data_tools.build import run_build
from data_tools.records import RecordOptions
from fact_lightning.faces.detectors import create_detector
from fact_lightning.faces.detectors.base import Detection
from fact_lightning.faces.detectors.facexlib import DETECTION_FILE, PARSING_FILE, FacexlibDetector
from dt_helpers import FACE_PHOTO, build_opts

pytest.importorskip("facexlib")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    from facexlib.detection.retinaface import RetinaFace
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("facexlib_weights")
    # facexlib's own files store DataParallel keys ("module."); the loader strips them.
    det = RetinaFace(network_name="resnet50", half=False, phase="test", device=torch.device("cpu"))
    torch.save({f"module.{k}": v for k, v in det.state_dict().items()}, d / DETECTION_FILE)
    torch.save(BiSeNet(num_class=19).state_dict(), d / PARSING_FILE)
    return d


@pytest.fixture(scope="module")
def small_face() -> np.ndarray:
    im = Image.open(FACE_PHOTO).convert("RGB")
    im.thumbnail((200, 200))
    return np.asarray(im)


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(ValueError, match="--detector-weights"):
        create_detector("facexlib", None)
    with pytest.raises(FileNotFoundError, match=DETECTION_FILE):
        create_detector("facexlib", tmp_path)


def test_detect_and_parse_with_random_weights(weights_dir, small_face, detector):
    fx = create_detector("facexlib", weights_dir)
    assert isinstance(fx, FacexlibDetector)
    dets = fx.detect(small_face)
    assert isinstance(dets, list)
    for d in dets[:5]:
        assert d.bbox.shape == (4,) and d.landmarks.shape == (5, 2) and 0.0 <= d.score <= 1.0
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    # Parsing + mask rendering from a known face (mediapipe's landmarks on the same photo).
    real = detector.analyze(small_face, detector.detect(small_face)[0])[0]
    refined, regions = fx.analyze(small_face, Detection(real.bbox, real.landmarks, 0.9))
    h, w = small_face.shape[:2]
    m = crop_matrix(np.array([0, 0, w, w], float), 64)
    face, head = regions.face_mask(m, (64, 64)), regions.head_mask(m, (64, 64))
    assert face.shape == head.shape == (64, 64) and face.dtype == np.uint8
    assert set(np.unique(face)) <= {0, 255}
    assert (head >= face).all()  # the head labels include the face labels


def test_build_with_facexlib_backend_never_crashes(weights_dir, tmp_path):
    src = tmp_path / "src" / "person"
    src.mkdir(parents=True)
    im = Image.open(FACE_PHOTO).convert("RGB")
    im.thumbnail((200, 200))
    im.save(src / "a.jpg")
    manifest = run_build(build_opts(tmp_path / "src", tmp_path / "out", detector="facexlib",
                                    detector_weights=weights_dir,
                                    record=RecordOptions(min_face_size=4)))
    c = manifest["counts"]
    assert c["found"] == 1 and c["accepted"] + c["rejected"] == 1
    assert manifest["detector"]["name"] == "facexlib"
