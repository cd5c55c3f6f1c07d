import dataclasses
import inspect

import numpy as np
import pytest
import torch

from fact_lightning.inference import (DEFAULT_GUIDANCE, DEFAULT_NEGATIVE_PROMPT, INPAINT_ADAPTER_SCALE,
                                      INPAINT_GUIDANCE, INPAINT_STRENGTH, FacePortraitGenerator)
from fact_lightning.inference.pipelines import build_pipeline
from fact_lightning.inference.recipe import INFERENCE_ADAPTER_SCALE
from fact_lightning.tiny import tiny_inpaint_unet
from tests.inference.conftest import FAST


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_scale_zero_is_the_plain_base_pipeline_and_the_adapter_acts(tiny_base, make_generator, identity):
    plain = build_pipeline(tiny_base)
    plain.set_progress_bar_config(disable=True)
    negative = DEFAULT_NEGATIVE_PROMPT
    reference = plain("a photo of a man", negative_prompt=negative, generator=torch.Generator().manual_seed(0),
                      guidance_scale=7.0, **FAST).images[0]
    gen = make_generator(base=tiny_base)
    off = gen("a photo of a man", identity, adapter_scale=0.0, seed=0, **FAST)[0]
    on = gen("a photo of a man", identity, adapter_scale=0.5, seed=0, **FAST)[0]
    assert np.allclose(off, reference, atol=1e-5)  # defaults: guidance 7.0, the official negative prompt
    assert _diff(on, off) > 1e-3
    assert _diff(on, gen("a photo of a man", identity, adapter_scale=0.5, seed=0, **FAST)[0]) == 0  # seeded


def test_defaults_are_the_official_apps(make_generator, tiny_base, identity, monkeypatch):
    defaults = {k: v.default for k, v in inspect.signature(FacePortraitGenerator.__call__).parameters.items()}
    assert defaults["adapter_scale"] is None and defaults["strength"] is None  # resolved per pipeline kind
    assert defaults["num_inference_steps"] == 50 and defaults["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    assert DEFAULT_NEGATIVE_PROMPT == "monochrome, lowres, bad anatomy, worst quality, low quality"
    gen = make_generator()
    scheduler = gen.pipeline.scheduler
    assert type(scheduler).__name__ == "PNDMScheduler" and scheduler.config.skip_prk_steps
    seen = []

    def spy(pipeline, **kwargs):
        seen.append((kwargs["guidance_scale"], kwargs["cross_attention_kwargs"]["fact"].adapter_scale,
                     kwargs.get("strength")))
        raise StopIteration

    for g, mode, extra in ((gen, "txt2img", {}),
                           (make_generator(mode="inpaint", base=dataclasses.replace(tiny_base, unet=tiny_inpaint_unet(tiny_base))),
                            "inpaint", dict(image=np.zeros((64, 64, 3), np.uint8), mask_image=np.zeros((64, 64), np.uint8)))):
        monkeypatch.setattr(type(g.pipeline), "__call__", spy)
        with pytest.raises(StopIteration):
            g("a", identity, **extra)
    # What reaches the pipeline: the text-to-image app's settings, and the inpainting app's inpainting stage.
    assert seen == [(DEFAULT_GUIDANCE, INFERENCE_ADAPTER_SCALE, None),
                    (INPAINT_GUIDANCE, INPAINT_ADAPTER_SCALE, INPAINT_STRENGTH)] == [(7.0, 0.5, None), (5.0, 0.55, 0.6)]
    with pytest.raises(ValueError, match="strength is for inpainting"):
        gen("a", identity, strength=0.6, **FAST)


def test_a_negative_prompt_string_goes_with_every_prompt(make_generator, identity):
    gen = make_generator()
    one = gen(["a", "b"], identity, negative_prompt="blurry", seed=1, **FAST)
    listed = gen(["a", "b"], identity, negative_prompt=["blurry", "blurry"], seed=1, **FAST)
    none = gen(["a", "b"], identity, negative_prompt=None, seed=1, **FAST)
    assert len(one) == 2 and _diff(one[0], listed[0]) == 0 and _diff(one[1], listed[1]) == 0
    assert _diff(one[0], none[0]) > 1e-4  # the negative prompt is used
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        gen(["a", "b"], identity, negative_prompt=["x"], **FAST)


def test_guidance_pairs_negative_prompt_with_the_id_drop_embedding(make_generator, identity):
    """Eq. 5: diffusers' batch is [uncond, cond]; the uncond half must carry Prj(zeros)."""
    gen = make_generator()
    e_id, null = gen.identity_embeddings(identity)
    kwargs = gen.cross_attention_kwargs(identity, 3, adapter_scale=0.5, guidance=True)
    emb = kwargs["fact"].embeddings
    assert emb.shape == (6, 16, 32) and kwargs["fact"].adapter_scale == 0.5
    assert torch.equal(emb[:3], null.expand(3, -1, -1)) and torch.equal(emb[3:], e_id.expand(3, -1, -1))
    assert torch.allclose(null, gen.adapter.null_embedding(1))
    no_cfg = gen.cross_attention_kwargs(identity, 2, adapter_scale=0.5, guidance=False, lora_scale=0.7)
    assert no_cfg["fact"].embeddings.shape == (2, 16, 32) and no_cfg["scale"] == 0.7  # LoRA's key passes
    # The pipeline runs both ways, several images per prompt.
    assert len(gen(["a", "b"], identity, num_images=2, seed=1, **FAST)) == 4
    assert len(gen("a", identity, guidance_scale=1.0, seed=1, **FAST)) == 1


def test_text_only_guidance_gives_the_unconditional_branch_e_id(make_generator, identity):
    """Official cfg_face=False: both halves of the guidance batch carry e_id; the image changes."""
    gen = make_generator()
    e_id, _ = gen.identity_embeddings(identity)
    emb = gen.cross_attention_kwargs(identity, 2, adapter_scale=0.5, guidance=True,
                                     text_only_guidance=True)["fact"].embeddings
    assert torch.equal(emb, e_id.expand(4, -1, -1))
    eq5 = gen("a portrait", identity, seed=0, **FAST)[0]
    text_only = gen("a portrait", identity, seed=0, text_only_guidance=True, **FAST)[0]
    assert _diff(eq5, text_only) > 1e-4
    off = gen("a portrait", identity, seed=0, adapter_scale=0.0, **FAST)[0]
    assert _diff(off, gen("a portrait", identity, seed=0, adapter_scale=0.0, text_only_guidance=True, **FAST)[0]) == 0


def test_face_delay_switches_the_adapter_on_after_a_fraction_of_the_steps(tiny_base, make_generator, identity):
    """Our delayed_face_condition: delay 0 is the adapter on the whole run, delay 1 the plain base pipeline."""
    gen = make_generator(base=tiny_base)
    fast = {**FAST, "num_inference_steps": 4}
    normal = gen("a portrait", identity, seed=0, **fast)[0]
    no_face = gen("a portrait", identity, seed=0, adapter_scale=0.0, **fast)[0]
    plain = build_pipeline(tiny_base)
    plain.set_progress_bar_config(disable=True)
    base_image = plain("a portrait", negative_prompt=DEFAULT_NEGATIVE_PROMPT, guidance_scale=DEFAULT_GUIDANCE,
                       generator=torch.Generator().manual_seed(0), **fast).images[0]
    assert _diff(no_face, base_image) < 1e-5
    assert _diff(gen("a portrait", identity, seed=0, face_delay=1.0, **fast)[0], no_face) == 0
    assert _diff(gen("a portrait", identity, seed=0, face_delay=0.0, **fast)[0], normal) == 0
    half = gen("a portrait", identity, seed=0, face_delay=0.5, **fast)[0]
    assert _diff(half, normal) > 1e-5 and _diff(half, no_face) > 1e-5
    with pytest.raises(ValueError, match="face_delay"):
        gen("a", identity, face_delay=1.5, **FAST)


def test_face_delay_counts_the_steps_an_inpainting_strength_leaves(tiny_base, make_generator, identity):
    gen = make_generator(mode="inpaint", base=dataclasses.replace(tiny_base, unet=tiny_inpaint_unet(tiny_base)))
    template = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    args = dict(image=template, mask_image=mask, seed=0, **{**FAST, "num_inference_steps": 4})  # 0.6 x 4: 2 run
    normal, no_face = gen("a", identity, **args)[0], gen("a", identity, adapter_scale=0.0, **args)[0]
    assert _diff(gen("a", identity, face_delay=0.0, **args)[0], normal) == 0
    assert _diff(gen("a", identity, face_delay=1.0, **args)[0], no_face) == 0
    half = gen("a", identity, face_delay=0.5, **args)[0]  # the first of the two steps without the adapter
    assert _diff(half, normal) > 1e-6 and _diff(half, no_face) > 1e-6
    with pytest.raises(ValueError, match="no denoising step"):
        gen("a", identity, strength=0.2, **args)


def test_bad_settings_are_refused(make_generator, identity):
    gen = make_generator()
    with pytest.raises(ValueError, match="at least 1"):
        gen("a", identity, **{**FAST, "num_inference_steps": 0})
    with pytest.raises(TypeError, match="scale"):  # the adapter scale's old keyword fails loudly, not silently
        gen("a", identity, scale=0.0, seed=0, **FAST)


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
