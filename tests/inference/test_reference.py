"""The reference photo takes fact-data's path: same detector, policy, alignment and head mask."""

import numpy as np
import pytest

from fact_lightning.faces.reference import NoFaceError, face_region_mask, prepare_reference
from tests.inference.conftest import FACES, photo


def test_reference_face_is_the_shard_records_face(detector):
    from data_tools.records import RecordOptions, process_item
    from data_tools.sources import SourceItem

    path = sorted((FACES / "fr_obama").iterdir())[0]
    record = process_item(SourceItem("fr_obama", path.name, str(path), ""), detector, RecordOptions())
    ref = prepare_reference(photo("fr_obama", 0), detector)
    assert ref.face.shape == (112, 112, 3) and ref.face.dtype == np.uint8
    assert np.array_equal(ref.face, record.face)
    assert ref.face[0, 0].sum() == 0 and ref.face[56, 56].sum() > 0  # head-masked, face present


def test_no_face_is_a_clear_error(detector):
    with pytest.raises(NoFaceError, match="no_face"):
        prepare_reference(np.full((200, 200, 3), 128, np.uint8), detector)
    with pytest.raises(ValueError, match="RGB uint8"):
        prepare_reference(np.zeros((10, 10), np.uint8), detector)


def test_face_region_mask_covers_the_face(detector):
    image = photo("fr_biden", 0)
    mask = face_region_mask(image, detector)
    ref = prepare_reference(image, detector)
    x0, y0, x1, y1 = ref.detection.bbox.astype(int)
    assert mask.shape == image.shape[:2]
    assert (mask[y0:y1, x0:x1] >= 128).mean() > 0.5 and (mask >= 128).mean() < 0.5
    head = face_region_mask(image, detector, head=True)
    assert (head >= 128).sum() > (mask >= 128).sum() * 0.9
