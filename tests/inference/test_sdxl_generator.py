"""The generator on the tiny SDXL stand-in: diffusers' SDXL pipelines with Eq. 5 guidance, inpainting, ControlNet,
LoRA, SDXL's micro-conditioning, and adapter files refused on the other base."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from fact_lightning.inference import DEFAULT_NEGATIVE_PROMPT, FacePortraitGenerator
from fact_lightning.inference.bases import BASE_TYPE_KEY, load_adapter_for
from fact_lightning.inference.pipelines import build_pipeline
from fact_lightning.models.adapter_io import save_adapter
from fact_lightning.models.injection import FaceAdapter
from fact_lightning.tiny import tiny_controlnet
from fact_lightning.tiny_sdxl import TINY_SDXL_RESAMPLER, tiny_sdxl_base_model
from tests.inference.conftest import FAST, SIZE, open_gates, tiny_adapter
from tests.inference.lora import tiny_lora_state_dict

PROMPT = "a photo of a woman"


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def _xl_session():
    return tiny_sdxl_base_model(seed=0)


@pytest.fixture
def xl(_xl_session):
    """A fresh copy of the tiny SDXL base (generators attach adapters and LoRAs to its UNet)."""
    return copy.deepcopy(_xl_session)


def xl_adapter(unet, seed: int = 0) -> FaceAdapter:
    """A seeded tiny SDXL adapter, one SFAGS per transformer stack (the SDXL default), gates opened."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_gates(FaceAdapter.for_unet(unet, TINY_SDXL_RESAMPLER, sites="stack"), seed)


def xl_generator(base, mode: str = "txt2img", controlnet=None) -> FacePortraitGenerator:
    return FacePortraitGenerator.from_components(base, xl_adapter(base.unet), mode=mode, controlnet=controlnet)


def test_text_to_image_is_seeded_and_scale_zero_is_the_stock_sdxl_pipeline(xl, identity):
    gen = xl_generator(xl)
    assert type(gen.pipeline).__name__ == "StableDiffusionXLPipeline" and gen.base_type == "sdxl"
    assert type(gen.pipeline.scheduler).__name__ == "EulerDiscreteScheduler"  # SDXL's own sampler by default
    first = gen(PROMPT, identity, adapter_scale=1.0, seed=0, **FAST)[0]
    again = gen(PROMPT, identity, adapter_scale=1.0, seed=0, **FAST)[0]
    off = gen(PROMPT, identity, adapter_scale=0.0, seed=0, **FAST)[0]
    assert first.shape == (SIZE, SIZE, 3) and np.isfinite(first).all()
    assert _diff(first, again) == 0  # deterministic for a seed
    assert _diff(first, off) > 1e-3  # the adapter acts
    # face_delay switches the adapter on mid-run through SDXL's callback too: 1.0 is no adapter at all.
    assert _diff(gen(PROMPT, identity, adapter_scale=1.0, face_delay=1.0, seed=0, **FAST)[0], off) == 0
    # At scale 0 the generator is diffusers' own SDXL pipeline with the same prompts and guidance.
    plain = build_pipeline(copy.deepcopy(xl))
    plain.set_progress_bar_config(disable=True)
    stock = plain(PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT, guidance_scale=7.0,
                  generator=torch.Generator().manual_seed(0), **FAST).images[0]
    assert np.allclose(off, stock, atol=1e-5)


def test_eq5_unconditional_branch_gets_prj_zeros_and_the_encoded_negative_prompt(xl, identity, make_generator):
    gen = xl_generator(xl)
    e_id, null = gen.identity_embeddings(identity)
    assert torch.allclose(null, gen.adapter.null_embedding(1), atol=1e-6) and _diff(e_id, null) > 1e-3
    seen = {"face": [], "text": [], "pooled": [], "time_ids": []}

    def adapter_input(module, args):  # the SFAGS is called as fuser(hidden_states, condition)
        seen["face"].append(args[1].embeddings.clone())

    def unet_input(module, args, kwargs):
        seen["text"].append(kwargs["encoder_hidden_states"].clone())
        seen["pooled"].append(kwargs["added_cond_kwargs"]["text_embeds"].clone())
        seen["time_ids"].append(kwargs["added_cond_kwargs"]["time_ids"].clone())

    hooks = [next(iter(gen.adapter.blocks.values())).register_forward_pre_hook(adapter_input),
             gen.pipeline.unet.register_forward_pre_hook(unet_input, with_kwargs=True)]
    try:
        gen(PROMPT, identity, negative_prompt=None, seed=0, **FAST)
        gen(PROMPT, identity, negative_prompt=None, seed=0, original_size=(1024, 768), crops_coords_top_left=(8, 16),
            target_size=(SIZE, SIZE), **FAST)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen["face"]) == len(seen["text"]) == 4  # two calls of two steps, one UNet call per step
    for face in seen["face"]:  # diffusers' batch is [uncond, cond]
        assert torch.equal(face[:1], null) and torch.equal(face[1:], e_id)
    # No negative prompt is the encoded "" (the text-drop condition of training), not stock SDXL's zeros.
    empty, prompt = xl.encode_prompt(""), xl.encode_prompt(PROMPT)
    for text, pooled in zip(seen["text"], seen["pooled"]):
        assert torch.allclose(text[:1], empty.tokens, atol=1e-5) and torch.allclose(text[1:], prompt.tokens, atol=1e-5)
        assert torch.allclose(pooled[:1], empty.pooled, atol=1e-5) and pooled[:1].abs().sum() > 0
    # Micro-conditioning: the pipeline's defaults (the generated size, (0, 0)), or what was given, in both branches.
    assert seen["time_ids"][0].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2
    assert seen["time_ids"][2].tolist() == [[1024, 768, 8, 16, SIZE, SIZE]] * 2
    with pytest.raises(ValueError, match="original_size is SDXL's micro-conditioning"):
        make_generator()(PROMPT, identity, original_size=(512, 512), **FAST)  # SD1.5 would swallow it
    with pytest.raises(ValueError, match="must be a pair"):
        gen(PROMPT, identity, target_size=(64, 64, 3), **FAST)


def test_inpainting_keeps_the_pixels_outside_the_mask(xl, identity):
    gen = xl_generator(xl, mode="inpaint")  # SDXL's inpainting pipeline on the 4-channel UNet (latent blending)
    assert type(gen.pipeline).__name__ == "StableDiffusionXLInpaintPipeline"
    template = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[16:48, 12:44] = 255
    inside = mask >= 128
    args = dict(image=Image.fromarray(template), mask_image=Image.fromarray(mask), seed=0,
                **{**FAST, "num_inference_steps": 4})  # strength 0.6 (the official inpainting stage): 2 steps run
    on = gen(PROMPT, identity, **args)[0]
    off = gen(PROMPT, identity, adapter_scale=0.0, **args)[0]
    t = template / 255.0
    assert np.abs(on - t)[~inside].max() < 1e-6  # the template outside the face region, untouched
    assert np.abs(on - t)[inside].mean() > 0.05  # the face region regenerated
    assert np.abs(on - off)[inside].max() > 1e-3 and np.abs(on - off)[~inside].max() < 1e-6


def test_controlnet_and_lora_change_the_output_and_the_adapter_stays(_xl_session, identity, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    base = copy.deepcopy(_xl_session)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=tiny_lora_state_dict(base.unet, seed=3))
    gen = xl_generator(base)
    plain = gen(PROMPT, identity, seed=0, **FAST)[0]
    gen.load_lora(tmp_path / "pytorch_lora_weights.safetensors", weight=1.0)
    with_lora = gen(PROMPT, identity, seed=0, **FAST)[0]
    assert _diff(with_lora, plain) > 1e-3
    assert len(gen.adapter.attached_blocks) == 11  # the adapter is still on every stack

    base = copy.deepcopy(_xl_session)
    control = xl_generator(base, mode="controlnet", controlnet=tiny_controlnet(base.unet, seed=0))
    assert type(control.pipeline).__name__ == "StableDiffusionXLControlNetPipeline"
    pose = np.zeros((SIZE, SIZE, 3), np.uint8)
    pose[16:48, 30:34] = 255
    pose[24:28, 16:48] = 255
    steered = control(PROMPT, identity, control_image=Image.fromarray(pose), seed=0, **FAST)[0]
    assert _diff(steered, plain) > 1e-3  # the ControlNet steers the image


def test_an_adapter_for_the_other_base_is_refused(xl, tiny_base, tmp_path):
    from fact_lightning.interop.official import export_fact_checkpoint

    sd15 = tiny_adapter(tiny_base.unet)
    recorded = save_adapter(sd15, tmp_path / "sd15.safetensors", metadata={BASE_TYPE_KEY: "sd15"})
    unrecorded = save_adapter(sd15, tmp_path / "old.safetensors")  # written before the key existed
    official = export_fact_checkpoint(sd15, tmp_path / "fact.bin")
    sd15.detach()
    with pytest.raises(ValueError, match=r"is for SD1.5 \(its metadata says so\) but the base model is SDXL"):
        load_adapter_for(xl, recorded)
    with pytest.raises(ValueError, match=r"is for SD1.5 \(the official FACT format says so\)"):
        load_adapter_for(xl, official)
    with pytest.raises(ValueError, match="another UNet layout .16 adapted blocks"):  # its sites, checked on the UNet
        load_adapter_for(xl, unrecorded)

    own = xl_adapter(xl.unet)
    path = save_adapter(own, tmp_path / "xl.safetensors", metadata={BASE_TYPE_KEY: "sdxl"})
    own.detach()
    loaded = load_adapter_for(xl, path)  # fits: attached to the SDXL UNet, ready for a generator
    assert [s.path for s in loaded.sites] == [s.path for s in own.sites]
    assert FacePortraitGenerator.from_components(xl, loaded).base_type == "sdxl"
    with pytest.raises(ValueError, match="is for SDXL .* but the base model is SD1.5"):
        load_adapter_for(tiny_base, path)
    bad = save_adapter(loaded, tmp_path / "bad.safetensors", metadata={BASE_TYPE_KEY: "sd3"})
    with pytest.raises(ValueError, match="records base type 'sd3'"):
        load_adapter_for(xl, bad)
