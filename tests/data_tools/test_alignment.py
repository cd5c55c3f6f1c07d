import cv2
import numpy as np
import pytest

from fact_lightning.faces import alignment, masks


def test_similarity_recovers_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, (5, 2))
    angle, scale, t = 0.3, 0.7, np.array([12.0, -40.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rot.T + t
    m = alignment.similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-7)


def test_similarity_matches_opencv_least_squares_on_noisy_points():
    rng = np.random.default_rng(1)
    src = alignment.ARCFACE_TEMPLATE * 3 + rng.normal(0, 2, (5, 2)) + 100
    m = alignment.similarity_transform(src, alignment.ARCFACE_TEMPLATE)
    ref, _ = cv2.estimateAffinePartial2D(src, alignment.ARCFACE_TEMPLATE, method=cv2.LMEDS)
    # Both are least-squares-like fits of the same similarity; they agree closely on clean-ish points.
    np.testing.assert_allclose(alignment.apply_affine(m, src), alignment.apply_affine(ref, src), atol=1.5)
    # A reflection is never returned.
    assert np.linalg.det(m[:, :2]) > 0


def test_arcface_template_maps_to_itself():
    m = alignment.arcface_matrix(alignment.ARCFACE_TEMPLATE)
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-9)


@pytest.mark.parametrize("bbox,size", [([100, 100, 200, 220], (1000, 800)), ([0, 5, 300, 300], (320, 900)),
                                       ([900, 700, 990, 790], (1000, 800))])
def test_crop_box_is_square_inside_image_and_contains_face(bbox, size):
    box = alignment.crop_box(np.array(bbox, float), size)
    assert box[2] - box[0] == pytest.approx(box[3] - box[1])
    assert box[0] >= -1e-9 and box[1] >= -1e-9 and box[2] <= size[0] + 1e-9 and box[3] <= size[1] + 1e-9
    assert box[0] <= bbox[0] and box[1] <= bbox[1] and box[2] >= bbox[2] and box[3] >= bbox[3]


def test_box_fraction_outside():
    assert alignment.box_fraction_outside(np.array([0, 0, 10, 10]), (100, 100)) == 0.0
    assert alignment.box_fraction_outside(np.array([-10, 0, 10, 10]), (100, 100)) == pytest.approx(0.5)


def test_dilate_grows_and_overlay_keeps_shape():
    m = np.zeros((50, 50), np.uint8)
    m[20:30, 20:30] = 255
    assert masks.coverage(masks.dilate(m, 3)) > masks.coverage(m)
    assert masks.dilate(m, 0.2) is m
    img = np.full((50, 50, 3), 100, np.uint8)
    assert masks.overlay(img, m).shape == img.shape
    assert (masks.apply_mask(img, m)[0, 0] == 0).all() and (masks.apply_mask(img, m)[25, 25] == 100).all()
