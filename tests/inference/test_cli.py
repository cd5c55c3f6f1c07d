"""fact-generate as users run it: the console script in a subprocess."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fact_lightning.models.adapter_io import save_adapter
from fact_lightning.inference import DEFAULT_GUIDANCE, DEFAULT_NEGATIVE_PROMPT
from fact_lightning.inference.recipe import INFERENCE_ADAPTER_SCALE
from fact_lightning.tiny import random_tiny_adapter, tiny_base_model
from tests.inference.cli_runner import NOISE, assert_one_error, run_cli
from tests.inference.conftest import FACES

EDGE = FACES.parent / "edge"
OBAMA = sorted((FACES / "fr_obama").iterdir())
BIDEN = sorted((FACES / "fr_biden").iterdir())
FAST = ["--tiny", "--prompt", "a photo of {subject}", "--steps", "2", "--height", "64", "--width", "64"]


@pytest.mark.slow
def test_generates_with_the_official_defaults_and_a_negative_prompt(tmp_path):
    adapter_file = save_adapter(random_tiny_adapter(tiny_base_model(0).unet), tmp_path / "adapter.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na photo of {subject}\n\na painting of {subject}\n")
    out = tmp_path / "out"
    result = run_cli("fact-generate", "--tiny", "--adapter", adapter_file, "--prompts", prompts, "--subject", "a man",
                     "--seed", 1, "--seed", 2, "--steps", 2, "--height", 64, "--width", 64,
                     "--negative-prompt", "blurry, dark", "--reference", OBAMA[0], "--reference", OBAMA[1],
                     "--out", out)
    assert result.returncode == 0, result.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert [e["prompt"] for e in settings["images"]] == ["a photo of a man"] * 2 + ["a painting of a man"] * 2
    assert all((out / e["file"]).is_file() for e in settings["images"])
    assert len(list((out / "references").iterdir())) == 2
    assert settings["negative_prompt"] == "blurry, dark" and settings["mode"] == "txt2img"
    assert settings["adapter_scale"] == INFERENCE_ADAPTER_SCALE == 0.5
    assert settings["guidance_scale"] == DEFAULT_GUIDANCE == 7.0 and settings["sources"]["scheduler"] == "pndm"
    assert settings["text_only_guidance"] is False and settings["face_delay"] == 0.0 and settings["strength"] is None
    assert settings["sources"]["adapter"] == str(adapter_file)
    assert "4 images" in result.stdout
    # Progress and one --tiny notice; no library noise, no repeated random-weights warnings.
    assert not any(n in result.stderr for n in NOISE), result.stderr
    assert result.stderr.count("RANDOM") == 1 and "images" in result.stderr


@pytest.mark.slow
def test_default_negative_prompt_and_options_of_the_official_generate(tmp_path):
    out = tmp_path / "out"
    result = run_cli("fact-generate", *FAST, "--reference", OBAMA[0], "--text-only-guidance", "--face-delay", "0.5",
                     "--scale", "0.3", "--out", out)
    assert result.returncode == 0, result.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert settings["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    assert settings["text_only_guidance"] is True and settings["face_delay"] == 0.5
    assert settings["adapter_scale"] == 0.3  # --scale: the hidden old name of --adapter-scale


@pytest.mark.slow
def test_inpainting_runs_the_official_inpainting_stage(tmp_path):
    """--template: guidance 5.0, adapter scale 0.55 and strength 0.6 by default, as settings.json records."""
    out = tmp_path / "out"
    result = run_cli("fact-generate", *FAST, "--reference", OBAMA[0], "--template", BIDEN[0], "--out", out)
    assert result.returncode == 0, result.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert settings["mode"] == "inpaint" and (out / "mask.png").is_file()
    assert (settings["strength"], settings["adapter_scale"], settings["guidance_scale"]) == (0.6, 0.55, 5.0)
    assert settings["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    # Text-to-image records no strength; --strength belongs to the inpainting mode.
    assert_one_error(run_cli("fact-generate", *FAST, "--reference", OBAMA[0], "--strength", "0.5",
                             "--out", tmp_path / "o"), "--strength needs --template")


def test_help_reads_at_80_columns():
    for script, options in (("fact-generate", ["--adapter-scale", "--text-only-guidance", "--face-delay", "--any-face",
                                               "--guidance-scale", "--negative-prompt", "--strength"]),
                            ("fact-evaluate", ["--identities", "--clip", "--adapter-scale", "--face-model"])):
        result = run_cli(script, "--help", columns=80, timeout=120)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80
        assert all(o in result.stdout for o in options)
        assert "--scale " not in result.stdout  # the old name stays hidden
        assert "as 7.0" in result.stdout and "default 7.0" in result.stdout


@pytest.mark.slow
def test_a_reference_fact_data_would_refuse_stops_unless_any_face(tmp_path):
    out = tmp_path / "out"
    for photo, reason in (("two_people.jpg", "several_faces"), ("partial_face.jpg", "face_cut_by_border")):
        result = run_cli("fact-generate", *FAST, "--reference", EDGE / photo, "--out", out)
        assert_one_error(result, str(EDGE / photo), reason, "--any-face")
        assert not out.exists()
    result = run_cli("fact-generate", *FAST, "--reference", EDGE / "two_people.jpg", "--any-face", "--out", out)
    assert result.returncode == 0, result.stderr
    assert len(list((out / "images").glob("*.png"))) == 1
    assert json.loads((out / "settings.json").read_text())["any_face"] is True


@pytest.mark.slow
def test_missing_weights_fail_with_a_clear_message(tmp_path):
    ref = OBAMA[0]
    result = run_cli("fact-generate", "--reference", ref, "--prompt", "a", "--out", tmp_path / "o")
    assert_one_error(result, "no base, adapter, face_encoder given")
    weights = ["--base", tmp_path / "sd15", "--adapter", tmp_path / "a.safetensors", "--face-encoder", tmp_path / "t.pt",
               "--local-files-only", "--reference", ref, "--prompt", "a", "--out", tmp_path / "o"]
    assert_one_error(run_cli("fact-generate", *weights), "base model folder", str(tmp_path / "sd15"), "does not exist")
    result = run_cli("fact-generate", *FAST, "--adapter", tmp_path / "nope.safetensors", "--reference", ref,
                     "--out", tmp_path / "o")
    assert_one_error(result, "adapter file not found", "nope.safetensors")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_faults_are_one_line_exit_2_and_leave_nothing(tmp_path):
    """Each fault: one `error:` line naming the file and the reason, exit 2, no output folder."""
    out = tmp_path / "out"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    # The output folder is checked before anything loads: its error comes even with every weight missing.
    result = run_cli("fact-generate", "--base", tmp_path / "nothing", "--adapter", tmp_path / "n.safetensors",
                     "--face-encoder", tmp_path / "n.pt", "--reference", OBAMA[0], "--prompt", "a",
                     "--out", a_file / "out")
    assert_one_error(result, str(a_file), "is a file")

    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((2, 60000, 3), 128, np.uint8)).save(wide)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    nan_adapter = random_tiny_adapter(tiny_base_model(0).unet)
    with torch.no_grad():
        next(iter(nan_adapter.blocks.values())).alpha_attn.fill_(float("nan"))
    nan_file = save_adapter(nan_adapter, tmp_path / "nan.safetensors")
    cases = [
        (["--reference", wide], [str(wide), "face_too_small", "60000x2"]),
        (["--reference", OBAMA[0], "--steps", "0"], ["--steps", "must be an integer in [1, 1000], got 0"]),
        (["--reference", tmp_path], [str(tmp_path), "is a directory"]),
        (["--reference", garbage], [str(garbage), "not_an_image"]),
        (["--reference", OBAMA[0], "--adapter", nan_file], [str(nan_file), "non-finite"]),
    ]
    for args, fragments in cases:
        result = run_cli("fact-generate", *FAST, *args, "--out", out)
        assert_one_error(result, *fragments)
        assert not out.exists(), fragments
