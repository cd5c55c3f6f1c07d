"""A single-file SD1.5 base through the console scripts: `fact-train fit` with model.base PretrainedBase
source=<file> config=<folder>, `fact-generate --base <file> --base-config <folder>`, and each file that is not a
usable SD1.5 checkpoint as one `error:` line. The files are the tiny SD1.5-topology model in the original layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fact_lightning.experiments.synthetic import write_synthetic_shards
from fact_lightning.models.adapter_io import save_adapter
from fact_lightning.models.face_encoder import build_transface
from fact_lightning.models.injection import FaceAdapter
from fact_lightning.models.resampler import ResamplerConfig
from fact_lightning.models.single_file import SD15_CONFIG, single_file_vae_name
from fact_lightning.tiny import tiny_base_model
from tests.inference.cli_runner import assert_one_error, run_cli
from tests.models.test_single_file import write_configs, write_single_file
from tests.training.runs import CONFIG, fact_train, final_adapter

REFERENCE = Path(__file__).parents[1] / "fixtures" / "faces" / "raw" / "fr_obama" / "1.jpg"
FAST = ("--steps", "2", "--height", "64", "--width", "64", "--seed", "0")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """The tiny base as one original-layout file with its config folder, a random TransFace-S file and an adapter
    for TransFace-S tokens on the tiny UNet."""
    root = tmp_path_factory.mktemp("single_file_weights")
    base = tiny_base_model(seed=0)
    files = {"base": write_single_file(base, root / "tiny-sd15.safetensors"),
             "config": write_configs(base, root / "cfg")}
    files["encoder"] = root / "ms1mv2_model_TransFace_S.pt"
    torch.save({k: v.half() for k, v in build_transface("S", seed=0).state_dict().items()}, files["encoder"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapter = FaceAdapter.for_unet(base.unet, ResamplerConfig(token_dim=512, dim=64, depth=1, heads=2, dim_head=32,
                                                                  output_dim=32))
    files["adapter"] = save_adapter(adapter, root / "adapter.safetensors")
    return files


def generate(weights: dict, out: Path, *extra, base=None, config: Path | None | bool = True):
    config_args = () if config is None else ("--base-config", weights["config"] if config is True else config)
    return run_cli("fact-generate", "--base", base or weights["base"], *config_args, "--adapter", weights["adapter"],
                   "--face-encoder", weights["encoder"], "--reference", REFERENCE, "--prompt", "a photo of a person",
                   *FAST, "--out", out, *extra)


@pytest.mark.slow
def test_fact_generate_draws_portraits_from_a_single_file_base(weights, tmp_path):
    done = generate(weights, tmp_path / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    images = sorted((tmp_path / "out" / "images").glob("*.png"))
    assert len(images) == 1
    from PIL import Image

    assert Image.open(images[0]).size == (64, 64)
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["sources"]["base"] == str(weights["base"])  # the run records the base it used
    assert settings["sources"]["base_config"] == str(weights["config"])


@pytest.mark.slow
def test_fact_generate_names_each_unusable_base_file_in_one_line(weights, tmp_path):
    base = weights["base"]
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(base.read_bytes()[: base.stat().st_size // 3])
    pickle = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, pickle)
    cases = [
        (dict(base=base, config=None), ("--base", f"{base} is not an SD1.5 checkpoint of the configs in "
                                        f"{SD15_CONFIG}", "weights of another shape")),
        (dict(base=truncated), (f"{truncated} is truncated",)),
        (dict(base=pickle), (f"{pickle} is a pickle", "convert it to .safetensors")),
        (dict(base=tmp_path / "missing.safetensors"), (f"{tmp_path / 'missing.safetensors'} (--base) does not exist",)),
        (dict(base=weights["config"]), ("--base-config", "goes with a single-file --base")),
    ]
    for i, (how, fragments) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert_one_error(generate(weights, out, **how), *fragments)
        assert not out.exists()  # checked before any model loads; nothing written


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("single_file_shards")
    write_synthetic_shards(root, identities=2, images_per_identity=2, groups_per_shard=2, resolution=64)
    return root


def train_config(folder: Path, shards: Path, base: dict) -> Path:
    config = yaml.safe_load(CONFIG.format(steps=2, shards=shards))
    config["model"]["base"] = {"class_path": "fact_lightning.training.base_spec.PretrainedBase", "init_args": base}
    path = folder / "single-file.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_fact_train_fine_tunes_on_a_single_file_base(weights, shards, tmp_path):
    base = {"source": str(weights["base"]), "config": str(weights["config"])}
    done = fact_train(train_config(tmp_path, shards, base), tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = final_adapter(tmp_path / "run")
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["base"]["init_args"] == {**saved["model"]["base"]["init_args"], **base}
    assert f"Base model: `{weights['base']}`" in (tmp_path / "run" / "README.md").read_text()  # the model card
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    # The VAE name that shards' cached latents are checked against: the file's name and its VAE's sha256.
    assert checkpoint["datamodule_hyper_parameters"]["vae"] == single_file_vae_name(weights["base"])
    assert single_file_vae_name(weights["base"]).startswith("tiny-sd15.safetensors@vae-sha256:")


@pytest.mark.slow
def test_fact_train_refuses_a_file_that_is_not_sd15_before_anything_loads(weights, shards, tmp_path):
    done = fact_train(train_config(tmp_path, shards, {"source": str(weights["base"])}), tmp_path / "run")
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    for fragment in (f"{weights['base']} is not an SD1.5 checkpoint of the configs in {SD15_CONFIG}",
                     "(model.base.init_args.source)"):
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "adapters").exists()
