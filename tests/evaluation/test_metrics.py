"""Each metric reacts the right way to a controlled change."""

import json

import numpy as np
import pytest
import torch

from fact_lightning.evaluation.clip import clip_i, clip_t
from fact_lightning.tiny import tiny_clip
from fact_lightning.evaluation.metrics import DlibFaceEmbedder, TransFaceEmbedder, face_similarity, fid
from tests.conftest import FACES, photo



@pytest.fixture(scope="module")
def scorer():
    return tiny_clip(0)


def _images(seed, n=4):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_clip_i_and_style_prefer_identical_images(scorer):
    a, b = _images(0), _images(1)
    assert clip_i(scorer, a, a) == pytest.approx(100.0, abs=1e-3)
    assert clip_i(scorer, a, b) < clip_i(scorer, a, a) - 1e-3


def test_clip_t_prefers_the_matching_prompt(scorer):
    """Fit the tiny CLIP contrastively on two colour/caption pairs; CLIP-T must then rank them right."""
    import copy

    fitted = copy.deepcopy(scorer)
    red = [np.tile(np.array([220, 20, 20], np.uint8), (32, 32, 1))]
    blue = [np.tile(np.array([20, 20, 220], np.uint8), (32, 32, 1))]
    texts = ["a red square", "a blue square"]
    model = fitted.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    pixels = fitted.processor(images=red + blue, return_tensors="pt")["pixel_values"]
    tokens = fitted.processor(text=texts, return_tensors="pt", padding=True)
    for _ in range(30):
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels,
                    return_loss=True)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    assert clip_t(fitted, red, ["a red square"]) > clip_t(fitted, red, ["a blue square"])
    assert clip_t(fitted, blue, ["a blue square"]) > clip_t(fitted, blue, ["a red square"])


def test_fid_is_zero_for_the_same_set_and_grows_for_another(scorer):
    a = _images(0, 6)
    flat = [np.full((64, 64, 3), v, np.uint8) for v in (10, 60, 110, 160, 210, 250)]
    assert abs(fid(a, a, scorer)) < 1e-4
    assert fid(a, flat, scorer) > 1e-3
    with pytest.raises(ValueError, match="two images"):
        fid(a[:1], a, scorer)


def test_face_similarity_transface_identical_is_one(detector):
    from fact_lightning.models.face_encoder import build_transface

    embedder = TransFaceEmbedder(build_transface("tiny", seed=0), detector)
    face = photo("fr_obama")
    same = face_similarity(embedder, [face], [face])
    assert same["face_sim"] == pytest.approx(1.0, abs=1e-5) and same["face_detect_rate"] == 1.0
    blank = face_similarity(embedder, [np.full((128, 128, 3), 127, np.uint8)], [face])
    assert blank == {"face_sim": None, "face_detect_rate": 0.0}


def test_face_similarity_dlib_ranks_the_same_person_higher(detector):
    embedder = DlibFaceEmbedder(detector)
    refs = [photo("fr_obama", 0)]
    same = face_similarity(embedder, [photo("fr_obama", 1)], refs)["face_sim"]
    other = face_similarity(embedder, [photo("fr_biden", 0)], refs)["face_sim"]
    identical = face_similarity(embedder, refs, refs)["face_sim"]
    assert identical > same > other


@pytest.mark.slow
def test_evaluate_command_writes_json_and_tensorboard(tmp_path):
    import shutil

    from tests.inference.cli_runner import NOISE, assert_one_error, run_cli

    ids = tmp_path / "ids"
    shutil.copytree(FACES / "fr_obama", ids / "fr_obama")
    out = tmp_path / "eval"
    result = run_cli("fact-evaluate", "--tiny", "--identities", ids, "--prompt", "a photo of {subject}",
                     "--prompt", "a painting of {subject}", "--subject", "a man", "--steps", "2", "--height", "64",
                     "--width", "64", "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    assert set(m) == {"clip_t", "clip_t_base", "clip_t_drop", "clip_i", "face_sim", "face_detect_rate", "clip_style", "fid"}
    assert m["clip_t_drop"] == pytest.approx(m["clip_t_base"] - m["clip_t"])
    assert json.loads(result.stdout) == m  # the metrics are the command's result on stdout
    assert report["counts"] == {"identities": 1, "prompts": 2, "seeds": 1, "images": 2}
    assert report["settings"]["guidance_scale"] == 7.0 and report["settings"]["adapter_scale"] == 0.5
    assert report["settings"]["sources"]["scheduler"] == "pndm"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((out / "images" / "fr_obama").glob("*.png"))) == 4
    assert not any(n in result.stderr for n in NOISE) and result.stderr.count("RANDOM") == 1, result.stderr

    missing = run_cli("fact-evaluate", "--identities", ids, "--prompt", "a", "--out", tmp_path / "o2")
    assert_one_error(missing, "no CLIP model given")
    assert not (tmp_path / "o2").exists()


def test_evaluate_names_every_missing_weight_file_before_loading(tmp_path):
    """A CLIP folder without its weights is named with the base model and TransFace in one error line, before
    anything loads or the output folder is made."""
    from tests.inference.cli_runner import assert_one_error, run_cli

    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text("{}")
    out = tmp_path / "eval"
    result = run_cli("fact-evaluate", "--identities", FACES, "--prompt", "a", "--base", tmp_path / "no_base",
                     "--face-encoder", tmp_path / "transface.pt", "--adapter", tmp_path / "adapter.safetensors",
                     "--clip", clip, "--out", out)
    line = assert_one_error(result, "missing weights, nothing was loaded")
    assert f"base model folder {tmp_path / 'no_base'}" in line and "transface.pt" in line and "adapter.safetensors" in line
    assert f"CLIP folder {clip} is missing model.safetensors, preprocessor_config.json" in line, line
    assert not out.exists()


def test_identity_photos_says_which_files_it_skips(tmp_path, caplog):
    from fact_lightning.evaluation.cli import identity_photos

    (tmp_path / "ann").mkdir()
    for name in ("1.jpg", "2.PNG", "notes.txt", "3.heic", ".DS_Store"):
        (tmp_path / "ann" / name).write_bytes(b"x")
    with caplog.at_level("WARNING"):
        found = identity_photos(tmp_path)
    assert [p.name for p in found["ann"]] == ["1.jpg", "2.PNG"]
    assert "skipped 2 file(s)" in caplog.text and ".heic, .txt" in caplog.text, caplog.text
