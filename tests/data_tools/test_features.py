"""TransFace features: batching, dtype, the --encoder-weights path and TransFace identity checks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from data_tools.build import run_build
from data_tools.dataset import iter_images
from fact_lightning.faces.encoding import encode_faces, faces_to_tensor
from fact_lightning.files import sha256_file
from fact_lightning.interop.official import load_encoder
from dt_helpers import RAW, build_opts
from fact_lightning.data import schema
from fact_lightning.models.face_encoder import build_transface


def test_encode_faces_shape_dtype_and_batch_independence():
    model = build_transface("tiny", seed=0)
    faces = np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    a = encode_faces(model, faces, batch_size=2)
    b = encode_faces(model, faces, batch_size=5)
    assert a.shape == (5, 144, 64) and a.dtype == np.float16
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-2)
    with torch.inference_mode():
        ref = model(faces_to_tensor(faces)).numpy()
    np.testing.assert_allclose(a.astype(np.float32), ref, atol=2e-2)
    assert encode_faces(model, faces[:0]).shape == (0, 144, 64)
    x = faces_to_tensor(np.array([[[[0, 255, 0]]]], np.uint8))
    assert x.shape == (1, 3, 1, 1) and x.min() == -1 and x.max() == 1


def test_load_encoder_requires_weights_or_explicit_random(tmp_path):
    with pytest.raises(ValueError, match="--random-encoder"):
        load_encoder("tiny", None, allow_random=False)
    model, info = load_encoder("tiny", None, allow_random=True)
    assert info.random and info.weights_sha256 is None and not model.training


def test_build_with_encoder_weights_file(tmp_path):
    weights = tmp_path / "transface_tiny.pt"
    reference = build_transface("tiny", seed=123)
    torch.save(reference.state_dict(), weights)
    src = tmp_path / "src"
    for name in ("df_1", "fr_obama"):
        shutil.copytree(RAW / name, src / name)
    manifest = run_build(build_opts(src, tmp_path / "out", encoder_weights=weights, random_encoder=False,
                                    verify_identities=True))
    enc = manifest["encoder"]
    assert not enc["random"] and enc["weights_sha256"] == sha256_file(weights) and manifest["warnings"] == []
    for _, image in iter_images(tmp_path / "out"):
        with torch.inference_mode():
            expected = reference(faces_to_tensor(image[schema.FACE][None])).numpy()[0]
        np.testing.assert_allclose(image[schema.TOKENS].astype(np.float32), expected, atol=2e-2)
        # With real (here: file-loaded) weights, identity checks use TransFace's global embedding.
        assert image[schema.META]["identity_check"]["model"] == "transface"
