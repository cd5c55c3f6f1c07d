import json

from fact_lightning.adapter_io import save_adapter
from fact_lightning.inference.cli import main
from fact_lightning.tiny import random_tiny_adapter, tiny_base_model
from tests.inference.conftest import FACES


def test_cli_runs_end_to_end_on_tiny_components(tmp_path, capsys):
    adapter_file = save_adapter(random_tiny_adapter(tiny_base_model(0).unet), tmp_path / "adapter.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na photo of {subject}\n\na painting of {subject}\n")
    out = tmp_path / "out"
    refs = sorted((FACES / "fr_obama").iterdir())
    argv = ["--tiny", "--adapter", str(adapter_file), "--prompts", str(prompts), "--subject", "a man",
            "--seed", "1", "--seed", "2", "--steps", "2", "--height", "64", "--width", "64", "--out", str(out)]
    for ref in refs:
        argv += ["--reference", str(ref)]
    assert main(argv) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert [e["prompt"] for e in settings["images"]] == ["a photo of a man"] * 2 + ["a painting of a man"] * 2
    assert all((out / e["file"]).is_file() for e in settings["images"])
    assert len(list((out / "references").iterdir())) == 2
    assert settings["scale"] == 0.5 and settings["guidance_scale"] == 5.0 and settings["mode"] == "txt2img"
    assert settings["sources"]["adapter"] == str(adapter_file)
    assert "4 images" in capsys.readouterr().out


def test_missing_weights_fail_with_a_clear_message(tmp_path, capsys):
    ref = str(next((FACES / "fr_obama").iterdir()))
    assert main(["--reference", ref, "--prompt", "a", "--out", str(tmp_path)]) == 2
    assert "no base, adapter, face_encoder given" in capsys.readouterr().err
    argv = ["--reference", ref, "--prompt", "a", "--out", str(tmp_path), "--base", str(tmp_path / "sd15"),
            "--adapter", str(tmp_path / "a.safetensors"), "--face-encoder", str(tmp_path / "t.pt"), "--local-files-only"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "base model folder" in err and "does not exist" in err
    (tmp_path / "sd15" / "unet").mkdir(parents=True)
    assert main(argv) == 2
    assert "missing vae/" in capsys.readouterr().err
    assert main(["--tiny", "--adapter", str(tmp_path / "nope.safetensors"), "--reference", ref, "--prompt", "a",
                 "--out", str(tmp_path / "o")]) == 2
    assert "adapter file not found" in capsys.readouterr().err
