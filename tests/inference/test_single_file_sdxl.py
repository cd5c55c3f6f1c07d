"""A single-file SDXL base through the console scripts: `fact-train fit` with model.base PretrainedSDXLBase
source=<file> config=<folder>, `fact-generate --base <file>` typed SDXL by the file's own keys (with an SDXL
adapter, or `--base-type sdxl`), and every mismatch as one `error:` line before any model loads (an SD1.5 file given
to PretrainedSDXLBase: tests/models/test_single_file_sdxl.py). The file is the
tiny SDXL stand-in in the original SGM layout (tests/models/test_single_file_sdxl.py's key map)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fact_lightning.experiments.synthetic import write_synthetic_shards
from fact_lightning.models.adapter_io import read_adapter_metadata, save_adapter
from fact_lightning.models.face_encoder import build_transface
from fact_lightning.models.single_file import single_file_vae_name
from fact_lightning.models.single_file_sdxl import SDXL_CONFIG
from fact_lightning.tiny import tiny_base_model
from fact_lightning.tiny_sdxl import TINY_SDXL_CROSS_ATTENTION_DIM, tiny_sdxl_base_model
from tests.inference.cli_runner import assert_one_error, run_cli
from tests.inference.test_sdxl_cli import _adapter
from tests.models.test_single_file import write_single_file
from tests.models.test_single_file_sdxl import write_sdxl_configs, write_sdxl_single_file
from tests.training.runs import fact_train, final_adapter
from tests.training.test_sdxl_training import SDXL_CONFIG as SDXL_RUN

REFERENCE = Path(__file__).parents[1] / "fixtures" / "faces" / "raw" / "fr_obama" / "1.jpg"
FAST = ("--prompt", "a photo of a person", "--steps", "2", "--height", "64", "--width", "64", "--seed", "0")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """The tiny SDXL stand-in as one SGM-layout file with its config folder, an SD1.5 single file, a random
    TransFace-S file, and an adapter for each base that records its type."""
    root = tmp_path_factory.mktemp("single_file_sdxl_weights")
    xl, sd15 = tiny_sdxl_base_model(seed=0), tiny_base_model(seed=0)
    files = {"base": write_sdxl_single_file(xl, root / "tiny-sdxl.safetensors"),
             "config": write_sdxl_configs(xl, root / "cfg"),
             "sd15": write_single_file(sd15, root / "tiny-sd15.safetensors"),
             "encoder": root / "ms1mv2_model_TransFace_S.pt"}
    torch.save({k: v.half() for k, v in build_transface("S", seed=0).state_dict().items()}, files["encoder"])
    files["xl_adapter"] = save_adapter(_adapter(xl.unet, TINY_SDXL_CROSS_ATTENTION_DIM, "stack"),
                                       root / "xl.safetensors", base_type="sdxl")
    files["sd15_adapter"] = save_adapter(_adapter(sd15.unet, 32, "block"), root / "sd15.safetensors",
                                         base_type="sd15")
    return files


def generate(weights: dict, out: Path, *extra, base: str = "base", adapter: str = "xl_adapter", config: bool = True):
    config_args = ("--base-config", weights["config"]) if config else ()
    return run_cli("fact-generate", "--base", weights[base], *config_args, "--adapter", weights[adapter],
                   "--face-encoder", weights["encoder"], "--reference", REFERENCE, *FAST, "--out", out, *extra)


@pytest.mark.slow
def test_fact_generate_draws_from_a_single_sdxl_file(weights, tmp_path):
    """The base type comes from the adapter's metadata and the file's keys, which agree; `--base-type sdxl` too."""
    done = generate(weights, tmp_path / "out", "--base-type", "sdxl")
    assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["base_type"] == "sdxl" and settings["sources"]["scheduler"] == "euler"  # SDXL's own sampler
    assert settings["sources"]["base"] == str(weights["base"])
    assert settings["sources"]["base_config"] == str(weights["config"])
    image = np.asarray(Image.open(tmp_path / "out" / settings["images"][0]["file"]).convert("RGB"), np.int16)
    assert image.shape == (64, 64, 3) and image.std() > 0


@pytest.mark.slow
def test_fact_generate_names_each_mismatch_in_one_line(weights, tmp_path):
    base, sd15 = weights["base"], weights["sd15"]
    xl_adapter, sd15_adapter = weights["xl_adapter"], weights["sd15_adapter"]
    assert read_adapter_metadata(xl_adapter)["base_type"] == "sdxl"
    cases = [  # (how, fragments of the one error line)
        (dict(adapter="sd15_adapter"), (f"adapter {sd15_adapter} is for SD1.5 (its metadata says so) but --base "
                                        f"{base} is a single file, which loads as SDXL (it looks like an SDXL base "
                                        "model: a second text encoder under conditioner.embedders.1.model.*)",)),
        (dict(base="sd15", config=False), (f"adapter {xl_adapter} is for SDXL (its metadata says so) but --base "
                                           f"{sd15} is a single file, which loads as SD1.5 (it looks like an SD1.5 "
                                           "base model",)),
        (dict(config=False), (f"base model file {base} is not an SDXL checkpoint of the configs in {SDXL_CONFIG}",
                              "weights of another shape", "(--base)")),
    ]
    for i, (how, fragments) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert_one_error(generate(weights, out, **how), *fragments)
        assert not out.exists()  # refused before any model loads


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("single_file_sdxl_shards")
    write_synthetic_shards(root, identities=2, images_per_identity=2, groups_per_shard=2, resolution=64)
    return root


def train_config(folder: Path, shards: Path, base: dict) -> Path:
    config = yaml.safe_load(SDXL_RUN.format(steps=2, shards=shards))
    config["model"]["base"] = {"class_path": "fact_lightning.training.base_spec.PretrainedSDXLBase",
                               "init_args": base}
    path = folder / "single-file-sdxl.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_fact_train_fine_tunes_on_a_single_sdxl_file(weights, shards, tmp_path):
    base = {"source": str(weights["base"]), "config": str(weights["config"])}
    done = fact_train(train_config(tmp_path, shards, base), tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = final_adapter(tmp_path / "run")
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["base"]["init_args"] == {**saved["model"]["base"]["init_args"], **base}
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["datamodule_hyper_parameters"]["vae"] == single_file_vae_name(weights["base"])

