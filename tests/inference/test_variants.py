"""LoRA, ControlNet and inpainting: each changes the output, and the adapter still acts alongside."""

import copy
import dataclasses

import numpy as np
from PIL import Image

from fact_lightning.tiny import tiny_controlnet, tiny_inpaint_unet
from tests.inference.lora import save_tiny_lora
from tests.inference.conftest import FAST, SIZE, photo


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_lora_changes_the_output_and_the_adapter_still_acts(tiny_base, make_generator, identity, tmp_path):
    lora = save_tiny_lora(tiny_base.unet, tmp_path, seed=3)
    gen = make_generator()
    before = gen("a photo", identity, seed=0, **FAST)[0]
    gen.load_lora(lora, weight=1.0)
    with_lora = gen("a photo", identity, seed=0, **FAST)[0]
    with_lora_no_face = gen("a photo", identity, adapter_scale=0.0, seed=0, **FAST)[0]
    half_lora = gen("a photo", identity, seed=0, lora_scale=0.5, **FAST)[0]
    assert _diff(with_lora, before) > 1e-3
    assert _diff(with_lora, with_lora_no_face) > 1e-3
    assert _diff(half_lora, with_lora) > 1e-4
    assert len(gen.adapter.attached_blocks) == 16


def test_controlnet_changes_the_output_and_the_adapter_still_acts(_tiny_base_session, make_generator, identity):
    plain = make_generator(base=copy.deepcopy(_tiny_base_session))("a photo", identity, seed=0, **FAST)[0]
    base = copy.deepcopy(_tiny_base_session)  # same weights, same adapter seed
    gen = make_generator(mode="controlnet", controlnet=tiny_controlnet(base.unet, seed=0), base=base)
    pose = np.zeros((SIZE, SIZE, 3), np.uint8)
    pose[16:48, 30:34] = 255
    pose[24:28, 16:48] = 255
    on = gen("a photo", identity, control_image=Image.fromarray(pose), seed=0, **FAST)[0]
    off = gen("a photo", identity, control_image=Image.fromarray(pose), adapter_scale=0.0, seed=0, **FAST)[0]
    weak = gen("a photo", identity, control_image=Image.fromarray(pose), controlnet_conditioning_scale=0.0, seed=0, **FAST)[0]
    assert _diff(on, plain) > 1e-3  # the ControlNet steers the image
    assert np.allclose(weak, plain, atol=1e-5)  # at conditioning scale 0 it is the text-to-image result
    assert _diff(on, off) > 1e-3  # and the adapter acts with it


def test_inpainting_regenerates_only_the_face_region(tiny_base, make_generator, identity, detector):
    from fact_lightning.faces.reference import face_region_mask

    base = dataclasses.replace(tiny_base, unet=tiny_inpaint_unet(tiny_base, seed=0))
    gen = make_generator(mode="inpaint", base=base)
    template = np.asarray(Image.fromarray(photo("fr_biden", 0)).resize((SIZE, SIZE), Image.BICUBIC))
    big = photo("fr_biden", 0)
    mask = face_region_mask(big, detector, dilate=0.1)
    mask = (np.asarray(Image.fromarray(mask).resize((SIZE, SIZE), Image.NEAREST)) >= 128).astype(np.uint8) * 255
    inside = mask >= 128
    assert 0.05 < inside.mean() < 0.8
    args = dict(image=Image.fromarray(template), mask_image=Image.fromarray(mask), seed=0, **FAST)
    on = gen("a photo", identity, adapter_scale=0.5, **args)[0]
    off = gen("a photo", identity, adapter_scale=0.0, **args)[0]
    t = template / 255.0
    assert np.abs(on - t)[~inside].max() < 1e-6  # the template outside the face region, untouched
    assert np.abs(on - t)[inside].mean() > 0.05  # the face region regenerated
    assert np.abs(on - off)[inside].max() > 1e-3 and np.abs(on - off)[~inside].max() < 1e-6
    raw = gen("a photo", identity, keep_outside_mask=False, **args)[0]
    assert np.abs(raw - t)[~inside].mean() > 1e-3  # the paste-back is what keeps it (random tiny VAE)
