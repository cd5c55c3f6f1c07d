"""What a newcomer without weights, network or GPU meets, through the console scripts: one `error:` line each,
exit 2, at once (no hub retries), naming everything that is missing and what to do instead."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
SD15 = str(ROOT / "configs" / "sd15.yaml")
TINY = ROOT / "configs" / "tiny.yaml"
REFERENCE = ROOT / "tests" / "fixtures" / "faces" / "raw" / "fr_obama" / "1.jpg"
HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
HUB_NOISE = ("Retry", "retry", "thrown while requesting", "does not appear to have", "Traceback")


def run(script: str, *args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / script), *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, **env})


def one_error(done: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a run that exited 2, with no traceback and no hub retry messages."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert not any(noise in done.stderr for noise in HUB_NOISE), done.stderr[-3000:]
    return errors[0]


def offline(tmp_path: Path, **extra: str) -> dict:
    """No network, deterministically: an empty Hugging Face cache and a hub endpoint that refuses connections."""
    return {"HF_HUB_CACHE": str(tmp_path / "hf_cache"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "",
            "TRANSFORMERS_OFFLINE": "", "CUDA_VISIBLE_DEVICES": "", **extra}


@pytest.mark.slow
def test_the_paper_recipe_on_a_machine_without_gpu_or_network(tmp_path):
    """sd15.yaml as README gives it: the GPU error names the config's GPU settings and the CPU overrides; run with
    those overrides, the next error names the hub id, the empty cache and the unreachable hub, at once."""
    env = offline(tmp_path)
    error = one_error(run("fact-train", "fit", "--config", SD15, env=env, cwd=tmp_path))
    for setting in ("trainer.accelerator gpu", "trainer.devices 8", "trainer.strategy ddp",
                    "trainer.precision bf16-mixed", "no GPU is visible"):
        assert setting in error, error
    overrides = re.search(r"on this machine's CPU with (--trainer\.\S+ \S+(?: --trainer\.\S+ \S+)*)$", error)
    assert overrides, error
    assert overrides.group(1) == ("--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto "
                                  "--trainer.precision 32-true")

    done = run("fact-train", "fit", "--config", SD15, *overrides.group(1).split(),
               "--trainer.default_root_dir", tmp_path / "run", env=env, cwd=tmp_path)
    error = one_error(done)
    for fragment in (HUB_ID, "not in the local Hugging Face cache", str(tmp_path / "hf_cache"),
                     "network is unavailable", "http://127.0.0.1:9", "give model.base.init_args.source a local folder"):
        assert fragment in error, error
    assert "GPU" not in done.stderr.split("error:")[1]  # the overrides took: past the hardware check
    assert not (tmp_path / "run").exists()  # nothing written before the check


def test_every_missing_weight_file_is_named_at_once(tmp_path):
    """A local SD1.5 folder with some files missing and a preview encoder file that is not there: one line lists
    them all, before anything loads (no data folder is needed to get there)."""
    sd15 = tmp_path / "sd15"
    for name in ("unet/config.json", "text_encoder/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        (sd15 / name).parent.mkdir(parents=True, exist_ok=True)
        (sd15 / name).write_text("{}")
    config = yaml.safe_load(TINY.read_text())
    config["model"]["base"] = {"class_path": "fact_lightning.training.base_spec.PretrainedBase",
                               "init_args": {"source": str(sd15)}}
    previews = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("Previews"))
    previews["init_args"]["encoder_weights"] = str(tmp_path / "weights" / "ms1mv2_model_TransFace_S.pt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    error = one_error(run("fact-train", "fit", "--config", tmp_path / "config.yaml", "--data.root", tmp_path / "none",
                          "--trainer.default_root_dir", tmp_path / "run", env=offline(tmp_path), cwd=tmp_path))
    assert f"base model folder {sd15} is missing vae/, unet/diffusion_pytorch_model.safetensors, " \
           "text_encoder/model.safetensors" in error, error
    assert f"Previews.encoder_weights {tmp_path / 'weights' / 'ms1mv2_model_TransFace_S.pt'} does not exist" in error
    assert "README.md, Real weights" in error
    assert not (tmp_path / "run").exists()


def test_generate_without_network_names_the_hub_id_and_every_missing_file(tmp_path):
    """fact-generate with a hub id, HF_HUB_OFFLINE=1 and an empty cache: one line, at once, naming the hub id,
    why it cannot be downloaded and the option for a local folder, with the other missing files."""
    done = run("fact-generate", "--base", HUB_ID, "--adapter", tmp_path / "fact.safetensors",
               "--face-encoder", tmp_path / "ms1mv2_model_TransFace_S.pt", "--reference", REFERENCE,
               "--prompt", "a photo of {subject}", "--out", tmp_path / "out",
               env=offline(tmp_path, HF_HUB_OFFLINE="1"), cwd=tmp_path)
    error = one_error(done)
    for fragment in (HUB_ID, "not in the local Hugging Face cache", "HF_HUB_OFFLINE is set", "give --base a local folder",
                     f"TransFace weights not found: {tmp_path / 'ms1mv2_model_TransFace_S.pt'}",
                     f"adapter file not found: {tmp_path / 'fact.safetensors'}"):
        assert fragment in error, error
    assert not (tmp_path / "out").exists()
