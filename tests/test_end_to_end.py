"""The three programs chained on real photos: fact-data shards -> fact-train (tiny) -> portraits."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.build import BuildOptions, run_build
from data_tools.records import RecordOptions
from fact_lightning.models.adapter_io import read_adapter_metadata
from fact_lightning.cli import build_cli
from fact_lightning.inference.loading import GeneratorSources, load_generator

ROOT = Path(__file__).parents[1]
PHOTOS = ROOT / "tests" / "fixtures" / "faces" / "raw"


@pytest.mark.slow
def test_photos_to_shards_to_trained_adapter_to_portraits(tmp_path, monkeypatch):
    manifest = run_build(BuildOptions(src=PHOTOS, out=tmp_path / "shards", record=RecordOptions(resolution=128),
                                      encoder="tiny", random_encoder=True, images_per_shard=4))
    assert manifest["counts"]["accepted"] >= 8 and len(manifest["shards"]) >= 2

    monkeypatch.chdir(tmp_path)  # the tiny config writes runs/tiny/... relative to the working directory
    cli = build_cli(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.root", "shards",
                     "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "2"])
    assert cli.trainer.global_step == 6
    gates = cli.model.gate_values()
    assert any(abs(a) > 0 for a, _ in gates.values())  # trained on real shards: the gates left 0

    exported = tmp_path / "runs" / "tiny" / "adapters" / "final" / "adapter.safetensors"
    assert read_adapter_metadata(exported)["format_version"] == "1"
    generator = load_generator(GeneratorSources(tiny=True, adapter=str(exported)))
    photo = np.asarray(Image.open(PHOTOS / "fr_obama" / "1.jpg").convert("RGB"))
    identity = generator.encode_references([photo])
    common = dict(seed=0, num_inference_steps=2, height=64, width=64, output_type="np")
    with_adapter = generator("a photo of a man", identity, adapter_scale=1.0, **common)[0]
    without = generator("a photo of a man", identity, adapter_scale=0.0, **common)[0]
    assert with_adapter.shape == (64, 64, 3)
    assert not np.allclose(with_adapter, without)  # the trained adapter acts on generation
    assert torch.isfinite(torch.as_tensor(with_adapter)).all()
