"""Weights are checked before anything loads: every missing file named at once, a hub id that can be neither read
from the cache nor downloaded is refused at once, and a cached hub id loads without the hub."""

from __future__ import annotations

import time

import pytest
from huggingface_hub import constants
from jsonargparse import Namespace

from fact_lightning.cli import missing_gpu_message, named_weight_files
from fact_lightning.models.base import base_model_files, load_base_model
from fact_lightning.weights import MissingWeightsError
from fact_lightning.weights import check_source, download_blocker, missing_in_folder

REFUSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def _touch(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_a_folder_names_every_missing_file_absent_subfolders_first(tmp_path):
    _touch(tmp_path, "unet/config.json", "text_encoder/config.json", "text_encoder/pytorch_model.bin",
           "tokenizer/tokenizer.json")
    assert missing_in_folder(tmp_path, base_model_files()) == [
        "vae/", "scheduler/", "unet/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer_config.json"]
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in [n.name for n in base_model_files("fp16")]


def test_no_download_is_possible_is_known_at_once(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", REFUSED)
    start = time.monotonic()
    reason = download_blocker()
    assert "network is unavailable" in reason and REFUSED in reason and "refused" in reason.lower()
    assert time.monotonic() - start < 3.0  # one refused connection, no retries
    assert download_blocker(local_files_only=True) == "downloads are off (local_files_only)"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE" in download_blocker()


def _cache_snapshot(cache, repo_id: str, revision: str = "0" * 40):
    """The layout huggingface_hub writes: refs/main names the snapshot holding the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return repo / "snapshots" / revision


def test_a_cached_hub_id_loads_from_the_cache_without_the_hub(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", REFUSED)
    snapshot = _cache_snapshot(tmp_path, "someone/tiny-sd")
    tiny_base.save_pretrained(snapshot)
    located = check_source("someone/tiny-sd", "base model folder", base_model_files(), cache_dir=tmp_path)
    assert located.source.local and located.source.location == str(snapshot)
    loaded = load_base_model("someone/tiny-sd")  # diffusers would retry the refused endpoint if it were asked
    assert tuple(loaded.unet.config.block_out_channels) == tuple(tiny_base.unet.config.block_out_channels)

    (snapshot / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    problem = check_source("someone/tiny-sd", "base model folder", base_model_files(), option="--base",
                           cache_dir=tmp_path).problem
    assert "holds only part of it (missing vae/diffusion_pytorch_model.safetensors)" in problem
    assert "network is unavailable" in problem and "give --base a local folder" in problem
    with pytest.raises(MissingWeightsError, match="could not load the base model: base model folder someone/tiny-sd"):
        load_base_model("someone/tiny-sd")


def test_weight_files_named_in_a_config_are_found_wherever_they_sit():
    config = Namespace(trainer=Namespace(callbacks=[
        Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath=None)),
        Namespace(class_path="fact_lightning.callbacks.previews.Previews",
                  init_args=Namespace(encoder_weights="/x/t.pt", detector="mediapipe")),
    ]), model=Namespace(fair_weight=0.01, extra_weights=None), data=Namespace(detector_weights="/y/facexlib"))
    assert list(named_weight_files(config)) == [("Previews.encoder_weights", "/x/t.pt"),
                                                ("data.detector_weights", "/y/facexlib")]


def test_only_a_shortage_of_gpus_gets_the_gpu_message(monkeypatch):
    import torch

    settings = Namespace(accelerator="gpu", devices=8, num_nodes=1, strategy="ddp", precision="bf16-mixed")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    message = missing_gpu_message(settings, RuntimeError("You requested gpu: [0, 1, 2, 3, 4, 5, 6, 7]"))
    assert "only 2 GPU(s) are visible here" in message and "--trainer.devices 2" in message
    assert message.endswith("--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto "
                            "--trainer.precision 32-true")
    assert missing_gpu_message(Namespace(accelerator="gpu", devices=2), RuntimeError("other")) is None
    assert missing_gpu_message(Namespace(accelerator="cpu", devices=8), RuntimeError("other")) is None
