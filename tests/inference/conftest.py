"""Tiny generators for inference tests: seeded random SD1.5-topology parts with opened adapter gates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fact_lightning.inference import FacePortraitGenerator, IdentityCondition
from fact_lightning.models.face_encoder import build_transface
from fact_lightning.models.injection import FaceAdapter
from tests.conftest import FACES, photo, tiny_projection_config  # noqa: F401 (re-exported to the tests)

SIZE = 64  # generated image side: latents 8x8, fast on a CPU
FAST = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="np")


def open_gates(adapter: FaceAdapter, seed: int = 0) -> FaceAdapter:
    """A trained-like adapter: non-zero gates (a fresh one leaves the UNet unchanged)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in adapter.blocks.values():
            block.alpha_attn.copy_(1.0 + torch.rand((), generator=g))
            block.alpha_dense.copy_(1.0 + torch.rand((), generator=g))
    return adapter


def tiny_adapter(unet, seed: int = 0) -> FaceAdapter:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_gates(FaceAdapter.for_unet(unet, tiny_projection_config()), seed)


@pytest.fixture(scope="session")
def face_encoder():
    return build_transface("tiny", seed=0)


@pytest.fixture
def make_generator(tiny_base, face_encoder):
    def make(mode: str = "txt2img", controlnet=None, base=None) -> FacePortraitGenerator:
        base = base or tiny_base
        return FacePortraitGenerator.from_components(base, tiny_adapter(base.unet), face_encoder, mode=mode,
                                                     controlnet=controlnet)
    return make


@pytest.fixture(scope="session")
def identity(face_encoder) -> IdentityCondition:
    from fact_lightning.faces.encoding import encode_faces

    faces = np.random.default_rng(0).integers(0, 256, (1, 112, 112, 3), dtype=np.uint8)
    return IdentityCondition(torch.from_numpy(encode_faces(face_encoder, faces).astype(np.float32)))
