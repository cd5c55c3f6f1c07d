import dataclasses

import numpy as np
import pytest
import torch

from fact_lightning.inference.pipelines import build_pipeline
from fact_lightning.tiny import tiny_inpaint_unet
from tests.inference.conftest import FAST


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_scale_zero_is_the_plain_base_pipeline_and_the_adapter_acts(tiny_base, make_generator, identity):
    plain = build_pipeline(tiny_base)
    plain.set_progress_bar_config(disable=True)
    reference = plain("a photo of a man", generator=torch.Generator().manual_seed(0), guidance_scale=5.0, **FAST).images[0]
    gen = make_generator(base=tiny_base)
    off = gen("a photo of a man", identity, scale=0.0, seed=0, **FAST)[0]
    on = gen("a photo of a man", identity, scale=0.5, seed=0, **FAST)[0]
    assert np.allclose(off, reference, atol=1e-5)
    assert _diff(on, off) > 1e-3
    assert _diff(on, gen("a photo of a man", identity, scale=0.5, seed=0, **FAST)[0]) == 0  # seeded


def test_guidance_pairs_negative_prompt_with_the_id_drop_embedding(make_generator, identity):
    """Eq. 5: diffusers' batch is [uncond, cond]; the uncond half must carry Prj(zeros)."""
    gen = make_generator()
    e_id, null = gen.identity_embeddings(identity)
    kwargs = gen.cross_attention_kwargs(identity, 3, adapter_scale=0.5, guidance=True)
    emb = kwargs["fact"].embeddings
    assert emb.shape == (6, 16, 32) and kwargs["fact"].scale == 0.5
    assert torch.equal(emb[:3], null.expand(3, -1, -1)) and torch.equal(emb[3:], e_id.expand(3, -1, -1))
    assert torch.allclose(null, gen.adapter.null_embedding(1))
    no_cfg = gen.cross_attention_kwargs(identity, 2, adapter_scale=0.5, guidance=False, lora_scale=0.7)
    assert no_cfg["fact"].embeddings.shape == (2, 16, 32) and no_cfg["scale"] == 0.7  # LoRA's key passes
    # The pipeline runs both ways, several images per prompt.
    assert len(gen(["a", "b"], identity, num_images=2, seed=1, **FAST)) == 4
    assert len(gen("a", identity, guidance_scale=1.0, seed=1, **FAST)) == 1


def test_several_reference_photos_concatenate_sixteen_tokens_each(make_generator):
    gen = make_generator()
    faces = np.random.default_rng(1).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    three = gen.encode_references(faces, aligned=True)
    one = gen.encode_references(faces[:1], aligned=True)
    e_id, null = gen.identity_embeddings(three)
    assert three.num_photos == 3 and e_id.shape == null.shape == (1, 48, 32)
    assert torch.allclose(e_id[:, :16], gen.identity_embeddings(one)[0], atol=1e-5)
    assert torch.allclose(null[:, 16:32], gen.adapter.null_embedding(1), atol=1e-6)
    out3 = gen("a portrait", three, seed=0, **FAST)[0]
    out1 = gen("a portrait", one, seed=0, **FAST)[0]
    assert out3.shape == out1.shape and _diff(out3, out1) > 1e-4


def test_misuse_is_reported(tiny_base, make_generator, identity):
    gen = make_generator()
    with pytest.raises(ValueError, match="inpainting"):
        gen("a", identity, image=np.zeros((64, 64, 3)), mask_image=np.zeros((64, 64)), **FAST)
    with pytest.raises(ValueError, match="ControlNet"):
        gen("a", identity, control_image=np.zeros((64, 64, 3)), **FAST)
    with pytest.raises(ValueError, match="detector"):
        gen.encode_references([np.zeros((200, 200, 3), np.uint8)])
    with pytest.raises(ValueError, match="4-channel"):
        build_pipeline(dataclasses.replace(tiny_base, unet=tiny_inpaint_unet(tiny_base)), "txt2img")
    with pytest.raises(ValueError, match="needs a ControlNet"):
        build_pipeline(tiny_base, "controlnet")
