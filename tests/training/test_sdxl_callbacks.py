"""The training callbacks on SDXL: previews run SDXL's pipeline, exports record ``base_type: sdxl`` (and refuse the
SD1.5-only official format), the model card names SDXL and its load lines run, a resume keeps ``model.sites``."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fact_lightning.callbacks.model_card import CardFacts, render_card
from fact_lightning.data.shards import MANIFEST_NAME
from fact_lightning.experiments.synthetic import write_synthetic_shards
from fact_lightning.models.adapter_io import read_adapter_metadata, read_adapter_state
from fact_lightning.training import resume
from tests.training.runs import ROOT, error_lines, fit_here

PHOTO = ROOT / "tests" / "fixtures" / "faces" / "raw" / "fr_obama" / "1.jpg"
RESOLUTION = 64
PROMPT = "a close-up portrait photo of a person"  # configs/tiny_sdxl.yaml's prompt, {subject} replaced

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def sdxl_shards(tmp_path_factory) -> Path:
    """Synthetic shards whose manifest says they were encoded with the seeded random tiny TransFace (so the
    previews' identity curve runs)."""
    root = tmp_path_factory.mktemp("sdxl_callback_shards")
    manifest = write_synthetic_shards(root, identities=2, images_per_identity=2, groups_per_shard=2,
                                      resolution=RESOLUTION)
    manifest["encoder"].update(variant="tiny", random=True, weights=None)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def _callback(config: dict, name: str) -> dict:
    return next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(name))


def tiny_sdxl_config(folder: Path, shards: Path, *, official: str | None = None, previews: bool = True) -> Path:
    """configs/tiny_sdxl.yaml as shipped, shrunk to a CPU test: 2 steps on 64 px shards, a checkpoint, an export and
    a preview at step 2 (and the preview at step 0); a learning rate that moves the adapter visibly in 2 steps."""
    config = yaml.safe_load((ROOT / "configs" / "tiny_sdxl.yaml").read_text())
    config["trainer"].update(max_steps=2, log_every_n_steps=1)
    _callback(config, "ModelCheckpoint")["init_args"]["every_n_train_steps"] = 2
    if official is not None:
        _callback(config, "AdapterExport")["init_args"]["official"] = official
    if previews:
        _callback(config, "Previews")["init_args"]["every_n_steps"] = 2
    else:
        config["trainer"]["callbacks"].remove(_callback(config, "Previews"))
    config["trainer"]["callbacks"].remove(_callback(config, "StepProgressBar"))
    config["trainer"]["enable_progress_bar"] = False
    config["model"]["optimizer"]["init_args"]["lr"] = 5e-2
    config["data"].update(root=str(shards), resolution=RESOLUTION, batch_size=2, streaming=False, num_workers=0)
    path = folder / f"tiny_sdxl-{official}-{previews}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def sdxl_run(sdxl_shards, tmp_path_factory) -> Path:
    """One fit of the shipped tiny SDXL config through fact-train (in this process): 2 steps."""
    folder = tmp_path_factory.mktemp("sdxl_run")
    run = folder / "run"
    assert fit_here(tiny_sdxl_config(folder, sdxl_shards), run) == 0
    return run


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


@pytest.mark.slow
def test_sdxl_previews_are_drawn_by_the_sdxl_pipeline(sdxl_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fact_lightning.callbacks.preview_grid import to_uint8
    from fact_lightning.inference.generator import FacePortraitGenerator, IdentityCondition
    from fact_lightning.models.adapter_io import load_adapter
    from fact_lightning.tiny_sdxl import tiny_sdxl_base_model

    root = sdxl_run / "previews"
    settings = json.loads((root / "previews.json").read_text())
    assert settings["scheduler"] == "euler" and settings["prompts"] == [PROMPT]  # SDXL's own sampler
    label = settings["identities"][0]["label"]
    for step in (0, 2):
        names = {p.name for p in (root / f"step-{step:06d}").iterdir()}
        assert names == {f"{label}_p00_s0_adapter.png", f"{label}_p00_s0_base.png", "grid.png", "scores.json"}
    image = lambda step, kind: read_png(root / f"step-{step:06d}" / f"{label}_p00_s0_{kind}.png")  # noqa: E731
    assert image(0, "adapter").shape == (RESOLUTION, RESOLUTION, 3)
    assert np.array_equal(image(0, "adapter"), image(0, "base"))  # zero gates: the base model's image
    assert np.array_equal(image(2, "base"), image(0, "base"))  # the frozen base and a fixed seed
    assert np.abs(image(2, "adapter") - image(2, "base")).max() > 0  # the trained adapter acts

    # The base preview is what the SDXL generator draws on a fresh tiny SDXL base at adapter scale 0, with the
    # preview's settings (guidance 7, 10 Euler steps).
    base = tiny_sdxl_base_model(0)
    adapter = load_adapter(sdxl_run / "adapters" / "final" / "adapter.safetensors", base.unet)
    generator = FacePortraitGenerator.from_components(base, adapter)
    assert generator.base_type == "sdxl"
    tokens = torch.zeros(1, 16, 64)  # scale 0: the face condition does not reach the UNet
    drawn = generator(PROMPT, IdentityCondition(tokens), guidance_scale=settings["guidance"],
                      num_inference_steps=settings["inference_steps"], seed=0, height=RESOLUTION, width=RESOLUTION,
                      output_type="np", adapter_scale=0.0)[0]
    assert np.abs(to_uint8(drawn).astype(int) - image(0, "base")).max() <= 1

    events = EventAccumulator(str(sdxl_run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert f"preview/{label}" in events.Tags()["images"]
    assert [(e.step, e.value) for e in events.Scalars("preview/face_detect_rate")] == [(0, 0.0), (2, 0.0)]
    assert [e.step for e in events.Scalars("preview/face_similarity")] == [0, 2]


@pytest.mark.slow
def test_the_sdxl_export_records_its_base_and_fact_generate_loads_it_from_the_card(sdxl_run, tmp_path, monkeypatch):
    final = sdxl_run / "adapters" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["adapter.safetensors"]  # no official file on SDXL
    meta = read_adapter_metadata(final / "adapter.safetensors")
    assert meta["base_type"] == "sdxl" and meta["base_model"] == "tiny_sdxl(seed=0)"
    assert read_adapter_metadata(sdxl_run / "adapters" / "step-000002" / "adapter.safetensors")["base_type"] == "sdxl"

    card = (sdxl_run / "README.md").read_text()
    assert "A FACT identity adapter for Stable Diffusion XL (SDXL)" in card and "Stable Diffusion 1.5" not in card
    line = next(line for line in card.splitlines() if line.startswith("fact-generate "))
    assert line.startswith("fact-generate --tiny --base-type sdxl --adapter adapters/")

    # The card's Python lines, run from the run folder, load the export onto a tiny SDXL base.
    monkeypatch.chdir(sdxl_run)
    python = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    assert "tiny_sdxl_base_model(seed=0)" in python
    scope: dict = {}
    exec(python, scope)
    adapter = re.search(r"--adapter (\S+)", line).group(1)
    saved = read_adapter_state(sdxl_run / adapter)[2]
    loaded = scope["adapter"].state_dict()
    assert len(scope["adapter"].sites) == 11 and loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k].to(loaded[k].dtype)) for k in saved)
    assert "text_encoder_2" in vars(scope["base"])  # an SDXL base

    # Its fact-generate line, as written (a photo and an output folder filled in), draws a portrait on SDXL.
    from fact_lightning.inference.cli import main

    bash = re.search(r"```bash\n(.*?)```", card, re.DOTALL).group(1).replace("\\\n", " ")
    args = shlex.split(bash)[1:]
    args[args.index("me1.jpg")] = str(PHOTO)
    args[args.index("out/generate")] = str(tmp_path / "generated")
    assert main([*args, "--steps", "1", "--height", "64", "--width", "64"]) == 0
    assert list((tmp_path / "generated" / "images").glob("*.png"))
    assert json.loads((tmp_path / "generated" / "settings.json").read_text())["base_type"] == "sdxl"


@pytest.mark.slow
def test_a_resume_with_other_sites_is_one_error_line(sdxl_run, sdxl_shards, tmp_path, capsys):
    config = tiny_sdxl_config(tmp_path, sdxl_shards, previews=False)
    before = sorted(p.name for p in (sdxl_run / "checkpoints").iterdir())
    code = fit_here(config, sdxl_run, "--ckpt_path", "last", "--trainer.max_steps", "4", "--model.sites", "block")
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    assert "model.sites is 'block' but the checkpoint was trained with 'stack'" in lines[0]
    assert sorted(p.name for p in (sdxl_run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("official", ["final", "always"])
def test_the_official_format_on_sdxl_is_one_error_line_before_training(official, sdxl_shards, tmp_path, capsys):
    run = tmp_path / "run"
    code = fit_here(tiny_sdxl_config(tmp_path, sdxl_shards, official=official, previews=False), run)
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    assert f"official={official!r}" in lines[0] and "SD1.5 only" in lines[0] and "official: never" in lines[0]
    assert not (run / "checkpoints").exists() and not (run / "adapters").exists()


def test_an_sdxl_card_loads_real_weights_with_the_sdxl_loader():
    card = render_card(CardFacts(adapter="adapters/final/adapter.safetensors", step=10,
                                 base="stabilityai/stable-diffusion-xl-base-1.0", base_type="sdxl",
                                 encoder_variant="S"))
    assert "Stable Diffusion XL (SDXL)" in card and "Stable Diffusion 1.5" not in card
    assert "from fact_lightning.models.sdxl_base import load_sdxl_base_model" in card
    assert "base = load_sdxl_base_model('stabilityai/stable-diffusion-xl-base-1.0')" in card
    assert "fact-generate --base stabilityai/stable-diffusion-xl-base-1.0 --base-type sdxl --face-encoder" in card
    sd15 = render_card(CardFacts(adapter="a.safetensors", step=1, base="tiny(seed=0, cross_attention_dim=32)",
                                 tiny=True))
    assert "Stable Diffusion 1.5 (SD1.5)" in sd15 and "--base-type" not in sd15
    assert "base = tiny_base_model(seed=0, cross_attention_dim=32)" in sd15


def test_changed_sites_are_refused_as_the_other_adapter_shape_options():
    saved = {"sites": "stack", "projection": {"dim": 64}, "fair_weight": 0.01}
    with pytest.raises(resume.ResumeRefused, match=r"model.sites is \['a', 'b'\] but the checkpoint was trained "
                                                    r"with 'stack': it fixes the adapter's weights"):
        resume.refuse_model_changes(saved, {**saved, "sites": ["a", "b"]})
    assert resume.refuse_model_changes(saved, {**saved, "fair_weight": 0.1}) == [("model.fair_weight", 0.01, 0.1)]
