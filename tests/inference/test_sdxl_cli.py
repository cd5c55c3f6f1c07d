"""`fact-generate` on SDXL through the console script: the tiny stand-in (`--tiny --base-type sdxl`), an SDXL
diffusers folder with an adapter file that records its base type, inpainting, and every adapter/base mismatch as
one `error:` line before any model loads. The weights are the tiny SDXL stand-in written by `save_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fact_lightning.inference.bases import BASE_TYPE_KEY
from fact_lightning.models.adapter_io import read_adapter_metadata, save_adapter
from fact_lightning.models.face_encoder import build_transface
from fact_lightning.models.injection import FaceAdapter
from fact_lightning.models.resampler import ResamplerConfig
from fact_lightning.tiny import tiny_base_model
from fact_lightning.tiny_sdxl import TINY_SDXL_CROSS_ATTENTION_DIM, tiny_sdxl_base_model
from tests.inference.cli_runner import NOISE, assert_one_error, run_cli
from tests.inference.conftest import FACES
from tests.models.test_single_file import write_single_file

REFERENCE = sorted((FACES / "fr_obama").iterdir())[0]
TEMPLATE = sorted((FACES / "fr_biden").iterdir())[0]
FAST = ("--prompt", "a photo of {subject}", "--steps", "2", "--height", "64", "--width", "64")
# Prj for TransFace-S tokens (512 wide), small, with each base's token width.
SMALL_PROJECTION = dict(token_dim=512, dim=64, depth=1, heads=2, dim_head=32)


def _adapter(unet, output_dim: int, sites: str) -> FaceAdapter:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapter = FaceAdapter.for_unet(unet, ResamplerConfig(**SMALL_PROJECTION, output_dim=output_dim), sites=sites)
        with torch.no_grad():  # trained-like: open gates, so the adapter acts
            for block in adapter.blocks.values():
                block.alpha_attn.fill_(1.0)
                block.alpha_dense.fill_(1.0)
    return adapter


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Tiny SDXL and SD1.5 diffusers folders, an SD1.5 single file, a TransFace-S file, and an adapter for each
    base that records its type (SDXL: one SFAGS per transformer stack, the SDXL default)."""
    root = tmp_path_factory.mktemp("sdxl_cli_weights")
    xl, sd15 = tiny_sdxl_base_model(seed=0), tiny_base_model(seed=0)
    xl.save_pretrained(root / "tiny-sdxl")
    sd15.save_pretrained(root / "tiny-sd15")
    files = {"sdxl": root / "tiny-sdxl", "sd15": root / "tiny-sd15",
             "single": write_single_file(sd15, root / "tiny-sd15.safetensors"),
             "encoder": root / "ms1mv2_model_TransFace_S.pt"}
    torch.save({k: v.half() for k, v in build_transface("S", seed=0).state_dict().items()}, files["encoder"])
    files["xl_adapter"] = save_adapter(_adapter(xl.unet, TINY_SDXL_CROSS_ATTENTION_DIM, "stack"),
                                       root / "xl.safetensors", base_type="sdxl")
    files["sd15_adapter"] = save_adapter(_adapter(sd15.unet, 32, "block"), root / "sd15.safetensors",
                                         base_type="sd15")
    return files


def _generate(weights: dict, out: Path, *extra, base: str = "sdxl", adapter: str = "xl_adapter"):
    return run_cli("fact-generate", "--base", weights[base], "--adapter", weights[adapter], "--face-encoder",
                   weights["encoder"], "--reference", REFERENCE, *FAST, "--out", out, *extra)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


@pytest.mark.slow
def test_tiny_sdxl_draws_images_deterministic_per_seed(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        done = run_cli("fact-generate", "--tiny", "--base-type", "sdxl", *FAST, "--seed", "0", "--seed", "1",
                       "--reference", REFERENCE, "--out", out)
        assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads((runs[0] / "settings.json").read_text())
    assert settings["base_type"] == "sdxl" and settings["sources"]["base_type"] == "sdxl"
    assert settings["sources"]["scheduler"] == "euler"  # SDXL's own sampler when none is named
    files = [entry["file"] for entry in settings["images"]]
    assert len(files) == 2
    first, second = (_pixels(runs[0] / name) for name in files)
    assert first.shape == (64, 64, 3) and np.abs(first - second).max() > 0  # seeds differ
    for name in files:  # the same seed draws the same image in another process
        assert np.array_equal(_pixels(runs[0] / name), _pixels(runs[1] / name))


@pytest.mark.slow
def test_an_sdxl_folder_with_an_sdxl_adapter_draws_and_inpaints(weights, tmp_path):
    done = _generate(weights, tmp_path / "t2i", "--scheduler", "ddim")
    assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads((tmp_path / "t2i" / "settings.json").read_text())
    assert settings["base_type"] == "sdxl" and settings["sources"]["scheduler"] == "ddim"  # named: kept
    assert settings["sources"]["base"] == str(weights["sdxl"])
    image = _pixels(tmp_path / "t2i" / settings["images"][0]["file"])
    assert image.shape == (64, 64, 3) and image.std() > 0

    inpaint = _generate(weights, tmp_path / "inpaint", "--template", TEMPLATE)
    assert inpaint.returncode == 0, inpaint.stderr[-3000:]
    assert not any(n in inpaint.stderr for n in NOISE), inpaint.stderr  # no "kept in float32" per call
    settings = json.loads((tmp_path / "inpaint" / "settings.json").read_text())
    assert settings["mode"] == "inpaint" and settings["base_type"] == "sdxl"
    assert settings["sources"]["scheduler"] == "euler"
    assert (settings["strength"], settings["adapter_scale"], settings["guidance_scale"]) == (0.6, 0.55, 5.0)
    image = _pixels(tmp_path / "inpaint" / settings["images"][0]["file"])
    size = image.shape[1::-1]  # the template and its mask at the generated size
    mask = np.asarray(Image.open(tmp_path / "inpaint" / "mask.png").convert("L").resize(size, Image.NEAREST)) >= 128
    template = np.asarray(Image.open(TEMPLATE).convert("RGB").resize(size), np.int16)
    assert mask.any() and (~mask).any() and image.shape == template.shape
    # Only the face region is regenerated: outside the mask the template stays (up to PNG and resize rounding).
    difference = np.abs(image - template)
    assert difference[~mask].mean() < 5 and difference[mask].mean() > 20  # measured: 1.7 and 42


@pytest.mark.slow
def test_an_adapter_and_a_base_of_different_types_are_one_error_line(weights, tmp_path):
    out = tmp_path / "out"
    xl, sd15 = weights["xl_adapter"], weights["sd15_adapter"]
    assert read_adapter_metadata(xl)[BASE_TYPE_KEY] == "sdxl"
    cases = [
        (dict(adapter="sd15_adapter"), (f"adapter {sd15} is for SD1.5 (its metadata says so)",
                                        f"--base {weights['sdxl']} is an SDXL folder (it has text_encoder_2/)")),
        (dict(base="sd15"), (f"adapter {xl} is for SDXL (its metadata says so)",
                             f"--base {weights['sd15']} is an SD1.5 folder")),
        (dict(base="single"), (f"adapter {xl} is for SDXL", f"--base {weights['single']} is a single file, "
                                                              "which loads as SD1.5")),
    ]
    for how, fragments in cases:
        assert_one_error(_generate(weights, out, **how), *fragments, "give an adapter and a base model of one type")
        assert not out.exists()
    declared = _generate(weights, out, "--base-type", "sd15")
    assert_one_error(declared, f"adapter {xl} is for SDXL", "but --base-type is sd15")
    tiny = run_cli("fact-generate", "--tiny", "--base-type", "sd15", "--adapter", xl, *FAST, "--reference",
                   REFERENCE, "--out", out)
    assert_one_error(tiny, f"adapter {xl} is for SDXL", "but --base-type is sd15")
    assert not out.exists()
