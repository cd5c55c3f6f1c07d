"""Hub id or local path, decided once; the output folder a failed run leaves as it found it."""

import pytest

from fact_lightning.inference.outputs import OutputFolder, read_image
from fact_lightning.weights import MissingWeightsError, resolve_source


def test_a_source_is_a_local_path_or_a_hub_id(tmp_path):
    (tmp_path / "sd15").mkdir()
    assert resolve_source(tmp_path / "sd15", "base model folder").local
    hub = resolve_source("runwayml/stable-diffusion-v1-5", "base model folder")
    assert not hub.local and hub.location == "runwayml/stable-diffusion-v1-5"
    for missing in (tmp_path / "nope", "./nope", "path/to/sd15", "~/nope", "style.safetensors", ""):
        with pytest.raises(MissingWeightsError, match="LoRA file .* does not exist"):
            resolve_source(missing, "LoRA file")


def test_every_loader_uses_it(tmp_path):
    from fact_lightning.evaluation.clip import ClipScorer
    from fact_lightning.inference.pipelines import load_controlnet, load_lora
    from fact_lightning.models.base import load_base_model

    missing = str(tmp_path / "a" / "b")
    for load, what in ((load_base_model, "base model folder"), (load_controlnet, "ControlNet folder"),
                       (ClipScorer.from_pretrained, "CLIP folder"), (lambda s: load_lora(None, s), "LoRA file")):
        with pytest.raises(MissingWeightsError, match=f"{what} {missing} does not exist"):
            load(missing)
    (tmp_path / "sd15" / "unet").mkdir(parents=True)
    with pytest.raises(MissingWeightsError, match="sd15 is missing vae/, text_encoder/"):
        load_base_model(tmp_path / "sd15")


def test_a_failed_run_leaves_the_folder_as_it_found_it(tmp_path):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "old.png").write_bytes(b"earlier run")
    with pytest.raises(RuntimeError):
        with OutputFolder(out, overwrite=True) as output:
            output.path("images/new.png").write_bytes(b"x")
            output.path("references/ref.png").write_bytes(b"x")
            (output.folder("tensorboard") / "events").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["images", "images/old.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    with OutputFolder(out, overwrite=True) as output:  # success replaces the folder whole
        output.write_json("settings.json", {"a": 1})
    assert sorted(p.name for p in out.iterdir()) == ["settings.json"]


def test_unwritable_and_unreadable_paths_are_named(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=f"{a_file} is a file"):
        OutputFolder(a_file / "out")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        read_image(tmp_path, "reference photo")
    with pytest.raises(ValueError, match="reference photo .* not_an_image"):
        read_image(a_file, "reference photo")
